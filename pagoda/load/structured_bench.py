"""`pagoda bench serve --structured json`: the same requests free and constrained to a JSON schema,
one after the other against the same server, and what the first request of a new schema waits for
its grammar.

The schema is an array of short strings with at least as many items as --output-len: no answer can
end before max_tokens, and the free run ignores EOS, so both runs generate the same number of tokens
and the throughput ratio is the cost of the grammar masks alone. The compile time is measured from
outside, as any server shows it: one-token requests with a schema the server has not seen (a fresh
property name) against the same schema again, cached.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx

from pagoda.load.serve_runner import BenchResult, ServeConfig, auth_headers, default_model, run_benchmark


def bench_schema(output_len: int, name: str = "items") -> dict[str, Any]:
    """An object whose one array needs more items than `output_len` tokens can hold."""
    items = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": output_len}
    return {"type": "object", "properties": {name: items}, "required": [name], "additionalProperties": False}


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}}


async def compile_probe(cfg: ServeConfig, tries: int = 3) -> dict[str, float]:
    """Milliseconds of a one-token chat request with a new schema, with the same schema again
    (cached), and with none; `compile_ms` = new - cached, the median over `tries` schemas;
    `first_ever_compile_ms` the same for the first of them."""
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s) as client:
        model = cfg.model or await default_model(client, cfg)

        async def timed(extra: dict[str, Any]) -> float:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1} | extra
            t0 = time.perf_counter()
            resp = await client.post(cfg.root + "/v1/chat/completions", json=body, headers=auth_headers(cfg))
            resp.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        firsts, cached, free = [], [], []
        for _ in range(tries):
            extra = response_format(bench_schema(4, f"k{uuid.uuid4().hex[:8]}"))
            firsts.append(await timed(extra))
            cached.append(await timed(extra))
            free.append(await timed({}))
    mid = sorted(range(tries), key=lambda i: firsts[i] - cached[i])[tries // 2]
    return {
        # the server's first schema ever also builds its tokenizer's view for the grammars
        "first_ever_compile_ms": firsts[0] - cached[0],
        "first_ms": firsts[mid],
        "cached_ms": cached[mid],
        "free_ms": free[mid],
        "compile_ms": firsts[mid] - cached[mid],
    }


async def run_structured(cfg: ServeConfig) -> dict[str, Any]:
    """The compile probe (which warms the server up too), the free run, then the constrained run
    on prompts of the same lengths from the next seed (the free run's would hit the prefix
    cache). Both ignore EOS: every request generates --output-len tokens."""
    cfg = replace(cfg, ignore_eos=True)
    probe = await compile_probe(cfg)
    free = await run_benchmark(cfg)
    schema = bench_schema(cfg.dataset.output_len or 128)
    other = replace(cfg.dataset, seed=cfg.dataset.seed + 1)
    constrained = await run_benchmark(
        replace(cfg, dataset=other, extra_body=cfg.extra_body | response_format(schema))
    )
    return {"free": free, "constrained": constrained, "probe": probe}


def format_structured(free: BenchResult, constrained: BenchResult, probe: dict[str, float]) -> str:
    width = 40 + 3 * 12
    lines = [" structured outputs: json schema vs free text ".center(width, "=")]
    lines.append(f"{'':<40}{'free':>12}{'json':>12}{'ratio':>12}")
    rows = (
        ("Output token throughput (tok/s)", free.output_throughput, constrained.output_throughput),
        ("ITL p50 (ms)", free.itl.p50, constrained.itl.p50),
        ("TTFT p50 (ms)", free.ttft.p50, constrained.ttft.p50),
        ("Generated tokens", float(free.output_tokens), float(constrained.output_tokens)),
        ("Failed requests", float(free.failed), float(constrained.failed)),
    )
    for label, a, b in rows:
        ratio = f"{b / a:.2f}x" if a else "-"
        lines.append(f"{label + ':':<40}{a:>12.2f}{b:>12.2f}{ratio:>12}")
    lines.append("ratio = json / free: above 1 is faster for throughput, slower for latency")
    lines.append(
        f"First request of a new schema: {probe['first_ms']:.1f} ms, cached {probe['cached_ms']:.1f} ms, "
        f"free {probe['free_ms']:.1f} ms: grammar compile {probe['compile_ms']:.1f} ms "
        f"({probe['first_ever_compile_ms']:.1f} ms for the server's first schema)"
    )
    lines.append("=" * width)
    return "\n".join(lines)


def report(args: argparse.Namespace, out: dict[str, Any]) -> int:
    free, constrained, probe = out["free"], out["constrained"], out["probe"]
    if args.json:
        ratio = constrained.output_throughput / free.output_throughput if free.output_throughput else None
        body = {"free": free.to_dict(), "json": constrained.to_dict(), "compile_probe": probe, "ratio": ratio}
        print(json.dumps(body))
    else:
        print(format_structured(free, constrained, probe))
    return 0 if free.completed and constrained.completed and not constrained.failed else 1
