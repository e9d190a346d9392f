"""Reading streamed OpenAI responses cheaply: the per-line timing both bench clients share, and a
lean HTTP/1.1 client for `pagoda bench control-plane`.

The control-plane bench runs its load client on the machine it measures, so the client's CPU per
token competes with the gateway's. httpx spends ~100 us of CPU per streamed chunk (an anyio
receive, an epoll re-registration, h11 and three decoding generators); `SSEConnection` is an
asyncio protocol that decodes chunked transfer encoding and SSE lines in `data_received` and times
each chunk there, with no task switch per chunk. It speaks just enough HTTP/1.1 for a keep-alive
POST answered with a chunked or sized body, which is what an OpenAI-compatible server sends.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagoda.load.serve_runner import RequestRecord


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return str(delta.get("content") or delta.get("reasoning_content") or "")
    return str(choice.get("text") or "")


class LineSplitter:
    """Bytes in, complete lines out (without their \\n or \\r\\n)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._rest = (self._rest + data).split(b"\n")
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]


class StreamTimer:
    """Times the content chunks of one streamed response into `rec`: TTFT at the first chunk
    with content, one ITL per later one; keeps the last usage and finish_reason seen."""

    def __init__(self, rec: RequestRecord, max_lines: int) -> None:
        self.rec = rec
        self.max_lines = max_lines
        self.lines = 0
        self.chunks = 0  # chunks with content
        self.done = False  # saw [DONE]
        self.usage: dict[str, Any] | None = None
        self.finish = ""
        self._last = rec.start_s

    def line(self, line: bytes, now: float) -> bool:
        """Feed one line received at `now` (perf_counter); True when the stream should not be
        read further: [DONE], an error event, or more than `max_lines` lines."""
        self.lines += 1
        if self.lines > self.max_lines:
            self.rec.error = f"stream exceeded {self.max_lines} lines"
            return True
        if not line.startswith(b"data:"):
            return False
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return True
        chunk = json.loads(data)
        if chunk.get("error"):
            self.rec.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
            return True
        if _content(chunk):
            if self.chunks == 0:
                self.rec.ttft_s = now - self.rec.start_s
            else:
                self.rec.itl_s.append(now - self._last)
            self._last = now
            self.chunks += 1
        self.usage = chunk.get("usage") or self.usage
        choices = chunk.get("choices") or [{}]
        self.finish = str(choices[0].get("finish_reason") or self.finish)
        return False

    def close(self, end: float, output_len: int) -> None:
        """The stream ended at `end` (perf_counter): e2e time, and the completion tokens from
        usage, else from the chunks counted."""
        rec = self.rec
        rec.e2e_s = end - rec.start_s
        if not rec.error and not self.done and self.usage is None:
            rec.error = "stream ended without [DONE]"
        if self.chunks == 0:
            rec.ttft_s = rec.e2e_s
        # Without usage, count content chunks; a server may merge tokens into one chunk
        # (llama-cpp-python holds back partial UTF-8), so a reply that ended on length has
        # exactly max_tokens.
        rec.completion_tokens = output_len if self.finish == "length" and not rec.error else self.chunks
        if isinstance(self.usage, dict):
            rec.prompt_tokens = int(self.usage.get("prompt_tokens") or rec.prompt_tokens)
            rec.completion_tokens = int(self.usage.get("completion_tokens") or self.chunks)


class HTTPError(Exception):
    """The server broke the HTTP exchange (closed early, or sent what this client cannot read)."""


class SSEConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that runs one streamed request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset(None)

    def _reset(self, timer: StreamTimer | None) -> None:
        self._timer = timer
        self._buf = b""
        self._done: asyncio.Future[tuple[int, bytes]] | None = None
        self._status = 0
        self._head = True  # reading the status line and headers
        self._chunked = False
        self._remaining = -1  # body bytes left (sized) or in the current chunk (chunked); -1: unknown
        self._body: list[bytes] = []  # the body of a non-200 answer
        self._lines = LineSplitter()
        self._stopped = False  # the timer wants no more lines
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(HTTPError(f"the server closed the connection ({exc or 'EOF'})"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def post(self, host: str, path: str, body: dict[str, Any], timer: StreamTimer) -> tuple[int, bytes]:
        """POST `body` as JSON; SSE lines go to `timer` as they arrive. Returns (status, the body
        of a non-200 answer). The connection is closed unless the answer ended cleanly."""
        assert self.transport is not None and self._done is None, "one request at a time"
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self._reset(timer)
        done = self._done = asyncio.get_running_loop().create_future()
        self.transport.write(head.encode() + payload)
        try:
            return await done
        except BaseException:
            self.close()
            raise
        finally:
            self._reset(None)

    # -- parsing -------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._done is None or self._done.done():
            return  # nothing asked: a stray byte after an answer (the next request resets)
        self._buf += data
        try:
            if self._head and not self._read_head():
                return
            self._read_body(now)
        except Exception as exc:  # a malformed answer, or an event that is not JSON
            self._done.set_exception(exc)

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        self._buf = self._buf[end + 4 :]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        self._status = int(parts[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._keep_alive = parts[0] != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
        if not self._chunked:
            self._remaining = int(headers.get("content-length", "-1"))
        else:
            self._remaining = -1
        self._head = False
        return True

    def _read_body(self, now: float) -> None:
        if not self._chunked:
            piece, self._buf = (
                (self._buf, b"")
                if self._remaining < 0
                else (self._buf[: self._remaining], self._buf[self._remaining :])
            )
            if self._remaining >= 0:
                self._remaining -= len(piece)
            self._take(piece, now)
            if self._remaining == 0:
                self._finish()
            return
        while True:
            if self._remaining < 0:  # at a chunk-size line
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(self._buf[:eol].split(b";")[0], 16)
                self._buf = self._buf[eol + 2 :]
                if size == 0:
                    self._finish()  # trailers, if any, are not read
                    return
                self._remaining = size
            piece = self._buf[: self._remaining]
            self._buf = self._buf[len(piece) :]
            self._remaining -= len(piece)
            self._take(piece, now)
            if self._remaining > 0:
                return
            if len(self._buf) < 2:  # the CRLF after the chunk's data is still to come
                self._remaining = 0
                return
            self._buf = self._buf[2:]
            self._remaining = -1

    def _take(self, piece: bytes, now: float) -> None:
        if self._status != 200:
            self._body.append(piece)
            return
        if self._stopped or self._timer is None:
            return
        for line in self._lines.feed(piece):
            if self._timer.line(line, now):
                self._stopped = True
                if not self._timer.done:  # an error event or too many lines: stop reading here
                    self._finish()
                    self.close()
                break

    def _finish(self) -> None:
        assert self._done is not None
        if not self._done.done():
            self._done.set_result((self._status, b"".join(self._body)))
        if not self._keep_alive:
            self.close()


class SSEClient:
    """One connection's worth of sequential requests to `host:port`, reconnecting when the last
    answer closed the connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._conn: SSEConnection | None = None

    async def post(self, path: str, body: dict[str, Any], timer: StreamTimer) -> tuple[int, bytes]:
        if self._conn is None or self._conn.closed:
            loop = asyncio.get_running_loop()
            _, self._conn = await loop.create_connection(SSEConnection, self.host, self.port)
        return await self._conn.post(f"{self.host}:{self.port}", path, body, timer)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
