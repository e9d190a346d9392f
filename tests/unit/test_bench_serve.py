"""`pagoda bench serve`: summarize on synthetic records, data sets, and whole runs against an
in-process fake OpenAI streaming server (uvicorn on a free 127.0.0.1 port in a thread)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pagoda.load import peers
from pagoda.load.bench_serve import compare, format_comparison
from pagoda.load.datasets import DatasetSpec, load_dataset
from pagoda.load.hf_peer import pagoda_threads
from pagoda.load.peers import LlamaCppPythonPeer, LlamaServerPeer, PeerError
from pagoda.load.serve_runner import RequestRecord, ServeConfig, parse_slo, run_benchmark, summarize
from pagoda.services.cli.main import main

FIRST_DELAY_S = 0.05  # fake server: before the first content chunk
GAP_S = 0.02  # fake server: between content chunks


class FakeOpenAI:
    """Streams max_tokens one-word chunks with known delays; counts requests in flight.

    Model "broken" answers HTTP 400; model "slow" waits 5 s before its first chunk; model "merged"
    sends two tokens per chunk and no usage, ending with finish_reason "length" (llama-cpp-python).
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak = 0
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/v1/completions", self.complete, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model"}, {"id": "other"}]})

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"count": 2 * len(body["prompt"].split()), "tokens": []})

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if body["model"] == "broken":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=400)
        chat = request.url.path.endswith("/chat/completions")
        first_delay = 5.0 if body["model"] == "slow" else FIRST_DELAY_S
        return StreamingResponse(self._events(body, chat, first_delay), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any], chat: bool, first_delay: float) -> AsyncIterator[str]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            n = int(body["max_tokens"])
            merged = body["model"] == "merged"
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n // 2 if merged else n):
                await asyncio.sleep(first_delay if i == 0 else GAP_S)
                text = " tok tok" if merged else " tok"
                piece = {"delta": {"content": text}} if chat else {"text": text}
                yield _sse({"choices": [{"index": 0, **piece}]})
            if merged:
                yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            else:
                yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "fake server did not start within 10 s"
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10.0)
    sock.close()


# --- summarize ---------------------------------------------------------------------------------


def _rec(start: float, ttft: float, e2e: float, tokens: int, error: str = "") -> RequestRecord:
    gaps = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestRecord(start, ttft, e2e, gaps, prompt_tokens=10, completion_tokens=tokens, error=error)


def test_summarize_percentiles_goodput_and_errors() -> None:
    ttfts = [0.01 * (i + 1) for i in range(100)]  # 10 ms .. 1000 ms
    records = [_rec(float(i), t, t + 0.9, 10) for i, t in enumerate(ttfts)]
    records.append(_rec(0.0, 0.0, 0.0, 0, error="HTTP 500: boom"))
    records.append(_rec(0.0, 0.0, 0.0, 0, error="second"))
    r = summarize(records, duration=50.0, slo={"ttft": 505.0, "tpot": 101.0})

    assert (r.completed, r.failed, r.first_error) == (100, 2, "HTTP 500: boom")
    assert r.output_tokens == 1000 and r.input_tokens == 1000
    assert r.request_throughput == pytest.approx(2.0)
    assert r.output_throughput == pytest.approx(20.0)
    assert r.total_token_throughput == pytest.approx(40.0)
    ms = np.array(ttfts) * 1000
    assert r.ttft.count == 100
    assert r.ttft.mean == pytest.approx(ms.mean())
    assert (r.ttft.p50, r.ttft.p90, r.ttft.p99) == pytest.approx(tuple(np.percentile(ms, [50, 90, 99])))
    assert r.tpot.mean == pytest.approx(100.0)  # 900 ms over 9 gaps
    assert r.itl.count == 900 and r.itl.p99 == pytest.approx(100.0)
    assert r.e2e.p50 == pytest.approx(np.percentile(ms + 900, 50))
    assert r.goodput == pytest.approx(50 / 50.0)  # ttft <= 500 ms: the first 50
    assert r.peak_concurrency == 2  # each lasts ~1-2 s and one starts every second


