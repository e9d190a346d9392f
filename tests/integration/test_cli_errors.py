"""Services started against a broker or store that is not there: one line naming the fix, exit 1,
no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import AMQP, free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("which", ["bus", "store"])
def test_unreachable_servers_give_one_clear_line(which: str) -> None:
    dead = free_port()
    bus = f"amqp://guest:guest@127.0.0.1:{dead}/" if which == "bus" else AMQP
    store = f"redis://127.0.0.1:{dead}/0" if which == "store" else "redis://127.0.0.1:6379/0"
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "scheduler", "--bus", bus, "--store", store],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    expected = "cannot reach RabbitMQ" if which == "bus" else "cannot reach Redis"
    assert f"pagoda: error: {expected}" in out.stderr
    assert "guest:guest" not in out.stderr  # the password is never printed
