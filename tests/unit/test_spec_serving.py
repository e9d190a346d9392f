"""Speculative decoding through the services as `pagoda serve` wires them in one process (gateway,
tokenizer, scheduler and worker on the in-memory bus): greedy completions over HTTP equal the
offline engine's without speculation, a stop string is found inside a step's several tokens, and
GET /metrics exports vLLM's `vllm:spec_decode_*` counters. Also the flag: `--speculative-config`
reaches the engine config, and a bad one is a one-line CLI error naming the fix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import CacheConfig, EngineConfig
from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.engine_args import engine_config_from_args
from pagoda.services.cli.main import main
from pagoda.services.cli.parser import build_parser
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.gateway.server import build_app
from pagoda.services.ops.metrics import Metrics
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = [
    "Repeat this list exactly: apples, bananas, cherries, dates, elderberries, figs, grapes. Again: apples,",
    "One, two, three, four, five, six, seven, eight, nine, ten. One, two, three,",
]
MAX_TOKENS = 20
LEN = 512


@pytest.fixture
async def served(demo_checkpoint: Any) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    bus, store, metrics = InMemoryBus(), InMemoryStore(), Metrics()
    cfg = EngineConfig(
        dtype="float32",
        max_model_len=LEN,
        cache=CacheConfig(kv_cache_memory=64 << 20),
        speculative_config=SPEC,
    )
    worker = WorkerService(
        AsyncEngine(EngineCore(cfg, checkpoint=demo_checkpoint)),
        bus,
        store,
        worker_id="w0",
        heartbeat_s=0.1,
        metrics=metrics,
    )
    tok, name = demo_checkpoint.tokenizer, worker.engine.model_name
    gateway = BusFrontend(bus, tok, model_name=name, max_model_len=LEN, registry=WorkerRegistry(store, 0.1))
    services = [
        worker,
        SchedulerService(bus, store, heartbeat_s=0.1),
        TokenizerService(bus, PromptProcessor(tok, LEN), name),
        gateway,
    ]
    for s in services:
        await s.start()
    try:
        for _ in range(100):
            if gateway.is_ready():
                break
            await asyncio.sleep(0.05)
        app = build_app(gateway, metrics=metrics)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            yield client, name
    finally:
        for s in reversed(services):
            await s.stop()


def _spec_samples(text: str) -> dict[tuple[str, str], float]:
    """(sample name, position label) -> value of the vllm:spec_decode_* samples."""
    return {
        (s.name, s.labels.get("position", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:spec_decode_") and s.labels.get("engine") == "w0"
    }


async def test_greedy_completions_stop_strings_and_metrics(
    demo_checkpoint: Any, served: tuple[httpx.AsyncClient, str]
) -> None:
    client, model = served
    offline = LLM.__new__(LLM)
    offline.engine = EngineCore(EngineConfig(dtype="float32", max_model_len=LEN), checkpoint=demo_checkpoint)
    offline.tokenizer, offline._next_id = offline.engine.tokenizer, 0
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = [r.outputs[0].text for r in offline.generate(PROMPTS, greedy, use_tqdm=False)]
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    for prompt, text in zip(PROMPTS, want, strict=True):
        resp = await client.post("/v1/completions", json={**body, "prompt": prompt})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == text
    # streamed (the lean SSE path): several tokens arrive per step, the text is the same
    async with client.stream(
        "POST", "/v1/completions", json={**body, "prompt": PROMPTS[0], "stream": True}
    ) as r:
        events = [
            json.loads(line[6:]) for line in [x async for x in r.aiter_lines()] if line[6:].startswith("{")
        ]
    texts = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    assert "".join(texts) == want[0] and len(texts) < MAX_TOKENS  # some events carry several tokens
    # a stop string a few words into a copied run (steps there emit several tokens at once)
    stop = want[1][len(want[1]) // 2 : len(want[1]) // 2 + 4]
    resp = await client.post("/v1/completions", json={**body, "prompt": PROMPTS[1], "stop": [stop]})
    choice = resp.json()["choices"][0]
    assert choice["text"] == want[1][: want[1].index(stop)] and choice["finish_reason"] == "stop"

    s = _spec_samples((await client.get("/metrics")).text)
    drafts, tokens = (
        s[("vllm:spec_decode_num_drafts_total", "")],
        s[("vllm:spec_decode_num_draft_tokens_total", "")],
    )
    accepted = s[("vllm:spec_decode_num_accepted_tokens_total", "")]
    assert drafts > 0 and tokens > accepted > 0, s
    per_pos = [s[("vllm:spec_decode_num_accepted_tokens_per_pos_total", str(i))] for i in range(4)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)


def test_flag_reaches_the_engine_config_and_bad_ones_are_cli_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = ["worker", "--bus", "amqp://x", "--store", "redis://x"]
    args = build_parser().parse_args([*worker, "--speculative-config", json.dumps(SPEC)])
    spec = engine_config_from_args(args).speculative_config
    assert spec is not None and (spec.method, spec.num_speculative_tokens, spec.lookup_sizes) == (
        "ngram",
        4,
        (1, 3),
    )
    assert engine_config_from_args(build_parser().parse_args(["serve"])).speculative_config is None
    for value, says in [
        ("{method: ngram}", "--speculative-config is not valid JSON"),
        ('{"method": "ngram"}', "needs num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "k": 2}', "unknown key(s) 'k'"),
        (
            '{"method": "draft_model", "num_speculative_tokens": 3}',
            'needs "model"',
        ),
        ('{"method": "layer_skip", "num_speculative_tokens": 3}', "'layer_skip' is not implemented"),
    ]:
        assert main(["serve", "--speculative-config", value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pagoda: error: ") and says in err and err.count("\n") == 1, err
