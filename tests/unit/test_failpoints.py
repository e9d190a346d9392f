"""PAGODA_FAILPOINTS parsing, the step wrappers and the bus hold the fault tests use. Waits run on a
fake `time.sleep` (the wrappers' only clock) or on events, never on the machine's speed."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pagoda.services.ops import failpoints
from pagoda.services.ops.failpoints import install_failpoints, parse
from pagoda.services.transport.bus import Delivery, make_bus
from pagoda.services.transport.bus_memory import InMemoryBus
from tests.polling import until


class _Core:
    def __init__(self) -> None:
        self.steps = 0
        self.unfinished = True

    def has_unfinished(self) -> bool:
        return self.unfinished

    def step(self) -> list[Any]:
        self.steps += 1
        return []


def _fake_sleep(monkeypatch: pytest.MonkeyPatch, on_sleep: Any) -> None:
    """The wrappers' `time.sleep` calls `on_sleep(seconds)` instead of sleeping."""
    monkeypatch.setattr(failpoints, "time", SimpleNamespace(sleep=on_sleep))


def test_parse_reads_items_and_rejects_bad_ones() -> None:
    assert parse("") == {}
    assert parse("stall_file=/x, step_delay_s=0.02") == {"stall_file": "/x", "step_delay_s": "0.02"}
    with pytest.raises(ValueError, match="not name=value"):
        parse("stall_file")
    known = "known: stall_file, step_delay_s, step_error_file, hold_file"
    with pytest.raises(ValueError, match=rf"unknown PAGODA_FAILPOINTS.*{known}"):
        parse("crash=1")
    for bad in ("-1", "soon", "nan", "60"):
        with pytest.raises(ValueError, match="step_delay_s must be seconds"):
            parse(f"step_delay_s={bad}")


def test_step_delay_slows_only_steps_with_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_FAILPOINTS", "step_delay_s=0.05")
    slept: list[float] = []
    _fake_sleep(monkeypatch, slept.append)
    core = _Core()
    install_failpoints(core)
    core.step()
    assert slept == [0.05] and core.steps == 1
    core.unfinished = False
    core.step()
    assert slept == [0.05] and core.steps == 2  # no work: no delay


def test_no_failpoints_leaves_the_core_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGODA_FAILPOINTS", raising=False)
    core = _Core()
    step = core.step
    install_failpoints(core)
    assert core.step == step


def test_stall_file_blocks_steps_while_it_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stall = tmp_path / "stall"
    stall.touch()
    monkeypatch.setenv("PAGODA_FAILPOINTS", f"stall_file={stall}")
    core = _Core()
    steps_while_waiting: list[int] = []

    def waiting(_seconds: float) -> None:  # the third wait removes the file
        steps_while_waiting.append(core.steps)
        if len(steps_while_waiting) == 3:
            stall.unlink()

    _fake_sleep(monkeypatch, waiting)
    install_failpoints(core)
    core.step()
    assert steps_while_waiting == [0, 0, 0]  # blocked, the real step not run, until the file went
    assert core.steps == 1
    core.step()
    assert core.steps == 2 and len(steps_while_waiting) == 3  # no file: no wait


def test_step_error_file_makes_steps_raise_while_it_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    error_file = tmp_path / "fail"
    monkeypatch.setenv("PAGODA_FAILPOINTS", f"step_error_file={error_file}")
    core = _Core()
    install_failpoints(core)
    core.step()
    error_file.touch()
    with pytest.raises(RuntimeError, match="failpoint: step error"):
        core.step()
    assert core.steps == 1


async def test_hold_file_keeps_a_message_in_flight_and_a_dead_consumer_has_it_redelivered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv("PAGODA_FAILPOINTS", f"hold_file={hold}")
    bus, got = InMemoryBus(), list[Delivery]()

    async def handle(message: Delivery) -> None:
        got.append(message)

    await bus.declare_work_queue("q")
    first = await bus.consume("q", handle)
    await bus.publish("q", b"abc")
    await until(lambda: "failpoint: holding a message from q" in caplog.text, 5, "the message to be held")
    assert got == [] and await bus.queue_depth("q") == 0  # delivered, not handled: in flight
    assert "redelivered" not in caplog.text
    await first.cancel()  # its consumer dies with the message in flight
    hold.unlink()
    await bus.consume("q", handle)
    await until(lambda: len(got) == 1, 5, "the redelivery")
    assert got[0].body == b"abc" and got[0].redelivered
    assert "queue q: handling a redelivered message of 3 bytes" in caplog.text
    await bus.close()


def test_a_malformed_failpoint_fails_when_the_bus_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_FAILPOINTS", "hold=/tmp/x")
    with pytest.raises(ValueError, match="unknown PAGODA_FAILPOINTS"):
        make_bus("memory://")
