"""`bench serve` under overload: refusals (429/503) counted apart from hangs and other errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pagoda.load.bench_serve import ServeConfig, format_result, run_benchmark
from pagoda.load.datasets import DatasetSpec
from pagoda.load.outcomes import count_outcomes, outcome, prompts_for_duration
from pagoda.services.scheduler.admission import AdmissionLimits
from tests.unit.test_admission import Stack


@dataclass
class Rec:
    error: str = ""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("", "ok"),
        ('HTTP 429: {"error": {"code": 429}}', "refused_429"),
        ("HTTP 503: at capacity", "refused_503"),
        ("HTTP 500: boom", "error"),
        (
            'stream error: {"message": "queue timeout", "type": "X", "param": null, "code": 503}',
            "refused_503",
        ),
        ('stream error: {"message": "' + "x" * 400, "error"),  # truncated, no code
        ('stream error: {"code": 429, "message": "trunc', "refused_429"),
        ("no complete response within --timeout 5s", "hung"),
        ("ConnectError: refused", "error"),
    ],
)
def test_outcome_of_a_record(error: str, expected: str) -> None:
    assert outcome(Rec(error)) == expected


def test_counts_and_duration() -> None:
    counts = count_outcomes(
        [Rec(), Rec("HTTP 503: x"), Rec("HTTP 503: y"), Rec("no complete response within")]
    )
    assert counts == {"ok": 1, "refused_429": 0, "refused_503": 2, "hung": 1, "error": 0}
    assert prompts_for_duration(2.5, 60) == 150
    with pytest.raises(ValueError, match="finite --request-rate"):
        prompts_for_duration(float("inf"), 60)


async def test_a_burst_beyond_capacity_is_served_or_refused_never_hung() -> None:
    stack = Stack(slots=2, limits=AdmissionLimits(max_waiting=0, priority_reserve=0))
    async with stack as client:
        spec = DatasetSpec(name="random", num_prompts=8, input_len=8, output_len=20)
        cfg = ServeConfig(base_url="http://t", endpoint="completions", dataset=spec, progress=False,
                          request_timeout_s=10)  # fmt: skip
        r = await run_benchmark(cfg, client)
    assert r.outcomes["hung"] == 0 and r.outcomes["error"] == 0, r.first_error
    assert r.outcomes["ok"] == r.completed >= 2 and r.outcomes["refused_503"] >= 4
    assert sum(r.outcomes.values()) == 8
    assert "Refused 503 (at capacity / timeout):" in format_result(r)
