"""PAGODA_FAILPOINTS parsing and the step wrappers the fault tests use."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pagoda.services.ops.failpoints import install_failpoints, parse


class _Core:
    def __init__(self) -> None:
        self.steps = 0
        self.unfinished = True

    def has_unfinished(self) -> bool:
        return self.unfinished

    def step(self) -> list[Any]:
        self.steps += 1
        return []


def test_parse_reads_items_and_rejects_bad_ones() -> None:
    assert parse("") == {}
    assert parse("stall_file=/x, step_delay_s=0.02") == {"stall_file": "/x", "step_delay_s": "0.02"}
    with pytest.raises(ValueError, match="not name=value"):
        parse("stall_file")
    known = "known: stall_file, step_delay_s, step_error_file"
    with pytest.raises(ValueError, match=rf"unknown PAGODA_FAILPOINTS.*{known}"):
        parse("crash=1")
    for bad in ("-1", "soon", "nan", "60"):
        with pytest.raises(ValueError, match="step_delay_s must be seconds"):
            parse(f"step_delay_s={bad}")


def test_step_delay_slows_only_steps_with_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_FAILPOINTS", "step_delay_s=0.05")
    core = _Core()
    install_failpoints(core)
    t0 = time.monotonic()
    core.step()
    assert time.monotonic() - t0 >= 0.05 and core.steps == 1
    core.unfinished = False
    t0 = time.monotonic()
    core.step()
    assert time.monotonic() - t0 < 0.05 and core.steps == 2


def test_no_failpoints_leaves_the_core_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGODA_FAILPOINTS", raising=False)
    core = _Core()
    step = core.step
    install_failpoints(core)
    assert core.step == step


def test_stall_file_blocks_steps_while_it_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    stall = tmp_path / "stall"
    stall.touch()
    monkeypatch.setenv("PAGODA_FAILPOINTS", f"stall_file={stall}")
    core = _Core()
    install_failpoints(core)
    stepper = threading.Thread(target=core.step)
    stepper.start()
    stepper.join(0.3)
    assert stepper.is_alive() and core.steps == 0  # blocked
    stall.unlink()
    stepper.join(5)
    assert not stepper.is_alive() and core.steps == 1


def test_step_error_file_makes_steps_raise_while_it_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
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
