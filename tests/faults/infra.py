"""What the fault tests break: a private Redis they restart, a private RabbitMQ node they stop and
start, and a TCP proxy in front of RabbitMQ that they cut (every connection dropped, new ones
refused, as while the broker restarts) and restore. The shared RabbitMQ and Redis are never
touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


class PrivateRedis:
    """A redis-server on a free port with no persistence: a restart loses every key."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed (apt-get install -y redis-server)"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, from its own thread and event loop."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self.server: asyncio.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()
        self.thread.start()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.conns |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.conns -= {writer, up_writer}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.conns):
            w.transport.abort()
        self.conns.clear()

    def start(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `start`."""
        self._call(self._cut())

    def close(self) -> None:
        self._call(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class PrivateRabbit:
    """A RabbitMQ node of its own (name, AMQP and distribution ports, data directory), started with
    the system's `rabbitmq-server` (which runs it as the rabbitmq user when started by root) and
    stopped with `rabbitmqctl stop`: a real broker restart. Its data directory persists across a
    restart, as a deployed broker's does, so durable queues survive (pagoda's messages are transient)."""

    def __init__(self, amqp_port: int, dist_port: int) -> None:
        for exe in ("rabbitmq-server", "rabbitmqctl"):
            assert shutil.which(exe), f"{exe} is not installed (apt-get install -y rabbitmq-server)"
        self.port = amqp_port
        self.node = f"pagoda-fault-{amqp_port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{amqp_port}/"
        self.dir = Path(tempfile.mkdtemp(prefix="pagoda-rabbit-"))
        self.dir.chmod(0o777)  # the node runs as the rabbitmq user
        for d in ("mnesia", "log"):
            (self.dir / d).mkdir()
            (self.dir / d).chmod(0o777)
        (self.dir / "plugins").write_text("")
        conf = f"listeners.tcp.local = 127.0.0.1:{amqp_port}\nloopback_users = none\n"
        (self.dir / "rabbitmq.conf").write_text(conf)
        for f in ("plugins", "rabbitmq.conf"):
            (self.dir / f).chmod(0o644)
        self.env = dict(
            os.environ, RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(amqp_port),
            RABBITMQ_DIST_PORT=str(dist_port), RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"), RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> float:
        """Starts the node; returns the seconds until it accepted AMQP connections."""
        assert self.proc is None, "the node is running"
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return time.monotonic() - t0
            assert self.proc.poll() is None, f"the private RabbitMQ node exited; logs in {self.dir / 'log'}"
            assert time.monotonic() - t0 < timeout_s, f"the private RabbitMQ node took over {timeout_s}s"
            time.sleep(0.1)

    def stop(self, timeout_s: float = 60.0) -> float:
        """A clean shutdown (the broker closes every connection); returns the seconds it took."""
        t0 = time.monotonic()
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=timeout_s
        )
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
        return time.monotonic() - t0

    def kill(self) -> None:
        """Ends the node whatever its state (cleanup). `su` runs it in a session of its own, so the
        node's process is found by its pid file and checked (its environment) to be this node's."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / "pid").read_text().strip())
            if f"RABBITMQ_NODENAME={self.node}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
