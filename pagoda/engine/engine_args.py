"""The engine's command-line flags and the `EngineConfig` they build.

`pagoda serve`, `pagoda worker` and `pagoda bench offline` add these flags; the gateway and the
tokenizer take them too (one flag set for every role of a deployment) but read only the model
flags. Every default is read from the config dataclasses (`engine/config.py`), so a default is
written once. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from typing import Any

from pagoda.engine.config import (
    COMPILE_MODES,
    DTYPES,
    BatcherConfig,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ParallelConfig,
    SchedulingPolicy,
)
from pagoda.engine.distributed.nodes import node_flags
from pagoda.engine.pooling.params import POOLING_TYPES, TASKS
from pagoda.engine.spec_decode.config import SpeculativeConfig

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
    """'2GiB', '512MiB', '1g', '1073741824' -> bytes (an argparse `type`)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 2GiB, 512MiB or 1073741824")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}; use KiB, MiB, GiB or bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`: argparse defaults are read from here, so the
    dataclass holds the only copy. Raises KeyError for a field without a plain default."""
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    if default is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no plain default")
    return default


class _Repeatable(argparse.Action):
    """A flag that may be given more than once: `dest` holds the first value (what one engine
    reads), `<dest>s` every value in order (a gateway or `pagoda serve` serving several models)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        given = list(getattr(namespace, self.dest + "s", None) or [])
        if not given:
            setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "s", [*given, values])


def add_model_args(g: argparse._ArgumentGroup) -> None:
    """The flags that name the model and its limits: all the gateway and tokenizer read."""
    g.add_argument(
        "--model",
        action=_Repeatable,
        default=field_default(EngineConfig, "model"),
        help="GGUF file, HF model directory or Hub id (default: the demo SmolLM2 GGUF); `pagoda "
        "serve`, the gateway and the tokenizer take it more than once to serve several models (each "
        "its own engine; other engine flags apply to each)",
    )
    g.add_argument(
        "--served-model-name",
        action=_Repeatable,
        default=field_default(EngineConfig, "served_model_name"),
        help="name clients use in the `model` field (with several --model: once per model, in order)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=field_default(EngineConfig, "max_model_len"),
        help="context length (default: the model's)",
    )
    g.add_argument(
        "--task",
        default=field_default(EngineConfig, "task"),
        choices=TASKS,
        help="generate: text (chat and completions); embed: /v1/embeddings (a pooling model); auto: "
        "embed for embedding checkpoints (sentence-transformers, bare ...Model architectures, BERT), "
        "else generate",
    )
    g.add_argument(
        "--pooling-type",
        default=field_default(EngineConfig, "pooling_type"),
        choices=POOLING_TYPES,
        help="embeddings: the last token's hidden state, the mean over the prompt, or the first "
        "(CLS) token's (default: what the checkpoint states, else cls for encoders and last otherwise)",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The `engine` flag group: the model flags, then the engine's, KV cache's and batcher's."""
    g = p.add_argument_group("engine")
    add_model_args(g)
    _add_runtime_args(g)
    _add_cache_and_batcher_args(g)
    _add_lora_args(g)
    _add_parallel_args(g)


def _add_runtime_args(g: argparse._ArgumentGroup) -> None:
    def default(name: str) -> Any:
        return field_default(EngineConfig, name)

    g.add_argument("--dtype", default=default("dtype"), choices=DTYPES)
    g.add_argument("--device", default=default("device"), choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=default("seed"))
    g.add_argument(
        "--quantization",
        default=default("quantization"),
        choices=["auto", "none", "int8", "int4", "gguf", "compressed-tensors", "gptq", "awq"],
        help="auto: a quantized checkpoint's own quantization, served packed (GGUF, compressed-tensors, "
        "GPTQ, AWQ), else none; none: dequantize; int4/int8: quantize at load (int4 weight-only; int8 "
        "weights and activations); a format name must match the checkpoint (pagoda quantize writes one)",
    )
    g.add_argument(
        "--attention-backend",
        default=default("attention_backend"),
        choices=["auto", "torch", "triton"],
        help="auto: Triton kernels on a GPU, torch on the CPU",
    )
    g.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs or compiled graphs for decode steps"
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default=os.environ.get("PAGODA_COMPILE", "auto"),
        choices=COMPILE_MODES,
        help="CPU decode steps through compiled graphs, saved for later starts "
        "(~/.cache/pagoda/compiled). auto: load them, or serve eagerly while a background process "
        "compiles them; on (bare --compile): load, or compile before serving; off: eager "
        "(default: $PAGODA_COMPILE or auto)",
    )
    g.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as vLLM spells it, a JSON object: {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2} (prompt lookup; '
        '"disable_by_batch_size": N turns it off in steps with more running sequences); default: off',
    )


