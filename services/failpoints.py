"""Fault injection for the fault-tolerance tests, off unless `PAGODA_FAILPOINTS` is set.

`PAGODA_FAILPOINTS="stall_file=/path"`: while that file exists, the worker's engine step blocks
(its event loop, and so its heartbeats, keep running): the stalled step loop that stall detection
must catch. Removing the file lets the step finish.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger("pagoda.failpoints")


def parse(spec: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"PAGODA_FAILPOINTS item {item!r} is not name=value")
        points[name] = value
    unknown = set(points) - {"stall_file"}
    if unknown:
        raise ValueError(f"unknown PAGODA_FAILPOINTS {sorted(unknown)}; known: stall_file")
    return points


def install_failpoints(core: Any) -> None:
    """Wrap `core.step` as the environment asks (nothing when PAGODA_FAILPOINTS is unset)."""
    points = parse(os.environ.get("PAGODA_FAILPOINTS", ""))
    stall_file = points.get("stall_file")
    if stall_file is None:
        return
    logger.warning("failpoint: engine steps block while %s exists", stall_file)
    step = core.step

    def stalling_step() -> Any:
        while os.path.exists(stall_file):
            time.sleep(0.05)
        return step()

    core.step = stalling_step
