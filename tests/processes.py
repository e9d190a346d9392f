"""Run pagoda services as real processes for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A `pagoda ...` subprocess whose output goes to a file (read it on failure)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = Path(tempfile.mkstemp(prefix="pagoda-", suffix=".log")[1])
        env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "pagoda", *args],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"pagoda {self.args[0]} did not exit within {timeout}s of SIGTERM") from None


def wait_ready(base: str, procs: list[Proc], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"pagoda {proc.args[0]} exited early:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(
        "the stack did not become ready in time:\n" + "\n".join(p.output()[-1500:] for p in procs)
    )
