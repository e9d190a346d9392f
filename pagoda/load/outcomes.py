"""How each benchmark request ended, for overload runs: served, refused at once (429 rate limited,
503 at capacity or queue timeout: the server said no, which under overload is the right answer),
hung (no complete answer within `--timeout`), or failed some other way.

Pure functions of a request's recorded error text, so that `bench serve` needs no other hook: a
refusal is `HTTP 429: ...` / `HTTP 503: ...`, or a stream whose error event carries code 429/503.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Protocol

OUTCOMES = ("ok", "refused_429", "refused_503", "hung", "error")

_HTTP = re.compile(r"^HTTP (\d{3})\b")
_STREAM = "stream error: "
HUNG_PREFIX = "no complete response within"


class _Record(Protocol):
    error: str


def outcome(rec: _Record) -> str:
    """One of OUTCOMES for a request record."""
    err = rec.error
    if not err:
        return "ok"
    if err.startswith(HUNG_PREFIX):
        return "hung"
    status: int | None = None
    m = _HTTP.match(err)
    if m:
        status = int(m.group(1))
    elif err.startswith(_STREAM):
        try:
            code = json.loads(err[len(_STREAM) :]).get("code")
            status = int(code) if code is not None else None
        except (ValueError, TypeError, AttributeError):  # truncated at 300 characters, or odd
            found = re.search(r'"code":\s*"?(\d{3})', err)
            status = int(found.group(1)) if found else None
    if status in (429, 503):
        return f"refused_{status}"
    return "error"


def count_outcomes(records: Sequence[_Record]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for rec in records:
        counts[outcome(rec)] += 1
    return counts


def prompts_for_duration(request_rate: float, duration_s: float) -> int:
    """How many requests an open loop at `request_rate` per second starts in `duration_s`."""
    if not math.isfinite(request_rate) or request_rate <= 0 or duration_s <= 0:
        raise ValueError("--duration needs a finite --request-rate > 0 and a positive duration")
    return max(1, round(request_rate * duration_s))


def format_outcomes(counts: dict[str, int]) -> list[tuple[str, str]]:
    """Rows for the result table."""
    return [
        ("Refused 429 (rate limited)", str(counts.get("refused_429", 0))),
        ("Refused 503 (at capacity / timeout)", str(counts.get("refused_503", 0))),
        ("Hung (no answer within --timeout)", str(counts.get("hung", 0))),
        ("Other errors", str(counts.get("error", 0))),
    ]
