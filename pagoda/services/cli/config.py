"""Each role's configuration, built once from the command line.

`pagoda serve` and `pagoda gateway|tokenizer|scheduler|worker` parse their flags (parser.py) and
turn them into one frozen `LaunchConfig` here; the launcher reads nothing else. Every flag's
default is the default of a field of these dataclasses (or of the engine's, gateway's and
scheduler's configs they hold), read by the parser through `field_default`, so a default is
written once. Values a user can get wrong raise ValueError naming the flag and the number.

This module imports neither torch nor the engine's model code: the gateway, tokenizer and
scheduler roles build their configs without them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.engine import EngineConfig, LoRAConfig, engine_config_from_args
from pagoda.services.gateway.limits import RequestLimits
from pagoda.services.gateway.ratelimit import RateLimits
from pagoda.services.gateway.responses_protocol import RESPONSES_TTL_S
from pagoda.services.gateway.tool_parsers import PARSERS as TOOL_CALL_PARSERS
from pagoda.services.scheduler.admission import AdmissionLimits

if TYPE_CHECKING:
    from pagoda.engine import SimConfig

ROLES = ("gateway", "tokenizer", "scheduler", "worker")
DEFAULT_LOG_LEVEL = "INFO"  # of the process (--log-level), and of uvicorn's log in the gateway
_MODEL_ROLES = frozenset({"gateway", "tokenizer", "worker"})  # roles whose parser has --model
_ADMISSION_ROLES = frozenset({"gateway", "scheduler", "worker"})  # roles whose parser has admission flags


@dataclass(frozen=True)
class ClusterConfig:
    """How this process joins a deployment. `bus`/`store` None: in-memory (only `pagoda serve`)."""

    bus: str | None = None  # amqp://user:pass@host:5672/
    store: str | None = None  # redis://host:6379/0
    namespace: str = "pagoda"  # prefix of every queue name and store key of this deployment
    router: str = "prefix"
    heartbeat_s: float = 1.0  # seconds between worker heartbeats
    otlp_endpoint: str | None = None
    shutdown_timeout_s: float = 30.0  # on SIGTERM, seconds running requests get to finish
    metrics_port: int | None = None  # Prometheus /metrics of a worker, tokenizer or scheduler

    def __post_init__(self) -> None:
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout_s}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"--heartbeat-interval must be > 0 seconds, got {self.heartbeat_s}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be a TCP port (1-65535), got {self.metrics_port}")
        if not self.namespace:
            raise ValueError("--namespace must not be empty; it prefixes every queue and store key")


@dataclass(frozen=True)
class ModelSource:
    """The model a gateway, tokenizer or worker serves, as the flags name it."""

    model: str  # GGUF file, HF directory or Hub id; "" -> the demo model
    served_model_name: str | None
    max_model_len: int | None  # None: the model's context length
    task: str = "auto"  # --task: generate or embed (auto: what the checkpoint is made for)
    pooling_type: str | None = None  # --pooling-type

    @property
    def name_hint(self) -> str:
        """What tells this model apart on the command line (its served name or its path)."""
        return self.served_model_name or self.model


@dataclass(frozen=True)
class GatewayConfig:
    """The HTTP front end: where it listens, who may call it, and what one request may ask."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # from --api-key, --api-key-file and the environment
    limits: RequestLimits = field(default_factory=RequestLimits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    queue_timeout_s: float = 300.0  # seconds a request may wait to start (503 after); 0: no limit
    log_level: str = DEFAULT_LOG_LEVEL
    reuse_port: bool = False  # SO_REUSEPORT: several gateway processes of a host share the port
    tool_call_parser: str | None = None  # --enable-auto-tool-choice --tool-call-parser: tool_choice auto
    reasoning_parser: str | None = None  # --reasoning-parser: <think> text as reasoning_content
    responses_ttl_s: float = RESPONSES_TTL_S  # --responses-ttl: how long a stored response lives
    enable_lora: bool = False  # --enable-lora: LoRA adapters over the models, loadable at run time
    max_lora_rank: int = LoRAConfig.max_lora_rank  # --max-lora-rank: higher ranks are refused
    # --lora-modules: (name, path, base model's served name or None: the first model)
    lora_modules: tuple[tuple[str, str, str | None], ...] = ()

    def __post_init__(self) -> None:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        if self.responses_ttl_s <= 0:
            raise ValueError(f"--responses-ttl must be > 0 seconds, got {self.responses_ttl_s}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"--tool-call-parser {self.tool_call_parser!r}: choose one of {', '.join(TOOL_CALL_PARSERS)}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be a TCP port (0-65535), got {self.port}")
        if self.queue_timeout_s < 0:
            raise ValueError(
                f"--queue-timeout must be >= 0 seconds (0: no limit), got {self.queue_timeout_s}"
            )


@dataclass(frozen=True)
class WorkerConfig:
    """The engine of a worker: the model (`engine`) or, with `sim`, simulated steps (no model)."""

    engine: EngineConfig
    sim: SimConfig | None = None  # set: the sim backend (control-plane benchmarks)
    worker_id: str | None = None  # None: a random id
    stall_timeout_s: float = 30.0  # requests wait but no step finished this long: reported stalled
    threads: int = 0  # a CPU engine's intra-op threads (0: auto; engine/core/cpu_threads.py)

    def __post_init__(self) -> None:
        if self.stall_timeout_s <= 0:
            raise ValueError(f"--stall-timeout must be > 0 seconds, got {self.stall_timeout_s}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: auto), got {self.threads}")


@dataclass(frozen=True)
class LaunchConfig:
    """Everything one `pagoda` process runs: which roles, and each role's configuration (None for
    the roles it does not run)."""

    roles: tuple[str, ...]
    cluster: ClusterConfig
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    models: tuple[ModelSource, ...] = ()  # set when a gateway, tokenizer or worker runs
    gateway: GatewayConfig | None = None
    worker: WorkerConfig | None = None

    def __post_init__(self) -> None:
        assert self.roles and set(self.roles) <= set(ROLES), self.roles
        no_bus = not self.cluster.bus or self.cluster.bus.startswith("memory")
        # (a worker's parser leaves them optional: one of node rank > 0 needs neither)
        if (len(self.roles) == 1 and no_bus) or (self.roles == ("worker",) and not self.cluster.store):
            raise ValueError(
                f"`pagoda {self.roles[0]}` runs alone: give it --bus amqp://... and --store redis://..."
            )
        assert ("gateway" in self.roles) == (self.gateway is not None), self.roles
        assert ("worker" in self.roles) == (self.worker is not None), self.roles
        assert bool(self.models) == bool(_MODEL_ROLES & set(self.roles)), self.roles
        if self.roles == ("worker",) and len(self.models) > 1:
            raise ValueError(
                f"a worker serves one model (--model given {len(self.models)} times): run one "
                "`pagoda worker` per model"
            )
        names = [m.name_hint for m in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"--model names the same model twice ({', '.join(names)})")

    @property
    def model(self) -> ModelSource | None:
        """The first (or only) model; None for a process without a model role."""
        return self.models[0] if self.models else None

    @property
    def service_name(self) -> str:
        """The name tracing gives this process: `pagoda` embedded, `pagoda-<role>` alone."""
        return "pagoda" if len(self.roles) > 1 else f"pagoda-{self.roles[0]}"


def launch_config(args: argparse.Namespace, roles: tuple[str, ...]) -> LaunchConfig:
    """The `LaunchConfig` of `pagoda serve` (all roles) or `pagoda <role>` from the parsed flags.
    Raises ValueError naming the flag to change."""
    has = set(roles)
    return LaunchConfig(
        roles=roles,
        cluster=cluster_config(args),
        admission=admission_limits(args) if has & _ADMISSION_ROLES else AdmissionLimits(),
        models=model_sources(args) if has & _MODEL_ROLES else (),
        gateway=gateway_config(args) if "gateway" in has else None,
        worker=worker_config(args) if "worker" in has else None,
    )


def model_sources(args: argparse.Namespace) -> tuple[ModelSource, ...]:
    """One `ModelSource` per --model (the demo model when none is given), each with its
    --served-model-name (given once per model, or not at all)."""
    paths = getattr(args, "models", None) or [args.model]
    given = getattr(args, "served_model_names", None)
    if given and len(given) != len(paths):
        raise ValueError(
            f"--served-model-name was given {len(given)} times for {len(paths)} --model: give it "
            "once per model, in the same order, or leave it out"
        )
    names = given or [args.served_model_name] * len(paths)
    return tuple(
        ModelSource(path, name, args.max_model_len, args.task, args.pooling_type)
        for path, name in zip(paths, names, strict=True)
    )


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        bus=args.bus,
        store=args.store,
        namespace=args.namespace,
        router=args.router,
        heartbeat_s=args.heartbeat_interval,
        otlp_endpoint=args.otlp_endpoint,
        shutdown_timeout_s=args.shutdown_timeout,
        metrics_port=args.metrics_port,
    )


def admission_limits(args: argparse.Namespace) -> AdmissionLimits:
    """The `AdmissionLimits` of the admission flags (--max-waiting-requests -1: no cap)."""
    waiting = args.max_waiting_requests
    return AdmissionLimits(
        max_waiting=None if waiting < 0 else waiting, priority_reserve=args.priority_reserve
    )


def request_limits(args: argparse.Namespace) -> RequestLimits:
    """The `RequestLimits` of the request-limit flags."""
    return RequestLimits(
        max_body_bytes=args.max_request_body_bytes,
        max_json_depth=args.max_json_depth,
        max_n=args.max_n,
        max_tokens=args.max_tokens_limit,
        max_stop=args.max_stop_strings,
        max_logit_bias=args.max_logit_bias,
    )


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """Reads the key file and the PAGODA_API_KEY(S) environment (ValueError for an unreadable or
    empty key file)."""
    from pagoda.services.gateway.auth import load_api_keys

    return GatewayConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(load_api_keys(args.api_key, args.api_key_file)),
        limits=request_limits(args),
        rate_limits=RateLimits(args.rate_limit_requests, args.rate_limit_tokens),
        queue_timeout_s=args.queue_timeout,
        log_level=args.log_level,
        reuse_port=getattr(args, "reuse_port", False),
        tool_call_parser=_tool_call_parser(args),
        reasoning_parser=getattr(args, "reasoning_parser", None),
        responses_ttl_s=getattr(args, "responses_ttl", RESPONSES_TTL_S),
        enable_lora=args.enable_lora,
        max_lora_rank=args.max_lora_rank,
        lora_modules=tuple(lora_module(text) for text in getattr(args, "lora_modules", [])),
    )


def lora_module(text: str) -> tuple[str, str, str | None]:
    """One --lora-modules entry: `name=path`, or vLLM's JSON `{"name", "path", "base_model_name"}`."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
            return str(entry["name"]), str(entry["path"]), entry.get("base_model_name")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"--lora-modules {text!r}: not a JSON object with name and path ({exc})"
            ) from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: write it as name=path")
    return name, path, None


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    """vLLM's pair of flags: --enable-auto-tool-choice needs --tool-call-parser."""
    if not getattr(args, "enable_auto_tool_choice", False):
        return None
    if not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes)")
    return str(args.tool_call_parser)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """With `--backend sim` this imports the simulated core (and with it torch, as a worker may)."""
    sim = None
    if args.backend == "sim":
        from pagoda.engine import SimConfig

        flags = {"step_ms": args.sim_step_ms, "max_batch": args.sim_max_batch, "eos_prob": args.sim_eos_prob}
        sim = SimConfig(seed=args.seed, **{k: v for k, v in flags.items() if v is not None})
    return WorkerConfig(
        engine=engine_config_from_args(args),
        sim=sim,
        worker_id=args.worker_id,
        stall_timeout_s=args.stall_timeout,
        threads=args.threads,
    )
