"""The distributed stack as separate processes over the real RabbitMQ and Redis: gateway,
tokenizer, scheduler and two workers; compared with the embedded server."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.polling import block_until

pytestmark = pytest.mark.integration

QUESTIONS = [f"In one sentence, what is {t}?" for t in (
    "a cat", "the moon", "rain", "a violin", "bread", "a river", "gravity", "a library",
)]  # fmt: skip


async def _stream_all(base: str, questions: list[str], **extra: Any) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

    async def one(q: str) -> str:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": q}],
            max_tokens=24, temperature=0, stream=True, **extra,
        )  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        return list(await asyncio.gather(*(one(q) for q in questions)))
    finally:
        await client.close()


def test_32_concurrent_streams_match_embedded(cluster: dict[str, Any], embedded: str) -> None:
    questions = QUESTIONS * 4
    distributed = asyncio.run(_stream_all(cluster["base"], questions))
    local = asyncio.run(_stream_all(embedded, QUESTIONS))
    assert all(distributed), "every stream produced text"
    assert distributed == local * 4
    # both workers took part
    r = cluster["redis"]
    logs = [p.output() for p in cluster["procs"] if p.args[0] == "worker"]
    assert all("finished" in log for log in logs), "a worker served nothing"
    assert r.exists(f"{cluster['ns']}:worker:w1") and r.exists(f"{cluster['ns']}:worker:w2")


COPYING = [  # prompts whose answers copy from them, so that n-gram drafts get accepted
    f"Repeat this list exactly, twice: {', '.join(items)}."
    for items in (
        ["apples", "bananas", "cherries", "dates", "figs"],
        ["red", "orange", "yellow", "green", "blue", "indigo"],
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
        ["one", "two", "three", "four", "five", "six", "seven"],
        ["Paris", "Rome", "Madrid", "Berlin", "Vienna"],
        ["oak", "pine", "birch", "maple", "cedar", "willow"],
        ["violin", "cello", "flute", "oboe", "harp"],
        ["Mercury", "Venus", "Earth", "Mars", "Jupiter"],
    )
]


def _spec_counts(cluster: dict[str, Any]) -> dict[str, float]:
    """w2's vllm:spec_decode_num_* counters."""
    text = httpx.get(f"http://127.0.0.1:{cluster['metrics_ports']['w2']}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:spec_decode_num_")
    }


def test_a_speculating_worker_streams_what_the_others_do(cluster: dict[str, Any], embedded: str) -> None:
    """w2 runs n-gram speculation (tests/integration/conftest.py): greedy streams over the bus equal
    the embedded server's, with drafts both accepted and rejected on w2."""
    before = _spec_counts(cluster)
    distributed = asyncio.run(_stream_all(cluster["base"], COPYING))
    assert distributed == asyncio.run(_stream_all(embedded, COPYING))
    after = _spec_counts(cluster)
    drafted, accepted = (
        after[f"vllm:spec_decode_num_{k}_tokens_total"] - before[f"vllm:spec_decode_num_{k}_tokens_total"]
        for k in ("draft", "accepted")
    )
    assert drafted > accepted > 0, (before, after)


def _indexed(r: Any, ns: str) -> int:
    """Blocks in the cluster's prefix index."""
    return sum(1 for _ in r.scan_iter(f"{ns}:blk:*"))


def test_shared_prefix_lands_on_the_caching_worker(cluster: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{cluster['base']}/v1", api_key="none", max_retries=0)
    system = "You are a meticulous assistant who answers briefly. " * 12  # ~130 tokens
    r, ns = cluster["redis"], cluster["ns"]
    indexed_before = _indexed(r, ns)
    usage = []
    for i, q in enumerate(QUESTIONS[:5]):
        resp = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        )  # fmt: skip
        assert resp.usage is not None
        usage.append(resp.usage)
        if i == 0:  # the worker publishes its new block hashes just after the step: wait for them
            published = lambda: _indexed(r, ns) >= indexed_before + 7  # noqa: E731
            block_until(published, 10, "the worker to publish its block hashes")
    cached = [u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0 for u in usage]
    print(f"cached prompt tokens per request: {cached}")
    assert cached[0] == 0
    assert all(c >= 112 for c in cached[1:]), cached


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(cluster: dict[str, Any]) -> None:
    """A client that goes away ten chunks into a 1,500-token stream: its request is aborted on the
    worker, which frees the blocks long before the request could have finished (counted in the
    worker's engine steps, so a slow machine cannot pass it by taking its time)."""
    r, ns = cluster["redis"], cluster["ns"]

    def figures() -> dict[str, dict[str, int]]:
        keys = ("num_free_blocks", "num_blocks", "steps")
        out = {}
        for w in ("w1", "w2"):
            h = {k.decode(): v.decode() for k, v in r.hgetall(f"{ns}:worker:{w}").items()}
            out[w] = {k: int(h[k]) for k in keys}
        return out

    def all_free(now: dict[str, dict[str, int]]) -> bool:
        return all(f["num_free_blocks"] == f["num_blocks"] for f in now.values())

    with httpx.Client(timeout=30) as http:
        body = {"prompt": "Count forever: 1, 2, 3,", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with http.stream("POST", f"{cluster['base']}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(10):
                next(lines)
            block_until(lambda: not all_free(figures()), 10, "a heartbeat that shows the request's blocks")
            busy = figures()
    # the client is gone: the worker's heartbeats (every 0.3 s) show the blocks back, while the
    # request had ~1,490 steps to go
    block_until(lambda: all_free(figures()), 60, "the blocks to be freed")
    after = figures()
    stepped = {w: after[w]["steps"] - busy[w]["steps"] for w in after}
    assert all(n < 500 for n in stepped.values()), f"steps after the disconnect: {stepped}"
