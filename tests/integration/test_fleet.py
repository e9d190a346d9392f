"""Several models behind one gateway, over the real RabbitMQ and Redis: two tiny random models
(a Llama and a Qwen2) on a worker each, one tokenizer process and one gateway serving both, one
scheduler routing by model. Each request is answered by the model it names (greedy text equal to
that model run alone, offline); with one model's only worker killed, that model answers 503 and the
other keeps serving. alpha's worker speculates with a draft model (alpha with noise on its weights)
over a KV cache small enough to preempt: its greedy streams are still alpha's alone."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.core.cpu_threads import engine_threads
from pagoda.engine.tokenization.detokenizer import IncrementalDetokenizer
from tests.polling import block_until
from tests.processes import AMQP, REDIS, Proc, free_port, wait_ready
from tests.tiny_models import make_tiny_model, save_noisy_draft

pytestmark = pytest.mark.integration

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--compile", "off"]
MODELS = {"alpha": "llama", "beta": "qwen2"}  # served name -> tiny architecture
PROMPTS = [f"Tell me about {t} in a few words." for t in ("tides", "owls", "glass", "maps")]
MAX_TOKENS = 8
# w-alpha: draft_model speculation over 22 blocks of 4 tokens (two requests of PROMPTS outgrow it);
# a block takes 2 layers x K and V x 4 tokens x 2 heads x 16 dims x 4 bytes, twice (the draft's)
SPEC_ARGS = ["--block-size", "4", "--kv-cache-memory", str(22 * 2 * 2048), "--max-model-len", "88"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fleet")
    paths = {}
    for name, kind in MODELS.items():
        paths[name] = root / name
        paths[name].mkdir()
        model, _ = make_tiny_model(kind, paths[name])
        if name == "alpha":
            save_noisy_draft(model, root / "alpha-draft")
    spec = {"method": "draft_model", "model": str(root / "alpha-draft"), "num_speculative_tokens": 3}
    metrics_port = free_port()
    extra = {
        "alpha": [*SPEC_ARGS, "--speculative-config", json.dumps(spec), "--metrics-port", str(metrics_port)],
        "beta": [],
    }
    ns = f"pagoda-fleet-{uuid.uuid4().hex[:8]}"
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", ns, "--heartbeat-interval", "0.3"]
    both = [a for name in MODELS for a in ("--model", str(paths[name]), "--served-model-name", name)]
    port = free_port()
    workers = {
        name: Proc("worker", "--model", str(paths[name]), "--served-model-name", name, *ENGINE, *common,
                   "--worker-id", f"w-{name}", *extra[name])
        for name in MODELS
    }  # fmt: skip
    procs = [
        *workers.values(),
        Proc("scheduler", *common),
        Proc("tokenizer", *both, *ENGINE, *common),
        Proc("gateway", *both, *ENGINE, *common, "--port", str(port)),
    ]
    r = redis.Redis.from_url(REDIS)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, procs, timeout=300)
        block_until(lambda: r.scard(f"{ns}:workers") >= 2, 60, "both workers to register")
        yield {"base": base, "paths": paths, "workers": workers, "procs": procs, "metrics_port": metrics_port}
    finally:
        codes = {" ".join(p.args[:3]): p.stop() for p in procs}
        for key in r.scan_iter(f"{ns}:*"):
            r.delete(key)
        outputs = "\n".join(p.output()[-2000:] for p in procs)
        killed = workers["beta"].args[:3]
        assert all(c == 0 for a, c in codes.items() if a != " ".join(killed)), f"{codes}\n{outputs}"
        assert "Traceback" not in outputs, outputs


def _alone(path: Path, max_tokens: int = MAX_TOKENS) -> list[str]:
    """The model's greedy answers to PROMPTS, run offline in this process (no speculation), as the
    gateway writes them (incrementally: an unfinished UTF-8 character at the end is held back)."""
    llm = LLM(str(path), dtype="float32", compile="off")
    results = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return [
        IncrementalDetokenizer(llm.tokenizer, r.prompt_token_ids).add(r.outputs[0].token_ids) for r in results
    ]


async def _ask(base: str, asks: list[tuple[str, str]]) -> list[tuple[int, dict[str, Any]]]:
    """(model, prompt) completions at once; each (status, body)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(model: str, prompt: str) -> tuple[int, dict[str, Any]]:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            resp = await client.post("/v1/completions", json=body)
            return resp.status_code, resp.json()

        return list(await asyncio.gather(*(one(m, p) for m, p in asks)))


