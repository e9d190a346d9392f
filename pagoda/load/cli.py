"""The `pagoda bench` command line: each benchmark's flags, and the dispatch to it.

Building these parsers imports no benchmark (they pull in torch, httpx, numpy): `pagoda --help`
and `pagoda gateway` stay fast. `run_bench` imports the one benchmark asked for.
"""

from __future__ import annotations

import argparse
import math
import os

from pagoda.load.control_plane_config import ControlPlaneConfig
from pagoda.load.datasets import DATASETS
from pagoda.load.peers import PEERS


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pagoda bench ...` and its subcommands, under the `pagoda` command's subparsers `sub`."""
    from pagoda.engine.engine_args import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    offline = bsub.add_parser(
        "offline", help="offline generation throughput, optionally against HF transformers"
    )
    add_engine_args(offline)
    add_offline_args(offline)
    add_serve_args(
        bsub.add_parser(
            "serve", help="online latency and throughput of an OpenAI-compatible server (streaming)"
        )
    )
    add_control_plane_args(
        bsub.add_parser(
            "control-plane",
            help="gateway/tokenizer/scheduler/RabbitMQ cost per token, with simulated workers (no model)",
        )
    )
    add_kernels_args(
        bsub.add_parser(
            "kernels",
            help="Triton kernels against torch: time, bandwidth, FLOP rate (GPU; toy shapes on CPU)",
        )
    )
    add_step_args(
        bsub.add_parser(
            "step", help="ms and aten calls per decode step of a model (default: the demo), by function"
        )
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args.bench_command` names; its exit status."""
    if args.bench_command == "offline":
        from pagoda.load.bench_offline import run_offline

        return run_offline(args)
    if args.bench_command == "serve":
        from pagoda.load.bench_serve import run_serve

        return run_serve(args)
    if args.bench_command == "control-plane":
        from pagoda.load.control_plane_cli import run_control_plane_cli

        return run_control_plane_cli(args)
    if args.bench_command == "kernels":
        from pagoda.load.bench_kernels import run_kernels

        return run_kernels(args)
    assert args.bench_command == "step", args.bench_command
    from pagoda.load.bench_step import run_step_bench

    run_step_bench(args)
    return 0


def add_offline_args(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("benchmark")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument(
        "--peer", choices=["none", "hf"], default="none", help="also measure this peer on the same prompts"
    )
    b.add_argument(
        "--hf-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="dtype HF generate runs in (auto: the one pagoda ran in)",
    )
    b.add_argument(
        "--hf-batch-size", type=int, default=0, help="HF generate batch size (0: all prompts at once)"
    )
    b.add_argument("--json", action="store_true", help="print results as JSON")
    b.add_argument(
        "--lora-adapters",
        type=int,
        default=0,
        help="spread the prompts over this many random LoRA adapters and compare with the base model "
        "in alternating rounds (pagoda/load/bench_lora.py)",
    )
    b.add_argument("--lora-rank", type=int, default=8, help="rank of the random adapters")
    b.add_argument(
        "--lora-targets",
        nargs="+",
        default=["q_proj", "v_proj"],
        help="projections the random adapters adapt (default: PEFT's for Llama models)",
    )
    b.add_argument("--lora-paths", nargs="+", default=[], help="PEFT adapter directories to use instead")
    b.add_argument("--rounds", type=int, default=3, help="rounds of each system (--lora-adapters)")
    b.add_argument(
        "--profile",
        action="store_true",
        help="also profile 5 decode steps (torch profiler) and print the top ops",
    )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_serve_target_args(p.add_argument_group("target"))
    _add_serve_load_args(p.add_argument_group("load"))
    _add_serve_peer_args(p.add_argument_group("peer"))
    _add_serve_output_args(p.add_argument_group("output"))


def _add_serve_target_args(t: argparse._ArgumentGroup) -> None:
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is ok)")
    t.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    t.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    t.add_argument("--max-duration", type=float, default=3600.0, help="seconds allowed for the run")
    t.add_argument(
        "--no-tokenize", action="store_true", help="count lengths in words; skip the /tokenize calibration"
    )
    t.add_argument(
        "--launch",
        default=None,
        metavar="SERVE_ARGS",
        help="start `pagoda serve SERVE_ARGS` on a free port as the target instead of --base-url (e.g. "
        '--launch "--quantization int4"; "" for the defaults); a first start of a model is measured once '
        "its background compile of the decode graphs has landed; it is stopped before a --peer runs",
    )


def _add_serve_load_args(load: argparse._ArgumentGroup) -> None:
    load.add_argument("--concurrency", type=int, default=None, help="most conversations in flight")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="conversations per second, Poisson (inf)"
    )
    load.add_argument("--num-prompts", type=int, default=100, help="requests (multi-turn: rounded up)")
    load.add_argument(
        "--duration",
        type=float,
        default=None,
        help="open loop: start requests at --request-rate for this many seconds (sets --num-prompts)",
    )
    load.add_argument("--dataset", choices=list(DATASETS), default="random")
    load.add_argument("--input-len", type=int, default=256, help="prompt tokens (multi-turn: per turn)")
    load.add_argument(
        "--output-len", type=int, default=None, help="max_tokens (default 128; sharegpt: the reply's length)"
    )
    load.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per conversation")
    load.add_argument("--system-len", type=int, default=1024, help="multi-turn: shared system prompt tokens")
    load.add_argument("--sharegpt-path", default=None, help="local ShareGPT JSON file")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--structured",
        choices=["none", "json"],
        default="none",
        help="json: run the requests free, then constrained to a JSON schema (same lengths), and "
        "report the throughput ratio and a new schema's grammar compile time",
    )
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: true (pagoda, vLLM; a --peer gets min_tokens too)",
    )


def _add_serve_peer_args(peer: argparse._ArgumentGroup) -> None:
    peer.add_argument(
        "--peer",
        choices=["none", *PEERS, "hf"],
        default="none",
        help="after the run, start this server on a free port, run the same requests, compare; "
        "llamacpp is llama.cpp's llama-server with -np = --concurrency (make llama-server builds it); "
        "llama-cpp-python is that package's server, one request at a time; "
        "pagoda-no-prefix-cache is pagoda (with the --launch args) without prefix caching; "
        "pagoda-no-spec is pagoda (with the --launch args) without --speculative-config; "
        "hf runs the prompts in-process through transformers' generate_batch and generate",
    )
    peer.add_argument(
        "--hf-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="--peer hf dtype (auto: the one pagoda serves in, from --launch's --dtype or this CPU)",
    )
    peer.add_argument(
        "--hf-max-batch-tokens", type=int, default=512, help="--peer hf: generate_batch tokens per step"
    )
    peer.add_argument("--peer-model", default=None, help="GGUF file for the peer (default: the demo model)")
    peer.add_argument(
        "--peer-n-ctx",
        type=int,
        default=4096,
        help="peer context per stream (llama-server: -c is this times -np, the concurrency)",
    )
    peer.add_argument(
        "--peer-threads",
        type=int,
        default=0,
        help="peer CPU threads (0: as many as pagoda steps with: --launch's --threads, else what "
        "pagoda's --threads 0 takes on this machine)",
    )


def _add_serve_output_args(out: argparse._ArgumentGroup) -> None:
    out.add_argument("--slo", default=None, help="goodput bounds in ms, e.g. ttft=500,tpot=50,e2e=10000")
    out.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        help="Prometheus /metrics to sample KV cache figures from during the run (repeatable; "
        "default: the server's own /metrics; in a cluster give each worker's --metrics-port)",
    )
    out.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    out.add_argument(
        "--plot", default=None, metavar="PNG", help="write latency histograms and throughput over time here"
    )


def add_control_plane_args(p: argparse.ArgumentParser) -> None:
    d = ControlPlaneConfig()
    s = p.add_argument_group("stack")
    s.add_argument("--bus", default=d.bus, help="RabbitMQ URL")
    s.add_argument("--store", default=d.store, help="Redis URL")
    s.add_argument("--namespace", default="", help="queue/key prefix (default: a fresh one)")
    s.add_argument("--model", default="", help="whose tokenizer the services load (default: the demo model)")
    s.add_argument("--workers", type=int, default=d.workers, help="sim worker processes")
    s.add_argument("--tokenizers", type=int, default=d.tokenizers, help="tokenizer processes")
    s.add_argument(
        "--gateways", type=int, default=d.gateways, help="gateway processes sharing the port (--reuse-port)"
    )
    s.add_argument("--router", default=d.router, choices=["prefix", "least-load", "round-robin"])
    s.add_argument("--sim-step-ms", type=float, default=d.step_ms, help="modeled engine step time")
    s.add_argument("--sim-max-batch", type=int, default=d.max_batch, help="sequences per sim step")
    s.add_argument("--service-log-level", default=d.service_log_level, help="log level of the services")
    s.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s)
    ld = p.add_argument_group("load")
    ld.add_argument(
        "--streams", default="100", help="concurrent streams; a comma list sweeps, e.g. 100,500,1000"
    )
    ld.add_argument("--duration", type=float, default=d.duration_s, help="seconds per level")
    ld.add_argument("--output-len", type=int, default=d.output_len, help="tokens per request")
    ld.add_argument("--prompt-len", type=int, default=d.prompt_words, help="prompt words per request")
    ld.add_argument("--timeout", type=float, default=d.request_timeout_s, help="seconds allowed per request")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--only", default=None, help="run only the kernels whose name contains this")
    p.add_argument(
        "--e2e",
        action="store_true",
        help="also: decode tokens/s of a random-weight Llama-3-8B-shaped model (toy model on CPU)",
    )
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-output-len", type=int, default=128)
    p.add_argument("--enforce-eager", action="store_true", help="e2e: no CUDA graphs")
    p.add_argument(
        "--e2e-quantization", default="none", choices=["none", "int4", "int8"], help="e2e: weight-only GEMM"
    )
    p.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=["all", "decode", "int4"],
        help="GPU: time paged_decode and/or int4 GEMM over launch configurations (tuning)",
    )


def add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="GGUF file, HF directory or Hub id (default: the demo model)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="decode steps timed")
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps under the profiler")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", help="as pagoda serve takes it")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks the model is split over (each takes its share of --threads; steps run eagerly)",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="stages of layers, each on its own ranks (times -tp; a micro-batch per stage in flight)",
    )
    p.add_argument(
        "--enable-expert-parallel",
        "-ep",
        action="store_true",
        help="MoE models: experts split across the ranks whole (with -tp or -dp) rather than sharded",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="MoE models with -ep: engines of their own meeting at the MoE layers (the batch spread over "
        "them; each takes its share of --threads)",
    )
    p.add_argument(
        "--compile",
        default="on",
        choices=["on", "off"],
        help="decode steps through compiled graphs (on: loaded from the cache or compiled first, "
        "as `pagoda serve` runs once they are ready; off: eager)",
    )
    p.add_argument("--json", action="store_true")
