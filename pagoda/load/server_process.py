"""An OpenAI-compatible server run as a subprocess for `pagoda bench serve`: the target of
`--launch` and every server peer (peers.py) build on `ServerProcess`."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self


class PeerError(ValueError):
    """A peer that cannot start: one line naming the fix (the CLI prints it, no traceback)."""


class Peer(Protocol):
    name: str

    @property
    def base_url(self) -> str: ...

    def check(self) -> None:
        """Raise PeerError naming the fix when the peer cannot run here; starts nothing."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """An OpenAI-compatible server run as a subprocess on a free port: `command()` builds its
    argv, `start()` blocks until `ready_path` answers 200, `stop()` ends it (SIGTERM, then kill).
    The output goes to a temporary log, kept (and quoted in the error) if the start fails."""

    name = "server"
    ready_path = "/v1/models"

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 300.0
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._keep_log = False

    @property
    def base_url(self) -> str:
        assert self.port is not None, "start() the peer first"
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise PeerError naming the fix when the server cannot run here; starts nothing."""

    def start(self) -> None:
        self.check()
        if self.port is None:
            self.port = free_port(self.host)
        slug = self.name.replace(".", "").replace(" ", "-")
        self._log = tempfile.NamedTemporaryFile(prefix=f"pagoda-peer-{slug}-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self._keep_log = True
            self.stop()
            raise

    def _wait_ready(self) -> None:
        import httpx  # here, not at the top: `pagoda --help` reads PEERS without paying for httpx

        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise PeerError(f"{self.name} server exited with code {code} at startup: {self._log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise PeerError(
            f"{self.name} server not ready within {self.startup_timeout_s:g} s: {self._log_tail()}"
        )

    def _log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_bytes().decode(errors="replace")

    def _log_tail(self, chars: int = 400) -> str:
        if self._log is None:
            return ""
        text = self._log_text()[-chars:]
        return " | ".join(line for line in text.splitlines() if line.strip()) + f" (log: {self._log.name})"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15.0)
        if self._log is not None:
            self._log.close()
            if not self._keep_log:  # keep the log of a server that failed to start
                os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
