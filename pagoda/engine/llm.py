"""Offline batch generation, `LLM(model).generate(prompts, SamplingParams(...))`, and embeddings,
`LLM(model, task="embed").embed(prompts)` (vLLM's shapes: `result.outputs.embedding`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tqdm import tqdm

from pagoda.engine.config import BatcherConfig, CacheConfig, EngineConfig, LoRAConfig, ParallelConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.distributed.nodes import node_flags
from pagoda.engine.loader import Checkpoint
from pagoda.engine.lora.request import LoRARequest
from pagoda.engine.outputs import FinishReason, TokenLogprob
from pagoda.engine.pooling.params import PoolingParams
from pagoda.engine.sampling.params import SamplingParams

_CACHE_KEYS = {"block_size", "kv_cache_memory", "gpu_memory_utilization", "enable_prefix_caching"}
_SCHED_KEYS = {"max_num_batched_tokens", "max_num_seqs", "scheduling_policy", "enable_chunked_prefill"}
_LORA_KEYS = {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"}
_PARALLEL_KEYS = {
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "collective_timeout_s",
    "enable_expert_parallel",
    "data_parallel_size",
}
_NODE_KEYS = {"nnodes", "node_rank", "master_addr", "master_port"}  # default: torchrun's environment


def make_engine_config(model: str = "", **kwargs: Any) -> EngineConfig:
    """Flat keyword arguments (as on the command line) -> the layered EngineConfig."""
    cache = {k: kwargs.pop(k) for k in list(kwargs) if k in _CACHE_KEYS}
    if "num_blocks" in kwargs:
        cache["num_blocks_override"] = kwargs.pop("num_blocks")
    sched = {k: kwargs.pop(k) for k in list(kwargs) if k in _SCHED_KEYS}
    lora = LoRAConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in _LORA_KEYS})
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in _PARALLEL_KEYS}
    world = given.get("tensor_parallel_size", 1) * given.get("pipeline_parallel_size", 1)
    nodes = node_flags(world, {k: kwargs.pop(k) for k in list(kwargs) if k in _NODE_KEYS})
    parallel = ParallelConfig(**given, **nodes)
    if parallel.node_rank > 0:
        raise ValueError(
            f"node rank {parallel.node_rank} runs only its ranks, not an engine: start it with "
            f"`pagoda worker --node-rank {parallel.node_rank}` (node 0 runs the engine)"
        )
    return EngineConfig(
        model=model,
        cache=CacheConfig(**cache),
        batcher=BatcherConfig(**sched),
        lora=lora,
        parallel=parallel,
        **kwargs,
    )


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


class LLM:
    def __init__(
        self,
        model: str = "",
        *,
        config: EngineConfig | None = None,
        checkpoint: Checkpoint | None = None,
        **kwargs: Any,
    ) -> None:
        """`LLM(model, dtype=..., ...)` (flat keywords, as on the command line) or
        `LLM(config=EngineConfig(...))`, not both; `checkpoint` serves an already opened one."""
        if config is not None and (model or kwargs):
            raise TypeError("pass either config= or the model and its keyword arguments, not both")
        config = config if config is not None else make_engine_config(model, **kwargs)
        if config.parallel.data_parallel_size > 1:  # N engines meeting at the MoE layers
            from pagoda.engine.distributed.data_parallel import DataParallelEngines

            self.engine = cast(EngineCore, DataParallelEngines(config, checkpoint))
        else:
            self.engine = EngineCore(config, checkpoint)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[GenerationResult]:
        """`lora_request`: the LoRA adapter of every prompt, or one per prompt (None: the base
        model); an adapter not loaded yet is loaded (the engine needs `enable_lora=True`)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(token_prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(token_prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(token_prompts)} prompts")
        loras = (
            list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(token_prompts)
        )
        if len(loras) != len(token_prompts):
            raise ValueError(f"got {len(loras)} LoRA requests for {len(token_prompts)} prompts")
        results: dict[str, GenerationResult] = {}
        for ids, p, lora in zip(token_prompts, params, loras, strict=True):
            rid = str(self._next_id)
            self._next_id += 1
            self.engine.add_request(rid, ids, p, lora_request=lora)
            results[rid] = GenerationResult(
                rid, ids, outputs=[CompletionOutput(i, "", [], None) for i in range(p.n)]
            )
        total = sum(p.n for p in params)
        bar = tqdm(total=total, desc="generate", unit="seq", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                res = results[out.request_id]
                res.num_cached_tokens = out.num_cached_tokens
                comp = res.outputs[out.index]
                comp.token_ids.extend(out.new_token_ids)
                if out.new_logprobs is not None:
                    comp.logprobs = (comp.logprobs or []) + out.new_logprobs
                if out.finished:
                    comp.finish_reason = out.finish_reason
                    bar.update(1)
        bar.close()
        for res in results.values():
            for comp in res.outputs:
                comp.text = self.tokenizer.decode(comp.token_ids)
        return list(results.values())

    def embed(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        pooling_params: PoolingParams | None = None,
    ) -> list[EmbeddingResult]:
        """Each prompt's embedding, in order (the engine must pool: `task="embed"`, or an embedding
        checkpoint). All prompts run in shared steps, as the server batches them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(max_tokens=1, pooling=pooling_params or PoolingParams())
        ids = {}
        for p in prompts:
            rid = str(self._next_id)
            self._next_id += 1
            ids[rid] = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            self.engine.add_request(rid, ids[rid], params)
        vectors: dict[str, list[float]] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.embedding is not None:
                    vectors[out.request_id] = out.embedding
        return [EmbeddingResult(rid, ids[rid], EmbeddingOutput(vectors[rid])) for rid in ids]

    def chat(
        self,
        messages: Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(list(m)), add_special_tokens=False)
            for m in messages
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