def _add_cache_and_batcher_args(g: argparse._ArgumentGroup) -> None:
    def cache(name: str) -> Any:
        return field_default(CacheConfig, name)

    def batcher(name: str) -> Any:
        return field_default(BatcherConfig, name)

    g.add_argument("--block-size", type=int, default=cache("block_size"), help="tokens per KV block")
    g.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=cache("kv_cache_memory"),
        help="KV cache size, e.g. 2GiB (CPU default 1GiB)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=cache("gpu_memory_utilization"))
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=cache("enable_prefix_caching"),
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=batcher("max_num_batched_tokens"),
        help="token budget per step",
    )
    g.add_argument(
        "--max-num-seqs", type=int, default=batcher("max_num_seqs"), help="most sequences running at once"
    )
    g.add_argument(
        "--scheduling-policy",
        default=batcher("scheduling_policy"),
        choices=typing.get_args(SchedulingPolicy),
    )


def _add_lora_args(g: argparse._ArgumentGroup) -> None:
    def lora(name: str) -> Any:
        return field_default(LoRAConfig, name)

    g.add_argument(
        "--enable-lora",
        action="store_true",
        default=lora("enable_lora"),
        help="serve PEFT LoRA adapters over the model (loaded at run time), several in one step",
    )
    g.add_argument(
        "--max-loras", type=int, default=lora("max_loras"), help="adapters in one step (slots held at once)"
    )
    g.add_argument(
        "--max-lora-rank", type=int, default=lora("max_lora_rank"), help="the highest adapter rank served"
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=lora("max_cpu_loras"),
        help="adapters kept in CPU memory, least recently used dropped first (default: --max-loras)",
    )


def _add_parallel_args(g: argparse._ArgumentGroup) -> None:
    def parallel(name: str) -> Any:
        return field_default(ParallelConfig, name)

    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=parallel("tensor_parallel_size"),
        help="ranks that each hold a shard of every layer (started by this engine; gloo on the CPU, "
        "NCCL on GPUs): Llama, Qwen2 and Qwen3 families",
    )
    g.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=parallel("pipeline_parallel_size"),
        help="stages of consecutive layers, each on its own ranks (Llama, Qwen2 and Qwen3 families)",
    )
    _add_node_args(g)
    g.add_argument(
        "--distributed-timeout",
        type=float,
        default=parallel("collective_timeout_s"),
        help="seconds a collective between ranks waits before the engine fails (a dead rank ends the "
        "worker within it)",
    )
    add_expert_parallel_args(g)


def _add_node_args(g: argparse._ArgumentGroup) -> None:
    """Several nodes (vLLM's flags). Unset (None), they come from torchrun's environment where the
    engine spans ranks (nodes.py: node_flags), else ParallelConfig's defaults."""
    g.add_argument(
        "--nnodes", type=int, default=None,
        help="nodes the ranks are spread over, an equal share each (default: env NNODES, else 1)",
    )  # fmt: skip
    g.add_argument(
        "--node-rank", type=int, default=None,
        help="this node's rank: 0 runs the engine; others run only their ranks (env NODE_RANK, else 0)",
    )  # fmt: skip
    g.add_argument(
        "--master-addr", default=None,
        help="node 0's address, where the nodes meet (env MASTER_ADDR, else 127.0.0.1)",
    )  # fmt: skip
    g.add_argument(
        "--master-port", type=int, default=None,
        help="the port node 0 listens on for the rendezvous (env MASTER_PORT, else 29500)",
    )  # fmt: skip


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of the engine flags (`add_engine_args`); raises ValueError naming the
    flag to change when a value is out of range."""
    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        quantization=args.quantization,
        compile="off" if args.enforce_eager else args.compile,
        task=args.task,
        pooling_type=args.pooling_type,
        speculative_config=_speculative_config(args.speculative_config),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        batcher=BatcherConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            scheduling_policy=args.scheduling_policy,
        ),
        lora=LoRAConfig(
            enable_lora=args.enable_lora,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
        ),
        parallel=ParallelConfig(
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            collective_timeout_s=args.distributed_timeout,
            enable_expert_parallel=args.enable_expert_parallel,
            data_parallel_size=args.data_parallel_size,
            **node_flags(
                args.tensor_parallel_size * args.pipeline_parallel_size,
                {k: getattr(args, k) for k in ("nnodes", "node_rank", "master_addr", "master_port")},
            ),
        ),
    )


def _speculative_config(text: str | None) -> SpeculativeConfig | None:
    """--speculative-config's JSON; a ValueError names the flag and what to change."""
    if text is None or not text.strip():
        return None
    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        msg = str(e) if str(e).startswith("--speculative-config") else f"--speculative-config: {e}"
        raise ValueError(msg) from None


def add_expert_parallel_args(g: argparse._ArgumentGroup) -> None:
    """Mixture-of-experts parallelism (vLLM's flags; pagoda/engine/distributed/expert_parallel.py)."""
    g.add_argument(
        "--enable-expert-parallel",
        "-ep",
        action="store_true",
        default=field_default(ParallelConfig, "enable_expert_parallel"),
        help="MoE models: split the experts across the tensor-parallel (and data-parallel) ranks "
        "instead of sharding each expert; attention stays tensor-parallel",
    )
    g.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=field_default(ParallelConfig, "data_parallel_size"),
        help="MoE models with --enable-expert-parallel: engines of their own (scheduler, KV cache, "
        "worker queue), each running attention on its own batch (over --tensor-parallel-size ranks), "
        "meeting at the MoE layers; the experts split over all the ranks",
    )
