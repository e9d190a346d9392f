"""The lean SSE client of `pagoda bench control-plane`: chunked and sized HTTP/1.1 answers split at
any byte, keep-alive reuse, errors; and the line timing both bench clients share."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagoda.load.serve_runner import RequestRecord
from pagoda.load.sse_client import HTTPError, LineSplitter, SSEClient, SSEConnection, StreamTimer


def _events(texts: list[str], usage: int | None = None) -> bytes:
    out = b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}).encode() + b"\n\n"
        for t in texts
    )
    if usage is not None:
        out += (
            b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": usage}}).encode() + b"\n\n"
        )
    return out + b"data: [DONE]\n\n"


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for n in [*sizes, len(body)]:
        piece = body[i : i + max(n, 1)]
        if piece:
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        i += len(piece)
    rest = body[i:]
    if rest:
        out += f"{len(rest):x}\r\n".encode() + rest + b"\r\n"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + out
        + b"0\r\n\r\n"
    )


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


async def _feed(answer: bytes, cuts: list[int]) -> tuple[tuple[int, bytes], StreamTimer, _Transport]:
    conn, transport = SSEConnection(), _Transport()
    conn.connection_made(transport)
    timer = StreamTimer(RequestRecord(), max_lines=1000)
    task = asyncio.create_task(conn.post("h:1", "/v1/chat/completions", {"a": 1}, timer))
    await asyncio.sleep(0)
    points = sorted({c % (len(answer) + 1) for c in cuts} | {0, len(answer)})
    for a, b in itertools.pairwise(points):
        conn.data_received(answer[a:b])
    return await asyncio.wait_for(task, 1), timer, transport


@given(
    texts=st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 40), max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_chunked_stream_split_anywhere(texts: list[str], sizes: list[int], cuts: list[int]) -> None:
    answer = _chunked(_events(texts, usage=len(texts)), sizes)
    (status, body), timer, transport = asyncio.run(_feed(answer, cuts))
    assert (status, body) == (200, b"")
    assert timer.done and timer.chunks == len(texts) and timer.usage == {"completion_tokens": len(texts)}
    assert len(timer.rec.itl_s) == len(texts) - 1 and not timer.rec.error
    assert not transport.closed  # kept alive
    head, _, payload = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h:1\r\n") and json.loads(
        payload
    ) == {"a": 1}


def test_sized_error_answer() -> None:
    answer = b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 13\r\n\r\n{"error": {}}'
    (status, body), timer, _ = asyncio.run(_feed(answer, [5, 40, 60]))
    assert (status, body) == (429, b'{"error": {}}') and timer.chunks == 0


def test_error_event_and_line_limit_stop_reading() -> None:
    err = b'data: {"error": {"message": "boom"}}\n\n'
    (status, _), timer, transport = asyncio.run(_feed(_chunked(err + _events(["a"]), []), []))
    assert status == 200 and "boom" in timer.rec.error and transport.closed


def test_not_http_is_an_error() -> None:
    with pytest.raises(HTTPError, match="status line"):
        asyncio.run(_feed(b"SSH-2.0-OpenSSH\r\n\r\n", []))


def test_line_splitter_and_timer() -> None:
    lines = LineSplitter()
    assert lines.feed(b"data: 1\r\n\ndat") == [b"data: 1", b""]
    assert lines.feed(b"a: 2\n") == [b"data: 2"]
    rec = RequestRecord(start_s=10.0)
    timer = StreamTimer(rec, max_lines=3)
    assert not timer.line(b'data: {"choices": [{"text": "x", "finish_reason": "length"}]}', 10.5)
    assert not timer.line(b": comment", 10.6)
    assert not timer.line(b'data: {"choices": [{"text": "y"}]}', 10.75)
    assert timer.line(b"data: [DONE]", 11.0) and "exceeded 3 lines" in rec.error
    timer.close(12.0, output_len=7)
    assert (rec.ttft_s, rec.itl_s, rec.e2e_s) == (0.5, [0.25], 2.0)
    assert timer.finish == "length" and rec.completion_tokens == 2  # an error: counted chunks


async def _serve(answers: list[tuple[bytes, bool]]) -> tuple[asyncio.Server, int, list[int]]:
    """A server that answers each request with the next (answer, close after it); counts
    connections."""
    conns: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
            answer, close = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if close:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def _run(answers: list[tuple[bytes, bool]], n: int) -> tuple[list[StreamTimer], list[int]]:
    server, port, conns = await _serve(answers)
    client = SSEClient("127.0.0.1", port)
    timers = []
    async with server:
        for _ in range(n):
            timer = StreamTimer(RequestRecord(), max_lines=100)
            await client.post("/v1/chat/completions", {}, timer)
            timers.append(timer)
        client.close()
    return timers, conns


def test_keep_alive_and_reconnect() -> None:
    ok = _chunked(_events(["a", "b"]), [7])
    closing = ok.replace(b"transfer-encoding", b"connection: close\r\ntransfer-encoding")
    timers, conns = asyncio.run(_run([(ok, False), (closing, True), (ok, False)], 3))
    assert [t.chunks for t in timers] == [2, 2, 2]
    assert len(conns) == 2  # the third request needed a new connection


def test_server_closing_mid_stream_is_an_error() -> None:
    cut = _chunked(_events(["a", "b"]), [7])[:-20]
    with pytest.raises(HTTPError, match="closed the connection"):
        asyncio.run(_run([(cut, True)], 1))
