"""Engine configuration: frozen dataclasses built once (from the CLI, env or code) and validated
with the numbers in the message.

Importing this module does not import torch (the CLI reads these defaults to build every role's
parser, and the gateway, tokenizer and scheduler roles run without torch); only the functions that
answer with a torch device or dtype import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pagoda.engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("auto", "on", "off")  # EngineConfig.compile: see runner/compile_cache.py
SchedulingPolicy = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None -> default for the device
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # tests: force a tiny pool

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class BatcherConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    scheduling_policy: SchedulingPolicy = "fcfs"
    enable_chunked_prefill: bool = True
    max_loras: int = 0  # distinct LoRA adapters running at once (0: no limit; the engine sets it)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA (pagoda/engine/lora): adapters held in `max_loras` slots of rank up to
    `max_lora_rank`, filled from a CPU cache of `max_cpu_loras` adapters (None: max_loras)."""

    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in [1, 512], got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras {self.max_cpu_loras} must be at least max_loras {self.max_loras}"
            )

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks one engine spans (pagoda/engine/distributed): `tensor_parallel_size` ranks
    each hold a shard of every layer (vLLM's meaning); rank 0 runs the step loop and starts the
    others itself. `collective_timeout_s`: how long a collective waits for a rank before the
    engine fails (a dead rank ends the worker within it, no hang). `pipeline_parallel_size`
    stages each hold a contiguous part of the layers. Several nodes (`nnodes`) meet at
    `master_addr:master_port` (node 0's rank 0 hosts the rendezvous); each runs an equal share of
    the ranks, node 0 the engine (distributed/pipeline_ranks.py, nodes.py)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    collective_timeout_s: float = 60.0
    # mixture-of-experts models (distributed/expert_parallel.py): the experts split across the
    # ranks rather than each expert sharded; data_parallel_size engines of their own meeting at
    # the MoE layers (distributed/data_parallel.py)
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be at least 1, got {self.pipeline_parallel_size}")
        self._check_nodes()
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        from pagoda.engine.distributed.moe_checks import check_parallel_sizes

        check_parallel_sizes(self.data_parallel_size, self.enable_expert_parallel)

    def _check_nodes(self) -> None:
        world = self.world_size
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes}) (and --nnodes >= 1)"
            )
        if world % self.nnodes:
            raise ValueError(
                f"--nnodes {self.nnodes} must divide the {world} ranks (tensor x pipeline parallel "
                "size): each node runs an equal share"
            )
        if self.data_parallel_size > 1 and (self.pipeline_parallel_size > 1 or self.nnodes > 1):
            raise ValueError(
                f"--data-parallel-size {self.data_parallel_size} with --pipeline-parallel-size or "
                "--nnodes is not supported yet; use one of them"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be a TCP port (1-65535), got {self.master_port}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # GGUF file, HF directory or Hub id; "" -> the demo model
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"  # auto (Triton on a GPU) | torch | triton
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    quantization: str = "auto"  # see resolve_quantization (pagoda.engine.models.quantization)
    # CPU: decode-only steps through compiled graphs: auto | on | off (runner/compile_cache.py);
    # the CLI's default is auto, the library's off (True / False: on / off)
    compile: str = "off"
    task: str = "auto"  # auto | generate | embed: see pagoda/engine/pooling/params.py
    pooling_type: str | None = None  # embeddings: last | mean | cls (None: the checkpoint's)
    cache: CacheConfig = CacheConfig()
    batcher: BatcherConfig = BatcherConfig()
    lora: LoRAConfig = LoRAConfig()
    # speculative decoding (pagoda/engine/spec_decode): vLLM's --speculative-config, as its JSON
    # text, a dict or a SpeculativeConfig (kept as the latter); None: off
    speculative_config: SpeculativeConfig | None = None
    parallel: ParallelConfig = ParallelConfig()

    def __post_init__(self) -> None:
        self._check_speculative()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is visible; use --device cpu")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}"
            )
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.compile == "on" and (self.attention_backend == "triton" or self.device == "cuda"):
            raise ValueError(
                "--compile runs on the CPU with the torch attention backend; on a GPU decode steps "
                "run in CUDA graphs already (drop --compile)"
            )
        if self.compile == "on" and self.quantization == "int8":
            raise ValueError(
                "--compile cannot trace --quantization int8 (its weights are packed for fbgemm, "
                "opaque to torch.compile); drop one of them, or use --quantization int4 --compile"
            )
        self._check_parallel()
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")

    def _check_speculative(self) -> None:
        spec = self.speculative_config
        if spec is not None and not isinstance(spec, SpeculativeConfig):
            # JSON text or its decoded object (LLM(speculative_config={...}), as vLLM takes it)
            spec = SpeculativeConfig.parse(spec)
            object.__setattr__(self, "speculative_config", spec)
        if spec is not None and spec.method not in ("ngram", "draft_model"):
            raise ValueError(
                f"speculative method {spec.method!r} is not implemented yet; use "
                '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                'or \'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\''
            )

    def _check_parallel(self) -> None:
        par = self.parallel
        if par.world_size == 1:
            return
        flag = (  # the flag that splits the model, named by the refusals below
            f"--tensor-parallel-size {par.tensor_parallel_size}"
            if par.tensor_parallel_size > 1
            else f"--pipeline-parallel-size {par.pipeline_parallel_size}"
        )
        if self.lora.enable_lora:
            raise ValueError(f"--enable-lora does not run with {flag} yet; drop one of them")
        if self.compile == "on":
            raise ValueError(
                f"--compile traces one rank's model: with {flag} steps run eagerly; drop --compile"
            )

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 matmul is
    emulated: measured 1 GFLOP/s against fp32's 173 on an AVX2-only EPYC."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(dtype: str, quantization: str, device: torch.device) -> torch.dtype:
    """The dtype an engine runs in: `resolve_dtype`, except that CPU int8 dynamic linears take and
    give float32 activations, so `auto` picks float32 under `--quantization int8`."""
    if dtype == "auto" and quantization == "int8" and device.type == "cpu":
        dtype = "float32"
    return resolve_dtype(dtype, device, None)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """`auto`: bfloat16 on GPUs (or the checkpoint's half dtype); on CPU bfloat16 where the CPU has
    native bf16 (3x fp32's matmul speed measured on AVX512-BF16), else float32."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)  # type: ignore[no-any-return]
    if device.type == "cuda":
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def validate_max_model_len(requested: int | None, model_max: int) -> int:
    if requested is None:
        return model_max
    if requested > model_max:
        raise ValueError(
            f"max_model_len {requested} exceeds the model's maximum context length {model_max}; "
            f"pass --max-model-len {model_max} or less"
        )
    return requested
