"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis), shared by the run against a
fake engine (tests/unit/test_api_fuzz.py) and the one over the real bus with the demo model
(tests/integration/test_api_fuzz_bus.py): the operations, how a case is sent, what every answer
must look like."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

VALID, INVALID = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
ERROR_FIELDS = {"message", "type", "param", "code"}


def case_ids(operations: list[tuple[str, str, GenerationMode, int]]) -> list[str]:
    return [f"{m} {p} {'valid' if g == VALID else 'invalid'}" for p, m, g, _ in operations]


def request_kwargs(case: Any, base_url: str) -> dict[str, Any]:
    """httpx.request keyword arguments for a generated case (method, url, headers, params, body)."""
    kw = case.as_transport_kwargs(base_url=base_url)
    out: dict[str, Any] = {
        "method": kw["method"], "url": kw["url"], "headers": kw.get("headers"), "params": kw.get("params"),
    }  # fmt: skip
    if "json" in kw:
        out["json"] = kw["json"]
    elif kw.get("data") is not None:
        data = kw["data"]
        out["content"] = data if isinstance(data, bytes | str) else str(data)
    return out


def _check_error(err: Any, where: str, status: int | None = None) -> None:
    assert isinstance(err, dict) and set(err) == ERROR_FIELDS, f"{where}: not an OpenAI error: {err!r:.300}"
    assert status is None or err["code"] == status, where
    assert isinstance(err["code"], int) and err["code"] < 500, f"{where}: {err!r:.300}"
    assert "Traceback" not in err["message"], where


def check_response(case: Any, resp: httpx.Response) -> None:
    """No 5xx; an error is an OpenAI error body whose code is the status; a stream's error events
    are OpenAI errors under 500 too (a 200 stream can still fail after its headers)."""
    where = f"{case.method} {case.path} body={case.body!r:.300}"
    assert resp.status_code < 500, f"{where} -> {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        _check_error(resp.json().get("error"), where, resp.status_code)
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        for line in resp.text.splitlines():
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]" and "error" in (event := json.loads(data)):
                _check_error(event["error"], f"{where} (stream)")


def fuzz(
    strategy: Any, examples: int, send: Callable[[Any], httpx.Response], derandomize: bool = False
) -> None:
    """Draws `examples` cases from `strategy`, sends each and checks its answer. `derandomize`: the
    same cases on every run (for a run that must also count what its valid cases did)."""

    @settings(
        max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), derandomize=derandomize,
    )  # fmt: skip
    @given(case=strategy)
    def run(case: Any) -> None:
        check_response(case, send(case))

    run()
