"""The `pagoda` command's argument parser.

Every default is read from the config dataclass the flag feeds (`field_default`), never written
here. A role's parser also carries, through `set_defaults`, the defaults of the config fields it
has no flag for (`pagoda serve` has no --worker-id), so config.py
reads every field as an attribute. Building the parser imports neither torch nor the benchmarks.
"""

from __future__ import annotations

import argparse

from pagoda.compress.cli import add_quantize_parser
from pagoda.engine import add_engine_args, field_default, parse_size
from pagoda.load.cli import add_bench_parser
from pagoda.load.perplexity import add_eval_parser
from pagoda.services.cli.config import DEFAULT_LOG_LEVEL, ROLES, ClusterConfig, GatewayConfig, WorkerConfig
from pagoda.services.gateway.limits import RequestLimits
from pagoda.services.gateway.ratelimit import RateLimits
from pagoda.services.gateway.reasoning import PARSERS as REASONING_PARSERS
from pagoda.services.gateway.tool_parsers import PARSERS as TOOL_CALL_PARSERS
from pagoda.services.scheduler.admission import AdmissionLimits

_ROLE_HELP = {
    "gateway": "the OpenAI HTTP front end",
    "tokenizer": "chat templates, tokenization and prompt checks",
    "scheduler": "the cluster dispatcher: routes requests to workers",
    "worker": "the engine: model, paged KV cache, continuous batching",
}
assert tuple(_ROLE_HELP) == ROLES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: an LLM inference server")
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run all four services in one process (in-memory bus and store unless --bus/--store)"
    )
    add_engine_args(serve)
    add_backend_args(serve)
    add_server_args(serve)
    add_admission_args(serve)
    add_cluster_args(serve, bus_required=False, store_required=False)
    serve.set_defaults(
        **_unflagged_worker_defaults(), metrics_port=field_default(ClusterConfig, "metrics_port")
    )
    for role, text in _ROLE_HELP.items():
        _add_role_parser(sub.add_parser(role, help=f"run the {role} service alone: {text}"), role)
    sub.add_parser("models", help="list the demo catalog")
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_quantize_parser(sub)
    return parser


def _add_role_parser(p: argparse.ArgumentParser, role: str) -> None:
    if role != "scheduler":
        add_engine_args(p)
    if role == "gateway":
        add_server_args(p)
    if role != "tokenizer":
        add_admission_args(p)
    # a worker of node rank > 0 runs only its ranks (no bus, no store): LaunchConfig asks for them
    required = role != "worker"
    add_cluster_args(p, bus_required=required, store_required=required and role != "tokenizer")
    if role == "worker":
        add_backend_args(p)
        p.add_argument(
            "--worker-id",
            default=field_default(WorkerConfig, "worker_id"),
            help="stable id (default: random)",
        )
        p.add_argument(
            "--stall-timeout",
            type=float,
            default=field_default(WorkerConfig, "stall_timeout_s"),
            help="report the worker stalled (no new traffic; its requests move) when requests wait "
            "but no engine step finished for this many seconds",
        )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=field_default(ClusterConfig, "metrics_port"),
        help="serve Prometheus /metrics on this port (default: off; a gateway serves it on --port "
        "too, but gateways sharing a port with --reuse-port each need their own to be scraped)",
    )


def _unflagged_worker_defaults() -> dict[str, object]:
    return {
        "worker_id": field_default(WorkerConfig, "worker_id"),
        "stall_timeout": field_default(WorkerConfig, "stall_timeout_s"),
    }


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """The worker's engine backend; the sim flags default to `SimConfig`'s values (None here)."""
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "sim"],
        help="torch: the model; sim: no model, tokens at a modeled speed (control-plane benchmarks)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=field_default(WorkerConfig, "threads"),
        help="torch: the CPU engine's intra-op threads (0: torch's default, at most the CPUs this "
        "process may use: its affinity mask and cgroup CPU quota); `pagoda serve` with several "
        "--model splits them evenly. Several workers on one host: give each its share of the cores",
    )
    g.add_argument("--sim-step-ms", type=float, default=None, help="sim: wall time of one engine step")
    g.add_argument("--sim-max-batch", type=int, default=None, help="sim: most sequences in one step")
    g.add_argument("--sim-eos-prob", type=float, default=None, help="sim: chance per token of EOS")


