"""bench serve's own peers: pagoda started twice (--launch, then without prefix caching) on the
sim backend, and HF transformers in-process (generate_batch and generate) on a tiny run."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from pagoda.load.datasets import BenchTurn
from pagoda.load.hf_peer import HfRun, format_hf_comparison, hf_comparison, turn_ids
from pagoda.load.peers import PEERS, PagodaServer
from pagoda.services.cli.main import main
from tests.unit.test_bench_serve import FakeOpenAI, fake  # noqa: F401  (the fixture)


def test_pagoda_peer_command() -> None:
    peer = PEERS["pagoda-no-prefix-cache"](model_path=None, serve_args=["--backend", "sim"])
    assert isinstance(peer, PagodaServer) and peer.name == "pagoda-no-prefix-cache"
    peer.port = 1234
    assert peer.command() == [
        sys.executable, "-m", "pagoda", "serve", "--backend", "sim", "--no-enable-prefix-caching",
        "--host", "127.0.0.1", "--port", "1234",
    ]  # fmt: skip


@pytest.mark.slow  # two `pagoda serve` starts
def test_launch_and_no_prefix_cache_peer(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench", "serve", "--launch", "--backend sim --sim-step-ms 2", "--peer", "pagoda-no-prefix-cache",
        "--dataset", "multi-turn", "--num-prompts", "4", "--num-turns", "2", "--system-len", "64",
        "--input-len", "16", "--output-len", "4", "--concurrency", "2", "--ignore-eos", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ours, peer = out["pagoda"], out["peer"]
    assert peer["name"] == "pagoda-no-prefix-cache"
    assert ours["completed"] == peer["completed"] == 4
    assert ours["output_tokens"] == peer["output_tokens"] == 16
    assert ours["input_tokens"] == peer["input_tokens"]  # the same prompts, the same tokenizer
    assert out["comparison"]["TTFT p50 (ms)"]["ratio"] > 0
    assert ours["meta"]["base_url"] != peer["meta"]["base_url"]


def test_hf_peer_tiny_run(
    hf_demo_model: Any,
    demo_checkpoint: Any,
    fake: tuple[FakeOpenAI, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pagoda.engine import loader
    from pagoda.load import hf_peer

    asked: list[tuple[str, int]] = []

    def load(path: str, dtype: str, threads: int) -> Any:
        asked.append((dtype, threads))
        return hf_demo_model

    monkeypatch.setattr(hf_peer, "load_hf_model", load)
    monkeypatch.setattr(loader, "load_checkpoint", lambda path: demo_checkpoint)
    _, url = fake
    argv = ["bench", "serve", "--base-url", url, "--peer", "hf", "--num-prompts", "2", "--input-len", "8",
            "--output-len", "3", "--concurrency", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pagoda"]["completed"] == 2
    hf = out["hf"]
    ours = hf_peer.pagoda_dtype()  # --hf-dtype auto: HF in the dtype pagoda serves in here
    assert asked == [(ours, hf_peer.pagoda_threads())]  # and with as many threads as pagoda
    assert list(hf) == [f"pagoda (server, {ours})", f"hf-generate_batch ({ours})", f"hf-generate ({ours})"]
    for name in (f"hf-generate_batch ({ours})", f"hf-generate ({ours})"):
        assert hf[name]["output_tokens"] == 6 and hf[name]["seconds"] > 0
        assert hf[name]["ratio"] == pytest.approx(
            out["pagoda"]["output_throughput"] / hf[name]["output_tok_s"]
        )


def test_turn_ids_and_table(demo_checkpoint: Any) -> None:
    tok = demo_checkpoint.tokenizer
    turn = BenchTurn(({"role": "user", "content": "hello there"},), 8, 4)
    chat = turn_ids(tok, turn, "chat")
    assert tok.decode(chat).count("hello there") == 1 and len(chat) > len(tok.encode("hello there"))
    assert turn_ids(tok, turn, "completions") == tok.encode("hello there")
    runs = [HfRun("hf-generate", 2, 10, 8, 2.0)]
    table = hf_comparison(8.0, runs, ("bfloat16", "float32"))
    assert table["hf-generate (float32)"]["ratio"] == 2.0  # 8 tok/s against 4
    assert "2.00x" in format_hf_comparison(table) and "pagoda (server, bfloat16)" in table


def test_pagoda_dtype_follows_the_launch_args() -> None:
    from pagoda.engine.config import cpu_has_fast_bf16
    from pagoda.load.hf_peer import pagoda_dtype

    assert pagoda_dtype(["--dtype", "float32"]) == pagoda_dtype(["--dtype=float32"]) == "float32"
    assert pagoda_dtype(["--port", "1"]) == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert pagoda_dtype(["--quantization", "int8"]) == "float32"  # as the engine runs CPU int8


STUB_SERVER = r"""
import http.server, json, sys
port, mode = int(sys.argv[1]), sys.argv[2]
say = lambda line: print(line, flush=True)
if mode != "compiled":
    say("INFO decode steps: eager until a background compile (log: x.log) saves the graphs")
done = 0

class Stub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer({"data": [{"id": "m"}]})

    def do_POST(self):
        global done
        self.rfile.read(int(self.headers["content-length"]))
        done += 1
        say(f"completion {done}")
        if mode == "eager" and done == 3:
            say("INFO decode steps (batch 1; 2 and more): compiled graphs now (compiled in 9s)")
        if mode == "fails" and done == 2:
            say("WARNING the background compile failed (exit 1); decode steps stay eager: see x.log")
        self.answer({})

http.server.HTTPServer(("127.0.0.1", port), Stub).serve_forever()
"""


class StubPagoda(PagodaServer):
    """A stand-in for `pagoda serve` that logs what a first start logs of its decode graphs."""

    def __init__(self, mode: str) -> None:
        super().__init__("stub", startup_timeout_s=30.0)
        self.mode = mode

    def command(self) -> list[str]:
        return [sys.executable, "-c", STUB_SERVER, str(self.port), self.mode]


@pytest.mark.parametrize(
    ("mode", "completions", "said"),
    [("compiled", 1, ""), ("eager", 3, "waiting for the background compile"), ("fails", 2, "stay eager")],
)
def test_launch_waits_for_a_first_start_s_compiled_decode_steps(
    mode: str, completions: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench serve --launch` measures the steps a server serves from then on: a first start that
    serves eagerly while its decode graphs compile is kept stepping (one-token completions) until
    its log says it adopted them, or that they failed; a server with graphs loaded is not held."""
    server = StubPagoda(mode)
    server.start()
    try:
        log = server._log_text()
    finally:
        server.stop()
    assert f"completion {completions}" in log and f"completion {completions + 1}" not in log, log
    assert said in capsys.readouterr().err
