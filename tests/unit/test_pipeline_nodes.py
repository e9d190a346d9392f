"""Two nodes on one host: `pagoda serve --nnodes 2 --node-rank 0` (the engine, stage 0) and
`pagoda worker --nnodes 2 --node-rank 1` (stage 1 only: started without --bus or --store, it never
talks to them) answer as one rank does. Killing node 1's process mid-stream ends the stream and
makes node 0 exit 1 within the collective timeout; SIGTERM to node 0 ends both nodes cleanly."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx

from pagoda.engine import LLM, SamplingParams
from tests.processes import Proc, free_port, wait_ready

TIMEOUT_S = 8.0  # --distributed-timeout
PROMPT = "The quick brown fox"


def _nodes(model: Path) -> tuple[Proc, Proc, str]:
    http, master = free_port(), free_port()
    nodes = ["-pp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master)]
    node1 = Proc("worker", "--model", str(model), *nodes, "--node-rank", "1")
    node0 = Proc(
        "serve", "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "16MiB", "--port", str(http), "--heartbeat-interval", "0.3",
        "--distributed-timeout", str(TIMEOUT_S), *nodes, "--node-rank", "0",
    )  # fmt: skip
    return node0, node1, f"http://127.0.0.1:{http}"


def _rank_pid(node1: Proc) -> int:
    found = re.search(r"ranks \[1\] started \(pids \[(\d+)\]\)", node1.output())
    assert found, node1.output()[-3000:]
    return int(found.group(1))


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_two_nodes_answer_as_one_rank_and_fail_or_stop_together(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model

    model = tmp_path / "tiny-llama"
    model.mkdir()
    make_tiny_model("llama", model, num_layers=3)
    killed0, killed1, base = _nodes(model)
    stopped0, stopped1, stopped_base = _nodes(model)
    procs = [killed0, killed1, stopped0, stopped1]
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        expected = (
            LLM(str(model), dtype="float32").generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].text
        )
        wait_ready(base, procs, timeout=120)
        wait_ready(stopped_base, procs[2:], timeout=120)
        assert "2 ranks (tensor 1 x pipeline 2) over 2 node(s); local followers []" in killed0.output()
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == expected, answer

        rank1 = _rank_pid(killed1)
        long = {**body, "max_tokens": 450, "stream": True}  # the tiny model's context is 512
        with httpx.stream("POST", f"{base}/v1/completions", json=long, timeout=60) as stream:
            assert stream.status_code == 200, stream.read()
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # mid-stream: steps are running
            killed1.p.send_signal(signal.SIGKILL)  # node 1's process: its rank follows it
            start = time.monotonic()
            rest = list(lines)  # the stream ends, it does not hang
        assert sum(line.startswith("data:") for line in rest) < 450, "not cut short by the kill"
        assert killed0.p.wait(TIMEOUT_S + 5) == 1, killed0.output()[-3000:]
        assert time.monotonic() - start < TIMEOUT_S, "node 0 outlived its collective timeout"
        assert _gone(rank1), f"node 1's rank {rank1} outlived its node process"

        rank1 = _rank_pid(stopped1)
        stopped0.p.send_signal(signal.SIGTERM)
        assert stopped0.p.wait(30) == 0, stopped0.output()[-3000:]
        assert stopped1.p.wait(15) == 0, stopped1.output()[-3000:]  # its rank got SHUTDOWN
        assert _gone(rank1)
    finally:
        for proc in procs:
            if proc.alive():
                proc.p.kill()
                proc.p.wait()
