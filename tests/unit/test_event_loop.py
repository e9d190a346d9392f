"""The services' event loop: uvloop's when it is installed, asyncio's otherwise or when asked."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from pagoda.services.cli.interpreter import event_loop_factory


def test_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    monkeypatch.delenv("PAGODA_EVENT_LOOP", raising=False)
    assert event_loop_factory() is None


def test_uvloop_when_installed_unless_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("uvloop")
    fake.new_event_loop = asyncio.new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    monkeypatch.delenv("PAGODA_EVENT_LOOP", raising=False)
    assert event_loop_factory() is asyncio.new_event_loop
    monkeypatch.setenv("PAGODA_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None
