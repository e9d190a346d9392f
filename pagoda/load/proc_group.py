"""Services started as subprocesses for a benchmark, with their CPU use sampled while it runs.

`ProcessGroup` starts `python -m pagoda ...` commands with their output in temporary log
files, stops them all with SIGTERM (then SIGKILL after a grace period), and reads each one's CPU
time through psutil. `CpuWindow` turns two readings into CPU% per process (100% = one core busy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Service:
    name: str  # role and index: gateway, worker-0, ...
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log: Path
    ps: psutil.Process

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _cpu_seconds(ps: psutil.Process) -> float:
    try:
        t = ps.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(t.user + t.system)


class ProcessGroup:
    def __init__(self) -> None:
        self.services: list[Service] = []
        # processes that are not ours but are on the measured path (the broker, the store)
        self.external: dict[str, psutil.Process] = {}

    def start(self, name: str, *args: str) -> Service:
        fd, log = tempfile.mkstemp(prefix=f"pagoda-bench-{name}-", suffix=".log")
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pagoda", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        svc = Service(name, args, proc, Path(log), psutil.Process(proc.pid))
        self.services.append(svc)
        return svc

    def check_alive(self) -> None:
        for svc in self.services:
            if not svc.alive():
                raise RuntimeError(
                    f"{svc.name} exited with code {svc.proc.returncode}:\n{svc.log_tail()}\n(log: {svc.log})"
                )

    def watch_listener(self, name: str, port: int) -> None:
        """Also sample the local process listening on `port` (e.g. RabbitMQ on 5672), if visible."""
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, OSError):
            return
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                self.external[name] = psutil.Process(c.pid)
                return

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each process, ours and external ones."""
        out = {svc.name: _cpu_seconds(svc.ps) for svc in self.services}
        out.update({name: _cpu_seconds(ps) for name, ps in self.external.items()})
        return out

    def stop(self, grace_s: float = 20.0) -> dict[str, int]:
        """SIGTERM all, wait, SIGKILL stragglers; returns exit codes by name. Logs of processes
        that exited cleanly are removed."""
        for svc in self.services:
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes: dict[str, int] = {}
        for svc in self.services:
            try:
                codes[svc.name] = svc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                codes[svc.name] = svc.proc.wait()
            if codes[svc.name] == 0:
                svc.log.unlink(missing_ok=True)
        return codes


@dataclass
class CpuWindow:
    """CPU% per process between two `ProcessGroup.cpu_seconds()` readings."""

    start_s: float
    start: dict[str, float]

    @staticmethod
    def begin(group: ProcessGroup) -> CpuWindow:
        return CpuWindow(time.perf_counter(), group.cpu_seconds())

    def end(self, group: ProcessGroup) -> dict[str, float]:
        wall = max(time.perf_counter() - self.start_s, 1e-9)
        now = group.cpu_seconds()
        return {k: 100.0 * (now[k] - self.start.get(k, 0.0)) / wall for k in now}
