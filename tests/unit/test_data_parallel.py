"""Data-parallel attention with expert parallelism on the CPU (gloo): two engines, each with its
own scheduler and KV cache and half of every MoE layer's experts, meeting at the MoE layers, give
the greedy tokens (and log-probs) of one engine holding everything; offline (`LLM`) and served
(`pagoda serve`, and `pagoda worker` over RabbitMQ and Redis: each rank a worker of its own, the
cluster scheduler spreading requests), with a
rank that has nothing to run serving the other's tokens through its experts; served also as two
engines of two tensor-parallel ranks each (test_data_parallel_tp.py has that layout offline)."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pagoda.engine import LLM, SamplingParams
from tests.processes import AMQP, REDIS, Proc, free_port, wait_ready

PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 75)), [7, 8, 9]]
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (8, 3, 12)]


def _tiny(kind: str, root: Path) -> Path:
    from tests.tiny_moe_models import make_tiny_moe

    path = root / kind
    path.mkdir()
    make_tiny_moe(kind, path)
    return path


def _generate(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return (
        [o.outputs[0].token_ids for o in outs],
        [[lp.logprob for lp in o.outputs[0].logprobs or []] for o in outs],
    )


@pytest.mark.parametrize(("kind", "num_experts"), [("mixtral", 4), ("qwen3_moe", 8)])
def test_two_engines_give_one_engines_greedy_tokens(tmp_path: Path, kind: str, num_experts: int) -> None:
    model = _tiny(kind, tmp_path)
    tokens, logprobs = _generate(LLM(str(model), dtype="float32", kv_cache_memory=1 << 22))
    dp = LLM(
        str(model), dtype="float32", kv_cache_memory=1 << 22, data_parallel_size=2,
        enable_expert_parallel=True, collective_timeout_s=20.0,
    )  # fmt: skip
    engines = dp.engine.engines  # type: ignore[attr-defined]
    try:
        dp_tokens, dp_logprobs = _generate(dp)
        assert [e.dp.rank for e in engines] == [0, 1]
        for engine in engines:  # each its half of the experts, whole, and a KV cache of its own
            experts = {b.experts.num_experts for b in engine.moe_blocks}
            assert experts == {num_experts // 2}, experts
            assert engine.moe_blocks[0].plan.first_expert == engine.dp.rank * num_experts // 2
        assert engines[0].kv is not engines[1].kv
        # prompts 0 and 2 went to one engine, prompt 1 to the other (the fewest waiting): the
        # engine that finished first served the other's tokens through its experts, idle
        assert dp.engine.requests_per_engine == [2, 1]  # type: ignore[attr-defined]
        assert sum(e.dummy_passes for e in engines) > 0
        assert dp_tokens == tokens
        for got, want in zip(dp_logprobs, logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    finally:
        dp.engine.close()


def test_a_failed_rank_fails_the_others_within_the_collective_timeout(tmp_path: Path) -> None:
    """Rank 1's step fails before its round's collective: rank 0, waiting there, fails after
    --distributed-timeout rather than hanging (and its engine with it, as any failed step)."""
    dp = LLM(
        str(_tiny("mixtral", tmp_path)), dtype="float32", kv_cache_memory=1 << 22, data_parallel_size=2,
        enable_expert_parallel=True, collective_timeout_s=2.0,
    )  # fmt: skip
    engines = dp.engine.engines  # type: ignore[attr-defined]

    def broken() -> list[object]:
        raise RuntimeError("rank 1 broke")

    engines[1].step = broken
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            dp.generate(PROMPTS, PARAMS, use_tqdm=False)
        waited = time.monotonic() - start
        assert "Timed out" in str(err.value)  # rank 0's own failure, in the round's collective
        assert 1.5 < waited < 15, waited
    finally:
        dp.engine.close()


def _stack(model: Path, mode: str) -> tuple[list[Proc], str, str]:
    """(processes, the gateway's URL, the worker's metrics URL): `pagoda serve`, or the four
    services as processes of their own over the real RabbitMQ and Redis."""
    engine = [
        "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "16MiB", "--heartbeat-interval", "0.3",
    ]  # fmt: skip
    dp = ["--data-parallel-size", "2", "--enable-expert-parallel", "--distributed-timeout", "10"]
    if mode == "embedded-tp2":  # two engines of two ranks each, a follower process apiece
        dp += ["--tensor-parallel-size", "2"]
    port = free_port()
    if mode.startswith("embedded"):
        return [Proc("serve", *engine, *dp, "--port", str(port))], f"http://127.0.0.1:{port}", ""
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", f"pagoda-dp-{uuid.uuid4().hex[:8]}"]
    metrics = free_port()
    procs = [
        Proc("worker", *engine, *common, *dp, "--worker-id", "d", "--metrics-port", str(metrics)),
        Proc("scheduler", *common, "--heartbeat-interval", "0.3"),
        Proc("tokenizer", *engine, *common),
        Proc("gateway", *engine, *common, "--port", str(port)),
    ]
    return procs, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}"


@pytest.mark.parametrize(
    "mode", ["embedded", "embedded-tp2", pytest.param("cluster", marks=pytest.mark.integration)]
)
def test_served_ranks_are_workers_of_their_own_and_answer_as_one(tmp_path: Path, mode: str) -> None:
    """Qwen2-MoE (a shared expert, whole on each rank; a dense layer): one request alone (the
    idle rank woken to serve it), then four at once, spread over both workers."""
    model = _tiny("qwen2_moe", tmp_path)
    prompts = ["The quick brown fox", "Hello there", "A B C D E F", "once upon a time"]
    one = LLM(str(model), dtype="float32")
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    expected = [
        [lp.logprob for lp in o.outputs[0].logprobs or []]
        for o in one.generate(prompts, greedy, use_tqdm=False)
    ]
    procs, base, metrics_url = _stack(model, mode)
    try:
        wait_ready(base, procs, timeout=180)
        ready = re.findall(r"worker (\S+) ready on (\S+) \(tiny\)", procs[0].output())
        workers = {worker for worker, _ in ready}
        assert len(workers) == 2, procs[0].output()[-3000:]  # two queues, two ids
        if mode == "cluster":
            assert workers == {"d-dp0", "d-dp1"}
        if mode == "embedded-tp2":
            assert procs[0].output().count("tensor parallel: 2 ranks (1 followers started") == 2

        def ask(prompt: str) -> list[float]:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0}
            answer = httpx.post(f"{base}/v1/completions", json={**body, "ignore_eos": True}, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["logprobs"]["token_logprobs"]  # type: ignore[no-any-return]

        assert ask(prompts[0]) == pytest.approx(expected[0], abs=1e-4)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, prompts))
        for got, want in zip(answers, expected, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
        metrics = httpx.get(f"{metrics_url or base}/metrics", timeout=10).text
        queried = re.findall(r'vllm:prefix_cache_queries_total\{[^}]*engine="([^"]+)"[^}]*\} (\S+)', metrics)
        assert {engine for engine, tokens in queried if float(tokens) > 0} == workers, queried  # both served
        codes = [p.stop() for p in procs]
        assert codes == [0] * len(procs), "\n".join(p.output()[-2000:] for p in procs)
    finally:
        for proc in procs:
            if proc.alive():
                proc.p.kill()
                proc.p.wait()
