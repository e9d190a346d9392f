"""`pagoda serve --tensor-parallel-size 2` as a real process (embedded: nothing else running):
it answers as one rank does; a follower rank killed mid-stream ends the stream and makes the
process exit 1 within the collective timeout (its requests would fail over to other workers);
SIGTERM ends every rank cleanly."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx

from pagoda.engine import LLM, SamplingParams
from tests.processes import Proc, free_port, wait_ready

TIMEOUT_S = 10.0  # --distributed-timeout
PROMPT = "The quick brown fox"


def _serve(model: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "serve", "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "16MiB", "--port", str(port), "--heartbeat-interval", "0.3",
        "--tensor-parallel-size", "2", "--distributed-timeout", str(TIMEOUT_S),
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _follower_pid(proc: Proc) -> int:
    found = re.search(r"followers started, pids \[(\d+)\]", proc.output())
    assert found, proc.output()[-3000:]
    return int(found.group(1))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_served_ranks_answer_as_one_die_together_and_stop_together(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model

    model = tmp_path / "tiny-llama"
    model.mkdir()
    make_tiny_model("llama", model)
    killed, base = _serve(model)
    stopped, stopped_base = _serve(model)
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        expected = (
            LLM(str(model), dtype="float32").generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].text
        )
        wait_ready(base, [killed, stopped], timeout=120)
        wait_ready(stopped_base, [stopped], timeout=120)
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == expected, answer

        follower = _follower_pid(killed)
        long = {**body, "max_tokens": 450, "stream": True}  # the tiny model's context is 512
        with httpx.stream("POST", f"{base}/v1/completions", json=long, timeout=60) as stream:
            assert stream.status_code == 200, stream.read()
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # mid-stream: steps are running
            os.kill(follower, signal.SIGKILL)
            start = time.monotonic()
            rest = list(lines)  # the stream ends (with an error), it does not hang
        assert not any("[DONE]" in line for line in rest) or any("error" in line for line in rest), rest[-3:]
        assert sum(line.startswith("data:") for line in rest) < 450  # cut short by the kill
        assert killed.p.wait(TIMEOUT_S + 5) == 1, killed.output()[-3000:]
        assert time.monotonic() - start < TIMEOUT_S, "the worker outlived its collective timeout"
        # mid-step the collective with the dead rank fails (gloo: its connection closed); between
        # steps the liveness check names the rank
        stopped_why = re.search(r"its engine stopped \((.*)\)", killed.output())
        assert stopped_why, killed.output()[-3000:]
        assert any(why in stopped_why[1] for why in (f"rank 1 (pid {follower}) exited", "by peer")), (
            stopped_why[1]
        )

        other = _follower_pid(stopped)
        stopped.p.send_signal(signal.SIGTERM)
        assert stopped.p.wait(30) == 0, stopped.output()[-3000:]
        assert _gone(other), f"follower {other} outlived its engine"
    finally:
        for proc in (killed, stopped):
            if proc.alive():
                proc.p.kill()
                proc.p.wait()