def add_server_args(p: argparse.ArgumentParser) -> None:
    def gateway(name: str) -> object:
        return field_default(GatewayConfig, name)

    s = p.add_argument_group("server")
    s.add_argument("--host", default=gateway("host"))
    s.add_argument("--port", type=int, default=gateway("port"))
    s.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so that several gateway processes on this host share --port "
        "(the kernel spreads connections over them; each has its own reply queue)",
    )
    s.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="required bearer key (repeatable); also env PAGODA_API_KEYS (comma separated), PAGODA_API_KEY",
    )
    s.add_argument("--api-key-file", default=None, help="file of bearer keys, one a line (# comments)")
    s.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let tool_choice 'auto' (the default with tools) read the model's own tool calls; "
        "needs --tool-call-parser",
    )
    s.add_argument(
        "--tool-call-parser",
        choices=list(TOOL_CALL_PARSERS),
        default=None,
        help="the syntax of the model's tool calls: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen "
        "2.5/3, and what pagoda writes for templates without tools)",
    )
    s.add_argument(
        "--reasoning-parser",
        choices=list(REASONING_PARSERS),
        default=None,
        help="reasoning models: the answer's <think>...</think> text goes to reasoning_content, "
        "streamed apart from content (deepseek_r1: the answer starts inside it; qwen3: when it opens it)",
    )
    s.add_argument(
        "--responses-ttl",
        type=float,
        default=gateway("responses_ttl_s"),
        help="seconds a stored Responses API response (store: true, the default) and its conversation "
        "are kept for GET /v1/responses/{id} and previous_response_id (in --store: Redis, or memory)",
    )
    s.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="with --enable-lora: PEFT adapter directories served as model NAME (each a name=path, "
        'or vLLM\'s JSON {"name", "path", "base_model_name"}); more load at run time '
        "(POST /v1/load_lora_adapter)",
    )
    _add_request_limit_args(p)


def _add_request_limit_args(p: argparse.ArgumentParser) -> None:
    def limit(name: str) -> object:
        return field_default(RequestLimits, name)

    lim = p.add_argument_group("request limits (a request over one gets a 4xx)")
    lim.add_argument(
        "--max-request-body-bytes", type=parse_size, default=limit("max_body_bytes"), help="413 above this"
    )
    lim.add_argument("--max-n", type=int, default=limit("max_n"), help="most choices (n) per request")
    lim.add_argument(
        "--max-tokens-limit",
        type=int,
        default=limit("max_tokens"),
        help="largest max_tokens (default: the context length)",
    )
    lim.add_argument(
        "--max-stop-strings", type=int, default=limit("max_stop"), help="most stop strings per request"
    )
    lim.add_argument(
        "--max-logit-bias",
        type=int,
        default=limit("max_logit_bias"),
        help="most logit_bias entries per request",
    )
    lim.add_argument(
        "--max-json-depth", type=int, default=limit("max_json_depth"), help="deepest JSON nesting of a body"
    )
    lim.add_argument(
        "--rate-limit-requests",
        type=int,
        default=field_default(RateLimits, "requests_per_minute"),
        help="requests per minute per API key (429 above)",
    )
    lim.add_argument(
        "--rate-limit-tokens",
        type=int,
        default=field_default(RateLimits, "tokens_per_minute"),
        help="tokens (prompt + max_tokens) per minute per API key (429 above)",
    )
    lim.add_argument(
        "--queue-timeout",
        type=float,
        default=field_default(GatewayConfig, "queue_timeout_s"),
        help="seconds a request may wait to start before it fails with a 503 (0: no limit)",
    )


def add_admission_args(p: argparse.ArgumentParser) -> None:
    max_waiting = field_default(AdmissionLimits, "max_waiting")
    a = p.add_argument_group("admission (beyond these, requests are refused with 503 at once)")
    a.add_argument(
        "--max-waiting-requests",
        type=int,
        default=-1 if max_waiting is None else max_waiting,
        help="sequences each worker may queue beyond its running slots (-1: no cap)",
    )
    a.add_argument(
        "--priority-reserve",
        type=int,
        default=field_default(AdmissionLimits, "priority_reserve"),
        help="extra queue room per worker for priority requests (priority < 0)",
    )


def add_cluster_args(p: argparse.ArgumentParser, *, bus_required: bool, store_required: bool) -> None:
    def cluster(name: str) -> object:
        return field_default(ClusterConfig, name)

    c = p.add_argument_group("cluster")
    c.add_argument(
        "--bus",
        default=cluster("bus"),
        required=bus_required,
        help="amqp://user:pass@host:5672/ (default: in-memory)",
    )
    c.add_argument(
        "--store",
        default=cluster("store"),
        required=store_required,
        help="redis://host:6379/0 (default: in-memory)",
    )
    c.add_argument(
        "--namespace",
        default=cluster("namespace"),
        help="prefix of every queue name and store key of this deployment",
    )
    c.add_argument("--router", default=cluster("router"), choices=["prefix", "least-load", "round-robin"])
    c.add_argument(
        "--heartbeat-interval",
        type=float,
        default=cluster("heartbeat_s"),
        help="seconds between worker heartbeats",
    )
    c.add_argument(
        "--otlp-endpoint",
        default=cluster("otlp_endpoint"),
        help="export OpenTelemetry traces over OTLP/HTTP, e.g. http://otel-collector:4318 "
        "(env OTEL_EXPORTER_OTLP_ENDPOINT; default: off)",
    )
    c.add_argument(
        "--shutdown-timeout",
        type=float,
        default=cluster("shutdown_timeout_s"),
        help="on SIGTERM, seconds to let running requests finish before exiting (a worker takes no new ones)",
    )
