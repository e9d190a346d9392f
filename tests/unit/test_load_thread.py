"""Serving processes load the model in a thread that exits (async_engine.build_off_main_thread):
GNU OpenMP slows every small op of the step thread once another live thread has its own pool."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pagoda.engine.core.async_engine import build_off_main_thread


def test_build_runs_in_a_thread_that_then_exits() -> None:
    seen: list[threading.Thread] = []

    def build() -> int:
        seen.append(threading.current_thread())
        return 42

    assert build_off_main_thread(build) == 42
    assert seen[0] is not threading.main_thread() and seen[0].name == "pagoda-load"
    assert not seen[0].is_alive()  # its OpenMP pool went with it


def test_build_errors_reach_the_caller() -> None:
    def build() -> int:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        build_off_main_thread(build)


def test_services_build_the_engine_core_off_the_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pagoda serve` and `pagoda worker` (pagoda.services.cli.launch.Process.build_worker) and
    AsyncEngine.from_config."""
    from pagoda.engine.core import async_engine, engine_core
    from pagoda.services.cli.config import launch_config
    from pagoda.services.cli.launch import Process
    from pagoda.services.cli.parser import build_parser

    built_in: list[str] = []

    class FakeCore:
        def __init__(self, config: Any, *, background_compile: bool = False) -> None:
            built_in.append(threading.current_thread().name)
            assert background_compile  # a server serves while its decode graphs compile

    monkeypatch.setattr(engine_core, "EngineCore", FakeCore)
    monkeypatch.setattr("pagoda.services.ops.failpoints.install_failpoints", lambda core: None)
    monkeypatch.setattr("pagoda.services.worker.service.WorkerService", lambda engine, *a, **k: engine)
    monkeypatch.setattr("pagoda.engine.core.async_engine.AsyncEngine.__init__", lambda self, core: None)
    args = build_parser().parse_args(["worker", "--bus", "amqp://x", "--store", "redis://x"])
    Process(launch_config(args, ("worker",))).build_worker()
    async_engine.AsyncEngine.from_config(object())  # type: ignore[arg-type]
    assert built_in == ["pagoda-load", "pagoda-load"]
