"""The report of `pagoda bench control-plane` and the run from its flags (the flags: load/cli.py;
the measuring core: bench_control_plane.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pagoda.load.bench_control_plane import cpu_ms_per_1k, run_control_plane
from pagoda.load.control_plane_config import SATURATED_PCT, ControlPlaneConfig


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        " Control-plane benchmark (simulated workers) ".center(110, "="),
        f"{cfg['workers']} sim workers (step {cfg['step_ms']:g} ms, batch <= {cfg['max_batch']}), "
        f"{cfg['gateways']} gateway(s), {cfg['tokenizers']} tokenizer(s), router {cfg['router']}, "
        f"{cfg['output_len']} tokens per request",
        f"{'streams':>8}{'req ok':>8}{'failed':>7}{'tok/s':>9}{'+TPOT p50':>10}{'+TPOT p99':>10}"
        f"{'+ITL p50':>9}{'+ITL p99':>9}{'TTFT p50':>10}{'TTFT p99':>10}  busiest (CPU%, 100 = a core)",
    ]
    for lv in report["levels"]:
        a, b, t = lv["added_tpot"], lv["added_itl"], lv["ttft"]
        name, pct = lv["busiest"]
        flag = " SATURATED" if pct >= SATURATED_PCT else ""
        lines.append(
            f"{lv['streams']:>8}{lv['requests']:>8}{lv['failed']:>7}{lv['tokens_per_s']:>9.0f}"
            f"{a['p50']:>10.2f}{a['p99']:>10.2f}{b['p50']:>9.2f}{b['p99']:>9.2f}"
            f"{t['p50']:>10.1f}{t['p99']:>10.1f}  {name} {pct:.0f}%{flag}"
        )
    lines.append(
        "Added latency per token (ms), minus the modeled step: +TPOT per request ((e2e - ttft) / "
        "(tokens - 1)), +ITL per gap between chunks (below 0 where chunks arrive bunched)"
    )
    for lv in report["levels"]:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(lv["cpu"].items(), key=lambda kv: -kv[1]))
        lines.append(f"CPU% at {lv['streams']} streams: {cpu}")
        per_1k = cpu_ms_per_1k(lv["cpu"], lv["tokens_per_s"])
        if per_1k:
            ms = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_1k.items(), key=lambda kv: -kv[1]))
            lines.append(f"  CPU ms per 1k tokens: {ms}")
            lines.append(
                f"  control plane (gateway, tokenizer, scheduler, broker): {control_plane_ms(per_1k):.0f} ms"
            )
        if lv["first_error"]:
            lines.append(f"  first error: {lv['first_error']}")
        if lv["server_tokens"] != lv["tokens"]:
            lines.append(f"  gateway counted {lv['server_tokens']} tokens, clients {lv['tokens']}")
    lines.append(saturation_line(report["levels"]))
    lines.append("=" * 110)
    return "\n".join(lines)


CONTROL_PLANE = ("gateway", "tokenizer", "scheduler", "rabbitmq")


def control_plane_ms(per_1k: dict[str, float]) -> float:
    """CPU ms per 1,000 streamed tokens of the control plane's processes (every gateway and
    tokenizer process, the scheduler, the broker; not the workers, Redis or the bench client)."""
    return sum(v for k, v in per_1k.items() if k.startswith(CONTROL_PLANE))


def saturation_line(levels: list[dict[str, Any]]) -> str:
    """Where the stack saturates: the first level at which a process used >= 90% of a core."""
    for lv in levels:
        hot = sorted((k for k, v in lv["cpu"].items() if v >= SATURATED_PCT), key=lambda k: -lv["cpu"][k])
        if hot:
            note = " (the load generator itself: its figures are a floor)" if hot[0] == "bench client" else ""
            return (
                f"Saturation: {', '.join(hot)} at >= {SATURATED_PCT:.0f}% of a core from {lv['streams']} "
                f"streams ({lv['tokens_per_s']:.0f} tok/s){note}"
            )
    best = max(levels, key=lambda lv: lv["tokens_per_s"], default=None)
    peak = f"; peak {best['tokens_per_s']:.0f} tok/s at {best['streams']} streams" if best else ""
    return f"Saturation: no process reached {SATURATED_PCT:.0f}% of a core{peak}"


def config_from_args(args: argparse.Namespace) -> ControlPlaneConfig:
    try:
        streams = tuple(int(x) for x in str(args.streams).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--streams {args.streams!r}: give counts like 100,500,1000") from None
    return ControlPlaneConfig(
        bus=args.bus, store=args.store, namespace=args.namespace, model=args.model, workers=args.workers,
        tokenizers=args.tokenizers, gateways=args.gateways, streams=streams, duration_s=args.duration,
        output_len=args.output_len,
        prompt_words=args.prompt_len, step_ms=args.sim_step_ms, max_batch=args.sim_max_batch,
        router=args.router, service_log_level=args.service_log_level,
        startup_timeout_s=args.startup_timeout, request_timeout_s=args.timeout, progress=not args.json,
    )  # fmt: skip


def run_control_plane_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        report = run_control_plane(cfg)
    except RuntimeError as exc:  # a service died or never got ready: its log tail is in the message
        print(f"pagoda: error: {exc}")
        return 1
    print(json.dumps(report) if args.json else format_report(report))
    ok = report["levels"] and all(lv["requests"] and not lv["failed"] for lv in report["levels"])
    return 0 if ok else 1
