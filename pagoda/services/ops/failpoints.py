"""Fault injection for the fault-tolerance tests, off unless `PAGODA_FAILPOINTS` is set
(comma-separated `name=value` items).

- `stall_file=/path`: while that file exists, the worker's engine step blocks (its event loop, and
  so its heartbeats, keep running): the stalled step loop that stall detection must catch.
  Removing the file lets the step finish.
- `step_delay_s=0.01`: every engine step takes that much longer (a slow model), so that a tiny
  model's streams are still running when a test breaks something.
- `step_error_file=/path`: while that file exists, the engine step raises (a CUDA error, say): the
  engine stops for good and the worker must hand its requests on, then exit.
- `hold_file=/path`: while that file exists, every message the process's bus hands to a handler
  waits before it is handled (delivered, not acked: in flight), in any role. A test kills the
  process or restarts the broker then, and sees the message redelivered. Each held message logs
  `failpoint: holding a message from <queue>` once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any

logger = logging.getLogger("pagoda.failpoints")

KNOWN = ("stall_file", "step_delay_s", "step_error_file", "hold_file")
HOLD_POLL_S = 0.05


def parse(spec: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"PAGODA_FAILPOINTS item {item!r} is not name=value")
        points[name] = value
    unknown = set(points) - set(KNOWN)
    if unknown:
        raise ValueError(f"unknown PAGODA_FAILPOINTS {sorted(unknown)}; known: {', '.join(KNOWN)}")
    if "step_delay_s" in points:
        value = points["step_delay_s"]
        try:
            delay = float(value)
        except ValueError:
            delay = -1.0
        if not 0 <= delay < 60:
            raise ValueError(f"PAGODA_FAILPOINTS step_delay_s must be seconds in [0, 60), got {value!r}")
    return points


@functools.lru_cache(maxsize=4)
def _parsed(spec: str) -> dict[str, str]:
    return parse(spec)


def active() -> dict[str, str]:
    """The failpoints `PAGODA_FAILPOINTS` sets now (parsed once per value); raises ValueError,
    naming the bad item, when it is malformed."""
    return _parsed(os.environ.get("PAGODA_FAILPOINTS", ""))


async def hold_delivery(queue: str) -> None:
    """Waits while the `hold_file` failpoint's file exists; returns at once without one."""
    hold_file = active().get("hold_file")
    if hold_file is None or not os.path.exists(hold_file):
        return
    logger.warning("failpoint: holding a message from %s while %s exists", queue, hold_file)
    while os.path.exists(hold_file):
        await asyncio.sleep(HOLD_POLL_S)


def install_failpoints(core: Any) -> None:
    """Wrap `core.step` as the environment asks (nothing when PAGODA_FAILPOINTS is unset)."""
    points = active()
    stall_file = points.get("stall_file")
    error_file = points.get("step_error_file")
    delay = float(points.get("step_delay_s", 0))
    if stall_file is None and error_file is None and not delay:
        return
    if stall_file is not None:
        logger.warning("failpoint: engine steps block while %s exists", stall_file)
    if error_file is not None:
        logger.warning("failpoint: engine steps raise while %s exists", error_file)
    if delay:
        logger.warning("failpoint: every engine step takes %.3fs longer", delay)
    step = core.step

    def failing_step() -> Any:
        while stall_file is not None and os.path.exists(stall_file):
            time.sleep(0.05)
        if error_file is not None and os.path.exists(error_file):
            raise RuntimeError(f"failpoint: step error ({error_file} exists)")
        if delay and core.has_unfinished():
            time.sleep(delay)
        return step()

    core.step = failing_step
