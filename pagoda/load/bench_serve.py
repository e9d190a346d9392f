"""`pagoda bench serve`: latency and throughput of any OpenAI-compatible server, in the spirit of
`vllm bench serve`. This module is the CLI and the report; pagoda/load/serve_runner.py measures.

The CLI builds a `ServeConfig`, runs `run_benchmark` against --base-url (and, with --peer, against
a peer started on a free port with the same requests), and prints a table or one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from collections.abc import Callable
from dataclasses import replace

from pagoda.load import peers
from pagoda.load.datasets import DatasetSpec
from pagoda.load.outcomes import format_outcomes, prompts_for_duration
from pagoda.load.serve_runner import BenchResult, ServeConfig, parse_slo, run_benchmark


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    num_prompts = args.num_prompts
    if getattr(args, "duration", None) is not None:
        num_prompts = prompts_for_duration(args.request_rate, args.duration)
    spec = DatasetSpec(
        name=args.dataset,
        num_prompts=num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        num_turns=args.num_turns,
        system_len=args.system_len,
        sharegpt_path=args.sharegpt_path,
    )
    return ServeConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        dataset=spec,
        ignore_eos=args.ignore_eos,
        slo=parse_slo(args.slo),
        api_key=args.api_key,
        tokenize=not args.no_tokenize,
        request_timeout_s=args.timeout,
        max_duration_s=args.max_duration,
        progress=not args.json,
        metrics_urls=tuple(args.metrics_url or ()),
    )


def format_result(r: BenchResult) -> str:
    rows: list[tuple[str, str]] = [
        ("Model", str(r.meta.get("model", ""))),
        ("Endpoint / dataset", f"{r.meta.get('endpoint', '')} / {r.meta.get('dataset', '')}"),
        ("Concurrency / request rate", f"{r.meta.get('concurrency')} / {r.meta.get('request_rate')}"),
        ("Successful requests", str(r.completed)),
        ("Failed requests", str(r.failed)),
        ("Benchmark duration (s)", f"{r.duration_s:.2f}"),
        ("Total input tokens", str(r.input_tokens)),
        ("Total generated tokens", str(r.output_tokens)),
        ("Request throughput (req/s)", f"{r.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{r.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{r.total_token_throughput:.2f}"),
        ("Peak concurrent requests", str(r.peak_concurrency)),
    ]
    if r.failed:
        rows += format_outcomes(r.outcomes)
    if r.goodput is not None:
        bounds = ",".join(f"{k}={v:g}" for k, v in r.slo.items())
        rows.append((f"Goodput (req/s, {bounds} ms)", f"{r.goodput:.2f}"))
    lines = [" Serving Benchmark Result ".center(56, "=")]
    lines += [f"{k + ':':<40}{v:>16}" for k, v in rows]
    for name, s in (("TTFT", r.ttft), ("TPOT", r.tpot), ("ITL", r.itl), ("E2E", r.e2e)):
        lines.append(f" {name} (ms) ".center(56, "-"))
        for label, v in (("Mean", s.mean), ("P50", s.p50), ("P90", s.p90), ("P99", s.p99)):
            lines.append(f"{label + ' ' + name + ' (ms):':<40}{v:>16.2f}")
    if r.kv and "live_ratio_mean" in r.kv:
        lines.append(" KV cache (sampled from /metrics) ".center(56, "-"))
        lines.append(f"{'Peak usage (blocks in use / total):':<40}{r.kv['peak_usage']:>16.3f}")
        lines.append(f"{'Live-token ratio at peak usage:':<40}{r.kv['live_ratio_at_peak']:>16.3f}")
        lines.append(f"{'Live-token ratio, mean over the run:':<40}{r.kv['live_ratio_mean']:>16.3f}")
    if r.kv and "spec_acceptance_rate" in r.kv:
        lines.append(" Speculative decoding (from /metrics) ".center(56, "-"))
        lines.append(f"{'Draft acceptance rate:':<40}{r.kv['spec_acceptance_rate']:>16.3f}")
        lines.append(f"{'Mean acceptance length (tokens):':<40}{r.kv['spec_mean_acceptance_length']:>16.2f}")
    if r.first_error:
        lines.append(f"First error: {r.first_error}")
    lines.append("=" * 56)
    return "\n".join(lines)


# (label, value of a result) rows of the side-by-side table; ratios are pagoda / peer.
_COMPARE_ROWS: tuple[tuple[str, Callable[[BenchResult], float]], ...] = (
    ("Output token throughput (tok/s)", lambda r: r.output_throughput),
    ("Request throughput (req/s)", lambda r: r.request_throughput),
    ("TTFT p50 (ms)", lambda r: r.ttft.p50),
    ("TTFT p99 (ms)", lambda r: r.ttft.p99),
    ("ITL p50 (ms)", lambda r: r.itl.p50),
    ("ITL p99 (ms)", lambda r: r.itl.p99),
    ("TPOT p50 (ms)", lambda r: r.tpot.p50),
    ("E2E p50 (ms)", lambda r: r.e2e.p50),
    ("Generated tokens", lambda r: float(r.output_tokens)),
    ("Failed requests", lambda r: float(r.failed)),
)


def compare(ours: BenchResult, peer: BenchResult) -> dict[str, dict[str, float | None]]:
    """Pure: each compared metric as {"pagoda", "peer", "ratio"} with ratio = pagoda / peer (None
    where the peer's value is 0). Throughput: above 1 is pagoda faster; latency: below 1 is."""
    rows: dict[str, dict[str, float | None]] = {}
    for label, value in _COMPARE_ROWS:
        a, b = value(ours), value(peer)
        rows[label] = {"pagoda": a, "peer": b, "ratio": a / b if b else None}
    return rows


def format_comparison(ours: BenchResult, peer: BenchResult, peer_name: str) -> str:
    width = 40 + 3 * 12
    lines = [f" pagoda vs {peer_name} ".center(width, "=")]
    lines.append(f"{'':<40}{'pagoda':>12}{peer_name:>12}{'ratio':>12}")
    for label, row in compare(ours, peer).items():
        ratio = row["ratio"]
        cells = f"{row['pagoda'] or 0.0:>12.2f}{row['peer'] or 0.0:>12.2f}"
        lines.append(f"{label + ':':<40}{cells}{'-' if ratio is None else f'{ratio:.2f}x':>12}")
    lines.append("ratio = pagoda / peer: above 1 is pagoda faster for throughput, slower for latency")
    lines.append("=" * width)
    return "\n".join(lines)


def _peer_config(cfg: ServeConfig, ours: BenchResult, base_url: str) -> ServeConfig:
    """The same requests for the peer: prompts built with pagoda's tokens per word (a peer may
    have no /tokenize), the peer's own model name, no API key; --ignore-eos also as min_tokens."""
    tpw = float(ours.meta.get("tokens_per_word") or cfg.dataset.tokens_per_word)
    return replace(
        cfg,
        base_url=base_url,
        model=None,
        api_key=None,
        tokenize=False,
        min_tokens_for_eos=True,
        metrics_urls=(),
        dataset=replace(cfg.dataset, tokens_per_word=tpw),
    )


def run_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    launch = shlex.split(args.launch) if args.launch is not None else None
    peer = None
    if args.peer not in ("none", "hf"):
        from pagoda.load.hf_peer import pagoda_threads

        peer = peers.make_peer(
            args.peer,
            model_path=args.peer_model,
            n_ctx=args.peer_n_ctx,
            n_threads=args.peer_threads or pagoda_threads(launch or ()),
            slots=cfg.concurrency or cfg.dataset.num_prompts,
            serve_args=launch or (),
        )
        peer.check()  # fail before the first run, not after it
    if getattr(args, "structured", "none") == "json":
        return _run_structured(args, cfg, launch)
    if launch is None:
        result = asyncio.run(run_benchmark(cfg))
    else:
        with peers.PagodaServer("pagoda", launch) as target:
            result = asyncio.run(run_benchmark(replace(cfg, base_url=target.base_url)))
    if args.peer == "hf":
        return run_hf_comparison(args, cfg, result)
    if peer is None:
        print(json.dumps(result.to_dict()) if args.json else format_result(result))
        _plot(args, {"pagoda": result})
        return 0 if result.completed else 1
    if not args.json:
        print(format_result(result), flush=True)
    peer.start()
    try:
        peer_result = asyncio.run(run_benchmark(_peer_config(cfg, result, peer.base_url)))
    finally:
        peer.stop()
    if args.json:
        out = {
            "pagoda": result.to_dict(),
            "peer": {"name": peer.name, **peer_result.to_dict()},
            "comparison": compare(result, peer_result),
        }
        print(json.dumps(out))
    else:
        print(f"\nPeer: {peer.name}")
        print(format_result(peer_result))
        print()
        print(format_comparison(result, peer_result, peer.name))
        if peer.name == "pagoda-no-prefix-cache" and result.ttft.p50 > 0:
            gain = peer_result.ttft.p50 / result.ttft.p50
            print(f"Prefix caching: TTFT p50 {gain:.2f}x lower with it than without")
    _plot(args, {"pagoda": result, peer.name: peer_result})
    return 0 if result.completed and peer_result.completed else 1


def _run_structured(args: argparse.Namespace, cfg: ServeConfig, launch: list[str] | None) -> int:
    from pagoda.load.structured_bench import report, run_structured

    if args.peer != "none":
        raise SystemExit("--structured json compares pagoda with itself: leave out --peer")
    if launch is None:
        return report(args, asyncio.run(run_structured(cfg)))
    with peers.PagodaServer("pagoda", launch) as target:
        return report(args, asyncio.run(run_structured(replace(cfg, base_url=target.base_url))))


def _plot(args: argparse.Namespace, results: dict[str, BenchResult]) -> None:
    if not getattr(args, "plot", None):
        return
    from pagoda.load.plots import plot_serve

    meta = next(iter(results.values())).meta
    title = f"{meta.get('model', '')}: {meta.get('dataset', '')}, concurrency {meta.get('concurrency')}"
    path = plot_serve({name: r.records for name, r in results.items()}, args.plot, title)
    if not args.json:
        print(f"plot: {path}")


def run_hf_comparison(args: argparse.Namespace, cfg: ServeConfig, result: BenchResult) -> int:
    """--peer hf: the run's prompts (pagoda's tokenizer and chat template) through transformers
    in-process, output tok/s of generate_batch and generate against the server's."""
    from pagoda.engine.loader import demo_model_path
    from pagoda.engine.loader.model_info import read_model_info
    from pagoda.load.datasets import load_dataset
    from pagoda.load.hf_peer import (
        format_hf_comparison,
        hf_comparison,
        load_hf_model,
        pagoda_dtype,
        pagoda_threads,
        run_hf_peer,
        turn_ids,
    )

    if not args.json:
        print(format_result(result), flush=True)
    path = args.peer_model or demo_model_path()
    serve_args = shlex.split(args.launch or "")  # a --base-url server: as launched here
    ours = pagoda_dtype(serve_args)
    dtype = ours if args.hf_dtype == "auto" else args.hf_dtype
    threads = args.peer_threads or pagoda_threads(serve_args)
    model = load_hf_model(path, dtype, threads)
    tpw = float(result.meta.get("tokens_per_word") or cfg.dataset.tokens_per_word)
    turns = [t for conv in load_dataset(replace(cfg.dataset, tokens_per_word=tpw)) for t in conv]
    tok = read_model_info(path).tokenizer
    prompts = [turn_ids(tok, t, cfg.endpoint) for t in turns]
    runs = run_hf_peer(model, prompts, [t.output_len for t in turns], cfg.concurrency or len(turns),
                       args.hf_max_batch_tokens)  # fmt: skip
    table = hf_comparison(result.output_throughput, runs, (ours, dtype))
    if args.json:
        print(json.dumps({"pagoda": result.to_dict(), "hf": table}))
    else:
        print()
        print(format_hf_comparison(table))
    _plot(args, {"pagoda": result})
    return 0 if result.completed else 1