def test_summarize_edge_cases() -> None:
    r = summarize([_rec(0.0, 0.1, 0.1, 1)], duration=1.0, slo={})
    assert r.goodput is None and r.tpot.count == 0 and r.itl.count == 0 and r.ttft.count == 1
    r = summarize([_rec(0.0, 0.0, 0.0, 0, error="x")], duration=1.0, slo={"e2e": 1.0})
    assert r.completed == 0 and r.goodput == 0.0 and r.e2e.mean == 0.0


def test_parse_slo() -> None:
    assert parse_slo("ttft=500, tpot=50,e2el=9000") == {"ttft": 500.0, "tpot": 50.0, "e2e": 9000.0}
    assert parse_slo(None) == {}
    for bad in ("ttft", "foo=1", "ttft=-3", "tpot=abc"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


# --- data sets ---------------------------------------------------------------------------------


def test_random_dataset_deterministic_and_sized() -> None:
    spec = DatasetSpec(
        name="random", num_prompts=5, input_len=100, output_len=16, seed=3, tokens_per_word=2.0
    )
    a, b = load_dataset(spec), load_dataset(spec)
    assert a == b and len(a) == 5
    assert load_dataset(replace(spec, seed=4)) != a
    for (turn,) in a:
        assert len(turn.prompt().split()) == 50  # 100 tokens at 2 tokens per word
        assert (turn.input_len, turn.output_len) == (100, 16)
    assert len({turn.prompt() for (turn,) in a}) == 5


def test_multi_turn_prefixes_grow() -> None:
    spec = DatasetSpec(
        name="multi-turn", num_prompts=7, input_len=20, output_len=8, num_turns=3, system_len=64
    )
    convs = load_dataset(spec)
    assert convs == load_dataset(spec)
    assert len(convs) == 3 and all(len(c) == 3 for c in convs)  # ceil(7 / 3) conversations
    system = convs[0][0].messages[0]
    for conv in convs:
        for k, turn in enumerate(conv):
            assert turn.messages[0] == system and system["role"] == "system"
            assert len(turn.messages) == 2 + 2 * k and turn.messages[-1]["role"] == "user"
            assert turn.input_len == 64 + 20 * (k + 1) + 8 * k
            if k:
                prev = conv[k - 1].messages
                assert turn.messages[: len(prev)] == prev
                assert turn.messages[len(prev)]["role"] == "assistant"
    assert convs[0][0].messages[1] != convs[1][0].messages[1]


def test_sharegpt_parsing(tmp_path: Path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "a b"}]},
        {"conversations": [{"from": "gpt", "value": "orphan"}]},
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "hi there"},
                {"from": "gpt", "value": "x y z w"},
            ]
        },
        {"id": "no conversations"},
        {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "empty prompt"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    spec = DatasetSpec(name="sharegpt", num_prompts=10, seed=1, sharegpt_path=str(path))
    convs = load_dataset(spec)
    assert convs == load_dataset(spec) and all(len(c) == 1 for c in convs)
    got = sorted((c[0].prompt(), c[0].input_len, c[0].output_len) for c in convs)
    assert got == [("hi there", 2, 4), ("one two three", 3, 2)]
    assert len(load_dataset(replace(spec, num_prompts=1))) == 1
    assert {c[0].output_len for c in load_dataset(replace(spec, output_len=9))} == {9}
    with pytest.raises(ValueError, match="--sharegpt-path"):
        load_dataset(replace(spec, sharegpt_path=None))
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(replace(spec, sharegpt_path=str(tmp_path / "missing.json")))


# --- whole runs against the fake server ---------------------------------------------------------


async def test_closed_loop_chat_run(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    spec = DatasetSpec(name="random", num_prompts=8, input_len=32, output_len=5)
    cfg = ServeConfig(
        base_url=url + "/v1",
        concurrency=2,
        dataset=spec,
        ignore_eos=True,
        progress=False,
        slo={"ttft": 5000.0},
    )
    r = await run_benchmark(cfg)

    assert (r.completed, r.failed) == (8, 0), r.first_error
    assert r.output_tokens == 40 and r.input_tokens == 8 * 7  # from usage
    assert r.meta["model"] == "fake-model" and r.meta["length_source"] == "tokenize"
    assert r.meta["tokens_per_word"] == 2.0
    assert server.peak == 2 and r.peak_concurrency <= 2  # never more than --concurrency in flight
    assert FIRST_DELAY_S * 1e3 * 0.8 <= r.ttft.p50 <= 2000.0
    assert r.itl.count == 8 * 4
    assert GAP_S * 1e3 * 0.5 <= r.itl.p50 <= 500.0
    assert GAP_S * 1e3 * 0.5 <= r.tpot.mean <= 500.0
    assert r.e2e.mean >= (FIRST_DELAY_S + 4 * GAP_S) * 1e3 * 0.8
    assert r.goodput == pytest.approx(r.request_throughput)
    body = server.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert len(body["messages"][0]["content"].split()) == 16  # 32 tokens at 2 tokens per word


async def test_multi_turn_open_loop_completions(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    spec = DatasetSpec(name="multi-turn", num_prompts=6, input_len=4, output_len=3, num_turns=3, system_len=8)
    cfg = ServeConfig(
        base_url=url,
        model="m",
        endpoint="completions",
        request_rate=100.0,
        dataset=spec,
        tokenize=False,
        progress=False,
    )
    r = await run_benchmark(cfg)

    assert (r.completed, r.failed, r.output_tokens) == (6, 0, 18), r.first_error
    assert r.meta["length_source"] == "words"
    assert all("ignore_eos" not in b and b["model"] == "m" for b in server.bodies)
    prompts = [b["prompt"] for b in server.bodies]
    for conv in load_dataset(spec):  # turns of one conversation arrive in order
        seen = [p for p in prompts if p.startswith(conv[0].prompt())]
        assert seen == [t.prompt() for t in conv]


async def test_errors_and_timeouts_are_recorded(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    spec = DatasetSpec(name="random", num_prompts=3, input_len=8, output_len=2)
    r = await run_benchmark(ServeConfig(base_url=url, model="broken", dataset=spec, progress=False))
    assert (r.completed, r.failed) == (0, 3) and r.first_error.startswith("HTTP 400")
    cfg = ServeConfig(base_url=url, model="slow", dataset=spec, progress=False, request_timeout_s=0.3)
    t0 = time.perf_counter()
    r = await run_benchmark(cfg)
    assert (r.completed, r.failed) == (0, 3) and "--timeout" in r.first_error
    assert time.perf_counter() - t0 < 3.0


async def test_no_usage_counts_length_finish_as_max_tokens(fake: tuple[FakeOpenAI, str]) -> None:
    _, url = fake
    spec = DatasetSpec(name="random", num_prompts=2, input_len=8, output_len=6)
    r = await run_benchmark(ServeConfig(base_url=url, model="merged", dataset=spec, progress=False))
    assert (r.completed, r.output_tokens) == (2, 12), r.first_error  # 3 chunks each, 6 tokens
    assert r.input_tokens == 2 * 8 and r.itl.count == 2 * 2


def test_cli_json(fake: tuple[FakeOpenAI, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = fake
    argv = [
        "bench",
        "serve",
        "--base-url",
        url,
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--concurrency",
        "4",
        "--slo",
        "ttft=2000,tpot=500",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completed"] == 4 and out["output_tokens"] == 12 and out["goodput"] > 0
    assert set(out["ttft"]) == {"count", "mean", "p50", "p90", "p99"}
    assert main([*argv[:-1]]) == 0  # the table
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert main(["bench", "serve", "--base-url", url, "--concurrency", "0"]) == 2


# --- --peer: comparison, peer process, CLI with a fake peer -------------------------------------


def test_compare_ratios_and_table() -> None:
    ours = summarize([_rec(0.0, 0.1, 1.1, 11), _rec(1.0, 0.3, 1.3, 11)], duration=2.0, slo={})
    peer = summarize([_rec(0.0, 0.2, 2.2, 11), _rec(2.0, 0.2, 2.2, 11)], duration=4.0, slo={})
    rows = compare(ours, peer)
    out = rows["Output token throughput (tok/s)"]
    assert (out["pagoda"], out["peer"], out["ratio"]) == pytest.approx((11.0, 5.5, 2.0))
    ttft = rows["TTFT p50 (ms)"]
    assert (ttft["pagoda"], ttft["peer"], ttft["ratio"]) == pytest.approx((200.0, 200.0, 1.0))
    assert rows["ITL p50 (ms)"]["ratio"] == pytest.approx(0.5)  # 100 ms vs 200 ms
    assert rows["TPOT p50 (ms)"]["pagoda"] == pytest.approx(100.0)
    assert rows["Failed requests"]["ratio"] is None  # 0 / 0
    text = format_comparison(ours, peer, "llama.cpp")
    assert "pagoda vs llama.cpp" in text and "2.00x" in text and "0.50x" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("Failed requests"))
    assert line.split()[-1] == "-"


def test_llama_cpp_python_command_and_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    peer = LlamaCppPythonPeer(model_path=str(gguf), n_ctx=2048, n_threads=2, port=1234)
    assert peer.name == "llama-cpp-python"  # one request at a time: never called llama.cpp
    cmd = peer.command()
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags["--model"] == str(gguf) and flags["--port"] == "1234" and flags["--host"] == "127.0.0.1"
    assert (flags["--n_ctx"], flags["--n_threads"]) == ("2048", "2")
    assert flags["--interrupt_requests"] == "False"  # queue concurrent requests, do not cut them
    assert "--chat_format" not in flags  # the template comes from the GGUF metadata

    real = peers.importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    with pytest.raises(PeerError, match=r"pip install 'llama-cpp-python\[server\]'"):
        LlamaCppPythonPeer(model_path=str(gguf)).start()


STUB_LLAMA_SERVER = """#!{python}
# stands in for llama.cpp's llama-server: records its argv, answers /health, stops on SIGTERM
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
open({argv_file!r}, "w").write(json.dumps(sys.argv[1:]))
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{{"status": "ok"}}')
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def test_llama_server_peer_runs_at_full_strength(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--peer llamacpp` is llama.cpp's own server: one slot per concurrent stream, their total
    context, the same threads (a stub binary stands in: a real build takes ~20 minutes)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    argv_file = tmp_path / "argv.json"
    stub = tmp_path / "llama-server"
    stub.write_text(STUB_LLAMA_SERVER.format(python=sys.executable, argv_file=str(argv_file)))
    stub.chmod(0o755)
    monkeypatch.setenv("PAGODA_LLAMA_SERVER", str(stub))
    peer = peers.make_peer("llamacpp", model_path=str(gguf), n_ctx=1024, n_threads=2, slots=16)
    assert isinstance(peer, LlamaServerPeer) and peer.name == "llama.cpp"
    with peer:
        assert httpx.get(peer.base_url + "/health").status_code == 200
        proc = peer._proc
        assert proc is not None
    assert proc.poll() is not None  # stopped
    got = json.loads(argv_file.read_text())
    flags = dict(zip(got[::2], got[1::2], strict=True))
    assert flags["-m"] == str(gguf) and flags["--port"] == peer.base_url.rsplit(":", 1)[1]
    assert (flags["-np"], flags["-c"], flags["-t"], flags["-tb"]) == ("16", str(16 * 1024), "2", "2")


def test_llama_server_missing_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PAGODA_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert peers.llama_server_path() is None
    with pytest.raises(PeerError, match="make llama-server"):
        LlamaServerPeer().check()
    monkeypatch.setenv("PAGODA_LLAMA_SERVER", str(tmp_path / "nowhere"))
    with pytest.raises(PeerError, match="is not executable"):
        LlamaServerPeer().check()


def test_make_llama_server_builds_for_this_cpu(tmp_path: Path) -> None:
    """`make llama-server` (a dry run here) builds llama.cpp's server target for this CPU where
    llama_server_path() finds it."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        ["make", "-n", "-C", str(root), "llama-server", f"HOME={tmp_path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--target llama-server" in out and "-DGGML_NATIVE=ON" in out
    assert "-mno-amx-int8" in out  # GCC 12 builds of its AMX path crash on AMX CPUs
    built = tmp_path / ".cache/pagoda/llama.cpp/build/bin/llama-server"
    assert f"-B {tmp_path}/.cache/pagoda/llama.cpp/build" in out
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PAGODA_LLAMA_SERVER", raising=False)
        mp.setenv("PATH", str(tmp_path))
        mp.setenv("HOME", str(tmp_path))
        assert peers.llama_server_path() == built


def test_cli_missing_peer_fails_before_running(
    fake: tuple[FakeOpenAI, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server, url = fake
    monkeypatch.setattr(peers, "llama_server_path", lambda: None)
    argv = ["bench", "serve", "--base-url", url, "--peer", "llamacpp", "--num-prompts", "2", "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make llama-server" in err
    assert server.bodies == []  # nothing was sent


class FakePeer:
    """Stands in for a peer server: "starts" by pointing at the test's fake server."""

    name = "fakepeer"
    url = ""
    events: list[str] = []  # noqa: RUF012

    def __init__(self, model_path: str | None, n_ctx: int, n_threads: int, slots: int) -> None:
        self.events.append(f"init n_ctx={n_ctx} n_threads={n_threads} slots={slots}")

    @property
    def base_url(self) -> str:
        return self.url

    def check(self) -> None:
        self.events.append("check")

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")


def test_cli_with_fake_peer(
    fake: tuple[FakeOpenAI, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server, url = fake
    monkeypatch.setattr(FakePeer, "url", url)
    monkeypatch.setattr(FakePeer, "events", [])
    monkeypatch.setitem(peers.PEERS, "llamacpp", FakePeer)
    argv = [
        "bench",
        "serve",
        "--base-url",
        url,
        "--model",
        "pagoda-name",
        "--peer",
        "llamacpp",
        "--peer-n-ctx",
        "1024",
        "--num-prompts",
        "3",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--concurrency",
        "2",
        "--ignore-eos",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    threads = pagoda_threads()  # as many as pagoda's --threads 0 takes here
    assert FakePeer.events == [f"init n_ctx=1024 n_threads={threads} slots=2", "check", "start", "stop"]
    assert out["pagoda"]["completed"] == 3 and out["peer"]["completed"] == 3
    assert out["peer"]["name"] == "fakepeer"
    assert out["comparison"]["Output token throughput (tok/s)"]["ratio"] > 0
    assert out["peer"]["meta"]["tokens_per_word"] == out["pagoda"]["meta"]["tokens_per_word"] == 2.0
    ours, theirs = server.bodies[:3], server.bodies[3:]
    assert len(theirs) == 3
    assert {b["model"] for b in ours} == {"pagoda-name"} and {b["model"] for b in theirs} == {"fake-model"}
    assert all(b["ignore_eos"] and "min_tokens" not in b for b in ours)
    assert all(b["ignore_eos"] and b["min_tokens"] == 4 for b in theirs)  # llama-cpp-python's spelling
    prompts = sorted(json.dumps(b["messages"]) for b in ours)
    assert prompts == sorted(json.dumps(b["messages"]) for b in theirs)  # the same requests

    assert main(argv[:-1]) == 0  # tables: pagoda's, the peer's, the comparison
    text = capsys.readouterr().out
    assert text.count("Serving Benchmark Result") == 2 and "pagoda vs fakepeer" in text


def test_the_peers_get_pagodas_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """--peer-threads 0: the peer steps with as many threads as the launched pagoda."""
    assert pagoda_threads(["--threads", "3"]) == 3
    monkeypatch.setattr("pagoda.engine.core.cpu_threads.affinity_cpus", lambda: 1)
    assert pagoda_threads([]) == 1  # torch's count, capped by the one usable CPU