def test_models_are_listed_and_unknown_ones_are_404(fleet: dict[str, Any]) -> None:
    listed = httpx.get(f"{fleet['base']}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == list(MODELS)
    resp = httpx.post(f"{fleet['base']}/v1/completions", json={"model": "gamma", "prompt": "hi"})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"


def test_each_request_is_answered_by_its_model_then_a_lost_model_is_503(fleet: dict[str, Any]) -> None:
    expected = {name: _alone(fleet["paths"][name]) for name in MODELS}
    assert expected["alpha"] != expected["beta"], "the two tiny models must answer differently"
    asks = [(name, p) for _ in range(4) for name in MODELS for p in PROMPTS]  # 32, interleaved
    answers = asyncio.run(_ask(fleet["base"], asks))
    for (model, prompt), (status, body) in zip(asks, answers, strict=True):
        assert status == 200, body
        assert body["model"] == model
        assert body["choices"][0]["text"] == expected[model][PROMPTS.index(prompt)], (model, prompt)
    logs = {name: w.output() for name, w in fleet["workers"].items()}
    assert all(log.count("finished (length)") == 16 for log in logs.values()), "16 requests per model"

    fleet["workers"]["beta"].p.kill()  # its only worker: no drain, no goodbye
    block_until(
        lambda: asyncio.run(_ask(fleet["base"], [("beta", PROMPTS[0])]))[0][0] == 503, 30, "beta to be 503"
    )
    answers = asyncio.run(_ask(fleet["base"], [(name, p) for name in MODELS for p in PROMPTS]))
    for status, body in answers[: len(PROMPTS)]:  # alpha serves on
        assert status == 200, body
    assert [b["choices"][0]["text"] for _, b in answers[: len(PROMPTS)]] == expected["alpha"]
    for status, body in answers[len(PROMPTS) :]:
        assert status == 503 and "beta" in body["error"]["message"], body
    assert httpx.get(f"{fleet['base']}/health/ready").status_code == 200  # the gateway still serves


# Two of PROMPTS (~35 tokens) with 40 more each need 38 of w-alpha's 22 blocks of 4 tokens (one alone
# fits in 19), and 40 steps keep the four requests of one completion running together even when the
# services, loaded by the rest of the suite, hand them to the worker up to a second or two apart (at
# 16 tokens every run saw exactly one preemption, too close to none; at 40, four)
SPEC_TOKENS = 40
_COUNTERS = {
    "drafted": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
}


def _alpha_counters(fleet: dict[str, Any]) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{fleet['metrics_port']}/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {key: sum(s.value for s in samples if s.name == name) for key, name in _COUNTERS.items()}


async def _stream(base: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """One streamed greedy completion of all `prompts` (they reach the worker together); the text
    of each. Seeded, which changes nothing greedy but gets every step its k drafts: the adaptive
    policy would stop drafting with a draft as costly as its target."""
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
        stream = await client.completions.create(
            model=model, prompt=prompts, max_tokens=max_tokens, temperature=0, seed=0, stream=True
        )
        texts = [""] * len(prompts)
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    return texts


def test_a_draft_model_worker_streams_its_model_s_greedy_tokens(fleet: dict[str, Any]) -> None:
    """w-alpha speculates with a draft model (alpha with noise on its weights): a greedy stream of
    PROMPTS, which reach the worker at once and outgrow its KV cache (preemption, then prefix hits
    when the preempted one resumes), equals alpha's alone without speculation, with drafts
    accepted and rejected on the worker."""
    expected = _alone(fleet["paths"]["alpha"], SPEC_TOKENS)
    before = _alpha_counters(fleet)
    got = asyncio.run(_stream(fleet["base"], "alpha", PROMPTS, SPEC_TOKENS))
    seen = {k: v - before[k] for k, v in _alpha_counters(fleet).items()}
    print(f"w-alpha's counters over the streams: {seen}")
    assert got == expected
    assert seen["drafted"] > seen["accepted"] > 0, seen
    assert seen["preemptions"] > 0 and seen["prefix_hits"] > 0, seen


def test_pagoda_serve_hosts_two_models_in_one_process(fleet: dict[str, Any]) -> None:
    """`pagoda serve --model A --model B`: one engine per model on the in-memory bus."""
    port = free_port()
    models = [
        a for name in MODELS for a in ("--model", str(fleet["paths"][name]), "--served-model-name", name)
    ]
    proc = Proc("serve", *models, *ENGINE, "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [proc])
        asks = [(name, p) for name in MODELS for p in PROMPTS]
        answers = asyncio.run(_ask(base, asks))
        expected = {name: _alone(fleet["paths"][name]) for name in MODELS}
        got = {
            name: [b["choices"][0]["text"] for (m, _), (_, b) in zip(asks, answers, strict=True) if m == name]
            for name in MODELS
        }
        assert got == expected
        # the two engines split the CPUs' threads (each step thread's OpenMP pool within its share)
        assert engine_threads(0, engines=len(MODELS)).describe() in proc.output()
        metrics = httpx.get(f"{base}/metrics").text
        for name in MODELS:  # each engine's metrics under its own name
            assert (
                f'vllm:generation_tokens_total{{model_name="{name}"}} {len(PROMPTS) * MAX_TOKENS}' in metrics
            )
    finally:
        assert proc.stop() == 0, proc.output()
