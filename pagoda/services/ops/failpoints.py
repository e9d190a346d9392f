"""Fault injection for the fault-tolerance tests, off unless `PAGODA_FAILPOINTS` is set
(comma-separated `name=value` items).

- `stall_file=/path`: while that file exists, the worker's engine step blocks (its event loop, and
  so its heartbeats, keep running): the stalled step loop that stall detection must catch.
  Removing the file lets the step finish.
- `step_delay_s=0.01`: every engine step takes that much longer (a slow model), so that a tiny
  model's streams are still running when a test breaks something.
- `step_error_file=/path`: while that file exists, the engine step raises (a CUDA error, say): the
  engine stops for good and the worker must hand its requests on, then exit.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger("pagoda.failpoints")

KNOWN = ("stall_file", "step_delay_s", "step_error_file")


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


def install_failpoints(core: Any) -> None:
    """Wrap `core.step` as the environment asks (nothing when PAGODA_FAILPOINTS is unset)."""
    points = parse(os.environ.get("PAGODA_FAILPOINTS", ""))
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
