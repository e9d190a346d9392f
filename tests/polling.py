"""Waiting in tests for a condition that other tasks or processes make true, always with a deadline:
a wait that cannot end is a hung test run, not a failure with a message."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """Poll `condition` (sync or async) every `interval_s` until it holds; fail the test naming
    `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(interval_s)


def block_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """`until` for code without an event loop (fixtures, threads, sync tests)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(interval_s)
