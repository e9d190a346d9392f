"""The `pagoda` command: serve, models, bench."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1g', '1073741824' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 2GiB, 512MiB or 1073741824")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}; use KiB, MiB, GiB or bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model", default="", help="GGUF file, HF model directory or Hub id (default: the demo SmolLM2 GGUF)"
    )
    g.add_argument("--served-model-name", default=None, help="name clients use in the `model` field")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--kv-cache-memory", type=parse_size, default=None, help="KV cache size, e.g. 2GiB (CPU default 1GiB)"
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="CPU only: int4 (weight-only, fast at small batch), int8 (dynamic, not batch-invariant)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: Triton kernels on a GPU, torch on the CPU",
    )
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument(
        "--compile",
        action="store_true",
        help="CPU: decode steps through torch.compile (first start compiles for minutes, then cached)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "served_model_name": args.served_model_name,
        "dtype": args.dtype,
        "device": args.device,
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "quantization": args.quantization,
        "compile": args.compile,
        "block_size": args.block_size,
        "kv_cache_memory": args.kv_cache_memory,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": args.enable_prefix_caching,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "scheduling_policy": args.scheduling_policy,
    }


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "sim"],
        help="torch: the model; sim: no model, tokens at a modeled speed (control-plane benchmarks)",
    )
    g.add_argument("--sim-step-ms", type=float, default=20.0, help="sim: wall time of one engine step")
    g.add_argument("--sim-max-batch", type=int, default=256, help="sim: most sequences in one step")
    g.add_argument("--sim-eos-prob", type=float, default=0.0, help="sim: chance per token of EOS")


def add_server_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="required bearer key (repeatable); also env PAGODA_API_KEYS (comma separated), PAGODA_API_KEY",
    )
    s.add_argument("--api-key-file", default=None, help="file of bearer keys, one a line (# comments)")
    lim = p.add_argument_group("request limits (a request over one gets a 4xx)")
    lim.add_argument(
        "--max-request-body-bytes", type=parse_size, default=8 * 2**20, help="413 above this (default 8MiB)"
    )
    lim.add_argument("--max-n", type=int, default=128, help="most choices (n) per request")
    lim.add_argument(
        "--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: the context length)"
    )
    lim.add_argument("--max-stop-strings", type=int, default=16, help="most stop strings per request")
    lim.add_argument("--max-logit-bias", type=int, default=1024, help="most logit_bias entries per request")
    lim.add_argument("--max-json-depth", type=int, default=32, help="deepest JSON nesting of a body")
    lim.add_argument(
        "--rate-limit-requests", type=int, default=None, help="requests per minute per API key (429 above)"
    )
    lim.add_argument(
        "--rate-limit-tokens",
        type=int,
        default=None,
        help="tokens (prompt + max_tokens) per minute per API key (429 above)",
    )
    lim.add_argument(
        "--queue-timeout",
        type=float,
        default=300.0,
        help="seconds a request may wait to start before it fails with a 503 (0: no limit)",
    )


def add_admission_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("admission (beyond these, requests are refused with 503 at once)")
    a.add_argument(
        "--max-waiting-requests",
        type=int,
        default=64,
        help="sequences each worker may queue beyond its running slots (-1: no cap)",
    )
    a.add_argument(
        "--priority-reserve",
        type=int,
        default=8,
        help="extra queue room per worker for priority requests (priority < 0)",
    )


def request_limits(args: argparse.Namespace) -> Any:
    """The `RequestLimits` of the request-limit flags."""
    from pagoda.services.gateway.limits import RequestLimits

    return RequestLimits(
        max_body_bytes=args.max_request_body_bytes,
        max_json_depth=args.max_json_depth,
        max_n=args.max_n,
        max_tokens=args.max_tokens_limit,
        max_stop=args.max_stop_strings,
        max_logit_bias=args.max_logit_bias,
    )


def admission_limits(args: argparse.Namespace) -> Any:
    """The `AdmissionLimits` of the admission flags."""
    from pagoda.services.scheduler.admission import AdmissionLimits

    if not hasattr(args, "max_waiting_requests"):  # a role without admission flags (tokenizer)
        return AdmissionLimits()
    waiting = args.max_waiting_requests
    return AdmissionLimits(
        max_waiting=None if waiting < 0 else waiting, priority_reserve=args.priority_reserve
    )


def add_cluster_args(p: argparse.ArgumentParser, *, bus_required: bool, store_required: bool) -> None:
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--bus", default=None, required=bus_required, help="amqp://user:pass@host:5672/ (default: in-memory)"
    )
    c.add_argument(
        "--store", default=None, required=store_required, help="redis://host:6379/0 (default: in-memory)"
    )
    c.add_argument(
        "--namespace", default="pagoda", help="prefix of every queue name and store key of this deployment"
    )
    c.add_argument("--router", default="prefix", choices=["prefix", "least-load", "round-robin"])
    c.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between worker heartbeats")
    c.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export OpenTelemetry traces over OTLP/HTTP, e.g. http://otel-collector:4318 "
        "(env OTEL_EXPORTER_OTLP_ENDPOINT; default: off)",
    )
    c.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let running requests finish before exiting (a worker takes no new ones)",
    )


_ROLE_HELP = {
    "gateway": "the OpenAI HTTP front end",
    "tokenizer": "chat templates, tokenization and prompt checks",
    "scheduler": "the cluster dispatcher: routes requests to workers",
    "worker": "the engine: model, paged KV cache, continuous batching",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: an LLM inference server")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run all four services in one process (in-memory bus and store unless --bus/--store)"
    )
    add_engine_args(serve)
    add_backend_args(serve)
    add_server_args(serve)
    add_admission_args(serve)
    add_cluster_args(serve, bus_required=False, store_required=False)

    for role, text in _ROLE_HELP.items():
        p = sub.add_parser(role, help=f"run the {role} service alone: {text}")
        if role != "scheduler":
            add_engine_args(p)
        if role == "gateway":
            add_server_args(p)
        if role != "tokenizer":
            add_admission_args(p)
        add_cluster_args(p, bus_required=True, store_required=role != "tokenizer")
        if role == "worker":
            add_backend_args(p)
            p.add_argument("--worker-id", default=None, help="stable id (default: random)")
            p.add_argument(
                "--stall-timeout",
                type=float,
                default=30.0,
                help="report the worker stalled (no new traffic; its requests move) when requests wait "
                "but no engine step finished for this many seconds",
            )
        if role in ("worker", "scheduler", "tokenizer"):
            p.add_argument(
                "--metrics-port",
                type=int,
                default=None,
                help="serve Prometheus /metrics on this port (default: off)",
            )

    sub.add_parser("models", help="list the demo catalog")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    offline = bsub.add_parser(
        "offline", help="offline generation throughput, optionally against HF transformers"
    )
    add_engine_args(offline)
    from pagoda.load.bench_offline import add_offline_args

    add_offline_args(offline)
    bserve = bsub.add_parser(
        "serve", help="online latency and throughput of an OpenAI-compatible server (streaming)"
    )
    from pagoda.load.bench_serve import add_serve_args

    add_serve_args(bserve)
    cp = bsub.add_parser(
        "control-plane",
        help="gateway/tokenizer/scheduler/RabbitMQ cost per token, with simulated workers (no model)",
    )
    from pagoda.load.control_plane_cli import add_control_plane_args

    add_control_plane_args(cp)
    bkernels = bsub.add_parser(
        "kernels", help="Triton kernels against torch: time, bandwidth, FLOP rate (GPU; toy shapes on CPU)"
    )
    from pagoda.load.bench_kernels import add_kernels_args

    add_kernels_args(bkernels)
    bstep = bsub.add_parser(
        "step", help="ms and aten calls per decode step of the demo model, split by engine function"
    )
    from pagoda.load.bench_step import add_step_args

    add_step_args(bstep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "models":
            from pagoda.engine import format_catalog

            print(format_catalog())
            return 0
        if args.command in ("serve", *_ROLE_HELP):
            from pagoda.services.cli.launch import ROLES, run_roles

            return run_roles(args, ROLES if args.command == "serve" else (args.command,))
        if args.command == "bench" and args.bench_command == "offline":
            from pagoda.load.bench_offline import run_offline

            return run_offline(args)
        if args.command == "bench" and args.bench_command == "serve":
            from pagoda.load.bench_serve import run_serve

            return run_serve(args)
        if args.command == "bench" and args.bench_command == "control-plane":
            from pagoda.load.control_plane_cli import run_control_plane_cli

            return run_control_plane_cli(args)
        if args.command == "bench" and args.bench_command == "kernels":
            from pagoda.load.bench_kernels import run_kernels

            return run_kernels(args)
        if args.command == "bench" and args.bench_command == "step":
            from pagoda.load.bench_step import run_step_bench

            run_step_bench(args)
            return 0
    except ValueError as exc:  # user errors: one line naming the fix, no traceback
        print(f"pagoda: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # broker or store unreachable: the message names the URL to check
        print(f"pagoda: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1

