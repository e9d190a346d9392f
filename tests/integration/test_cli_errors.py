"""Services started against a broker or store that is not there: one line naming the fix, exit 1,
no traceback."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from tests.faults.infra import TcpProxy
from tests.processes import AMQP, REDIS, Proc, free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("which", ["bus", "store"])
def test_unreachable_servers_give_one_clear_line(which: str) -> None:
    dead = free_port()
    bus = f"amqp://guest:guest@127.0.0.1:{dead}/" if which == "bus" else AMQP
    store = f"redis://127.0.0.1:{dead}/0" if which == "store" else "redis://127.0.0.1:6379/0"
    out = subprocess.run(
        [sys.executable, "-m", "pagoda", "scheduler", "--bus", bus, "--store", store],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    expected = "cannot reach RabbitMQ" if which == "bus" else "cannot reach Redis"
    assert f"pagoda: error: {expected}" in out.stderr
    assert "guest:guest" not in out.stderr  # the password is never printed


def test_sigterm_ends_a_service_whose_broker_is_gone() -> None:
    """Closing channels waits on a reconnect that never comes once the broker is gone: the
    shutdown steps are bounded, so SIGTERM still ends the process, with exit code 0."""
    port = free_port()
    proxy = TcpProxy(port, ("127.0.0.1", 5672))
    proxy.start()
    bus = f"amqp://guest:guest@127.0.0.1:{port}/?reconnect_interval=0.5"
    namespace = f"pagoda-test-{uuid.uuid4().hex[:8]}"
    proc = Proc("scheduler", "--bus", bus, "--store", REDIS, "--namespace", namespace)
    try:
        deadline = time.monotonic() + 60
        while "scheduler ready" not in proc.output():
            assert proc.alive(), proc.output()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        proxy.cut()  # the broker goes away and stays away
        time.sleep(1.0)
        t0 = time.monotonic()
        assert proc.stop(timeout=30) == 0, proc.output()
        assert time.monotonic() - t0 < 25, proc.output()
    finally:
        if proc.alive():
            proc.p.kill()
        proxy.close()
