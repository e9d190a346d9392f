"""The engine core: model, KV cache, batcher and runner on one device, stepped synchronously.

`step()` is the worker's loop body: schedule -> execute -> update, then one RequestOutput per
request that got tokens. Requests with n > 1 fan out into n child sequences that share the prompt's
KV blocks through the prefix cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from pagoda.engine.config import BatcherConfig, EngineConfig, engine_dtype, validate_max_model_len
from pagoda.engine.core.kv_sizing import size_kv_cache
from pagoda.engine.core.model_loading import load_model
from pagoda.engine.core.stats import CoreCounters, EngineCapacity, StepStats
from pagoda.engine.distributed.launcher import start_ranks
from pagoda.engine.distributed.micro_batches import MicroBatches
from pagoda.engine.distributed.tensor_parallel import SINGLE
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.loader import Checkpoint, demo_model_path, load_checkpoint
from pagoda.engine.loader.catalog import generation_defaults
from pagoda.engine.lora.engine_api import LoRAEngineMixin
from pagoda.engine.lora.layers import use_native
from pagoda.engine.lora.manager import LoRAManager
from pagoda.engine.lora.request import LoRARequest
from pagoda.engine.models import Model
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.quantization import resolve_quantization
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.pooling.params import resolve_pooler
from pagoda.engine.runner.attention import get_backend
from pagoda.engine.runner.compile_cache import decode_compile_mode
from pagoda.engine.runner.cuda_graphs import capture_sizes
from pagoda.engine.runner.model_runner import ModelRunner
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import make_generator
from pagoda.engine.scheduling.batcher import Batcher, RunnerOutput
from pagoda.engine.scheduling.request import Request, RequestStatus, check_prompt_ids
from pagoda.engine.spec_decode.engine_parts import SpecDecodeEngineMixin
from pagoda.engine.structured.compiler import GrammarCompiler, SequenceGrammar
from pagoda.engine.structured.grammar import grammar_of
from pagoda.engine.tokenization.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineCore(LoRAEngineMixin, SpecDecodeEngineMixin):
    micro_batches: MicroBatches | None = None  # pipeline stages: the steps in flight
    local_rank = SINGLE  # a data-parallel rank's part of the model (distributed/data_parallel.py)

    def __init__(
        self, config: EngineConfig, checkpoint: Checkpoint | None = None, *, background_compile: bool = False
    ) -> None:
        """`background_compile` (a server): with `compile="auto"` and no saved graphs, step eagerly
        while another process compiles them, otherwise compile them here first; and build what
        structured outputs need before the first such request."""
        self.config = config
        torch.manual_seed(config.seed)
        ckpt = checkpoint if checkpoint is not None else load_checkpoint(config.model or demo_model_path())
        self.model_name = config.served_model_name or ckpt.name
        self.tokenizer: Tokenizer = ckpt.tokenizer
        path = getattr(ckpt, "path", "")
        self.default_sampling = generation_defaults(path) if path else {}
        arch = ckpt.arch
        # an embedding model: prompts are pooled, nothing generated (pagoda/engine/pooling)
        self.pooler = resolve_pooler(config.task, config.pooling_type, ckpt.pooler, arch.is_encoder)
        self.device = config.resolved_device()
        self.quantization = resolve_quantization(config.quantization, self.device, ckpt.quantization)
        self.dtype = engine_dtype(config.dtype, self.quantization, self.device)
        self.max_model_len = validate_max_model_len(config.max_model_len, arch.max_position_embeddings)
        # --tensor-parallel-size: the other ranks, started now, load their shards as this one does
        self.parallel = start_ranks(
            config, ckpt, self.device, self.dtype, self.quantization, self.max_model_len,
            self.local_rank.data_parallel,
        )  # fmt: skip
        self.model = self._load_model(ckpt)
        self.lora = (
            LoRAManager(self.model, config.lora, self.dtype, self.device) if config.lora.enable_lora else None
        )
        kv_heads = getattr(self.model, "num_kv_heads", arch.num_kv_heads)  # a tensor-parallel rank's
        draft_per_block = self._load_draft(arch.vocab_size)  # speculative decoding's draft model, if any
        num_blocks, per_block = size_kv_cache(
            config, arch, kv_heads, self.dtype, self.device, self.max_model_len, draft_per_block
        )
        cache = config.cache
        if self.parallel is not None:
            self.parallel.init_kv_cache(num_blocks, cache.block_size)
        self.num_blocks = num_blocks
        self.capacity = EngineCapacity(config.batcher.max_num_seqs, cache.block_size, num_blocks)
        eos = tuple(arch.eos_token_ids) or tuple(self.tokenizer.eos_token_ids)
        self.eos_token_ids = eos
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        speculation = self._init_spec(config.speculative_config, self.max_model_len, arch.vocab_size, eos)
        self.batcher = Batcher(self._batcher_config(arch), self.kv, self.max_model_len, eos, speculation)
        rebuildable = background_compile and checkpoint is None  # another process can rebuild the model
        self.runner = self._build_runner(num_blocks, config if rebuildable else None)
        stages = config.parallel.pipeline_parallel_size
        self.micro_batches = MicroBatches(self.batcher, self.runner, stages) if stages > 1 else None
        logger.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB)",
            num_blocks,
            cache.block_size,
            num_blocks * per_block / 2**20,
        )
        self._children: dict[str, list[str]] = {}  # parent id -> child sequence ids
        self._init_grammars(warm=background_compile)
        self.last_stats = StepStats()

    def _init_grammars(self, warm: bool) -> None:
        """Structured outputs: the compiler is made for the first such request, or now, with the
        grammars' view of the tokenizer built at once, when `warm` (a server)."""
        self.grammars: GrammarCompiler | None = None
        if warm:
            self.grammars = GrammarCompiler(self.tokenizer, self.model.cfg.vocab_size)
            self.grammars.warm()
        # requests whose grammar is compiling: they join the batcher when it is ready
        self._awaiting: dict[str, tuple[Future[list[SequenceGrammar]], list[Request]]] = {}

    def _build_runner(self, num_blocks: int, compile_config: EngineConfig | None) -> ModelRunner:
        """The model runner, with compiled decode graphs (CPU) or CUDA graphs where they run;
        `compile_config`: the config a background compile rebuilds the model from."""
        config = self.config
        backend = get_backend(config.attention_backend, self.device, self.model.attention_needs)
        moe = bool(self.model.cfg.num_experts)
        compile_mode = decode_compile_mode(
            config.compile,
            self.device,
            backend.name,
            self.quantization,
            pooled=self.pooler is not None,
            lora=None if self.lora is None else use_native(self.device, self.dtype),
            moe=moe,
        )
        if self.parallel is not None:  # one rank's graph, its collectives untraced: eager (for now)
            compile_mode = "off"
        # a pooler has no decode steps to capture; tensor-parallel ranks run eagerly (for now)
        eager = config.enforce_eager or self.pooler is not None or self.parallel is not None
        if moe and (config.compile != "off" or (not eager and self.device.type == "cuda")):
            # the experts' dispatch: data-dependent shapes on the CPU; on a GPU, not yet captured on one
            logger.info("decode steps of a mixture-of-experts model run eagerly (no compiled or CUDA graphs)")
            eager = True
        return ModelRunner(
            self.model,
            backend,
            num_blocks,
            config.cache.block_size,
            self.dtype,
            self.device,
            self.eos_token_ids,
            capture_sizes(self.device, eager, backend, config.batcher.max_num_seqs),
            self.max_model_len,
            compile_decode=compile_mode,
            compile_config=compile_config,
            pooler=self.pooler,
            lora=self.lora,
            rejection=self.spec.rejection if self.spec else None,
        )

    def _batcher_config(self, arch: ModelArchConfig) -> BatcherConfig:
        """The configured batcher, except that an encoder's prompts run whole (each token attends
        to all of its prompt): no chunks, and a step holds the longest prompt."""
        batcher = self.config.batcher
        if self.config.lora.enable_lora:  # no more adapters at once than slots
            batcher = dataclasses.replace(batcher, max_loras=self.config.lora.max_loras)
        if not arch.is_encoder:
            return batcher
        budget = max(batcher.max_num_batched_tokens, self.max_model_len)
        return dataclasses.replace(batcher, max_num_batched_tokens=budget, enable_chunked_prefill=False)

    def _load_model(self, ckpt: Checkpoint) -> Model:
        """The checkpoint's model on this core's device and dtype, quantized or packed for oneDNN
        as configured (with tensor-parallel followers: this rank's shard, theirs loading meanwhile)."""
        arch = ckpt.arch
        t0 = time.perf_counter()
        tp = self.parallel.tp if self.parallel is not None else self.local_rank
        try:
            model, report, packed = load_model(
                ckpt, self.max_model_len, self.device, self.dtype, self.quantization, tp,
                getattr(self.parallel, "stage", None),  # a pipeline's first stage
            )  # fmt: skip
        except BaseException:
            self.close()  # the followers too
            raise
        logger.info(
            "loaded %s (%s, %d layers) as %s%s%s on %s in %.1fs%s",
            self.model_name,
            arch.architecture,
            arch.num_layers,
            self.dtype,
            f" with {self.quantization} linears ({report.summary()})" if self.quantization != "none" else "",
            f" ({packed} linears packed for oneDNN)" if packed else "",
            self.device,
            time.perf_counter() - t0,
            f" (rank 0 of {tp.size}: tensor parallel)" if tp.enabled else "",
        )
        return model

    # -- requests ------------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a user error) when the request cannot run."""
        if (params.pooling is None) != (self.pooler is None):
            raise ValueError(
                "this model serves embeddings (--task embed), not text generation"
                if self.pooler is not None
                else "this model generates text; it serves embeddings when started with --task embed"
            )
        dims = params.pooling.dimensions if params.pooling is not None else None
        if dims is not None and dims > self.model.cfg.hidden_size:
            raise ValueError(
                f"dimensions must be at most the model's {self.model.cfg.hidden_size}, got {dims}"
            )
        room = 0 if params.pooling is not None else 1  # a pooled prompt needs no room for output
        check_prompt_ids(prompt_token_ids, self.max_model_len, self.model.cfg.vocab_size, room)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        resume_from: int = 0,
        lora_request: str | LoRARequest | None = None,
    ) -> None:
        """`resume_from`: the prompt's last tokens are this request's output so far (a re-run
        after its worker was lost); a grammar consumes them before it constrains the next.
        `lora_request`: the LoRA adapter to run with, by name (loaded with `load_lora`) or as a
        LoRARequest (loaded now if new); None: the base model."""
        self.check_prompt(prompt_token_ids, params)
        lora = self._lora_of(lora_request)
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already running")
        so = params.structured_outputs
        if so is not None:
            grammar_of(so)  # a grammar that cannot compile is the caller's error, now
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(
                cid,
                list(prompt_token_ids),
                params,
                index=i,
                parent_id=request_id,
                priority=priority,
                cache_salt=cache_salt,
                arrival_time=arrival_time,
                generator=make_generator(seed, self.device),
                lora_request=lora,
                lora_key=self.lora.cache_key(lora) if self.lora is not None and lora is not None else None,
            )
            children.append(req)
        self._children[request_id] = [r.request_id for r in children]
        if self.lora is not None and lora is not None:
            for _ in children:
                self.lora.acquire(lora)
        if so is None:
            for req in children:
                self.batcher.add_request(req)
            return
        if self.grammars is None:
            self.grammars = GrammarCompiler(self.tokenizer, self.model.cfg.vocab_size)
        resumed = prompt_token_ids[len(prompt_token_ids) - resume_from :] if resume_from else []
        self._awaiting[request_id] = (self.grammars.submit(so, len(children), resumed), children)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        waiting = [self._awaiting.pop(rid) for rid in request_ids if rid in self._awaiting]
        seqs = [c for rid in request_ids for c in self._children.get(rid, [])]
        reqs = self.batcher.finish_requests(seqs, "abort") + _finished([r for _, rs in waiting for r in rs])
        outs = [self._output(r, []) for r in reqs]
        self._forget_finished(reqs)
        return outs

    def has_unfinished(self) -> bool:
        if self.parallel is not None:  # a follower rank that died fails the engine, idle or not
            self.parallel.check()
        return self.batcher.has_unfinished() or bool(self._awaiting)

    def close(self) -> None:
        """End the tensor-parallel followers, if any (also done at exit)."""
        if self.parallel is not None:
            self.parallel.close()

    def counters(self) -> CoreCounters:
        """Live figures for metrics; safe to read from another thread (plain ints and floats)."""
        return CoreCounters(
            num_running=self.batcher.num_running,
            num_waiting=self.batcher.num_waiting,
            kv_usage=self.kv.usage(),
            prefix_query_tokens=self.kv.query_tokens,
            prefix_hit_tokens=self.kv.hit_tokens,
            num_preemptions=self.batcher.num_preemptions,
            kv_live_tokens=self.kv.live_tokens(),
            kv_used_slots=self.kv.pool.num_used_blocks * self.kv.block_size,
            kv_live_token_ratio=self.kv.live_token_ratio(),
            num_prefilling=self.batcher.num_prefilling,
            num_free_blocks=self.kv.pool.num_free_blocks,
            **self._spec_counters(),
        )

    def cached_block_hashes(self) -> list[bytes]:
        """Every block hash in the prefix cache now (a snapshot; safe to take from another thread)."""
        return self.kv.pool.cached_hashes()

    def drain_cache_events(self) -> tuple[list[bytes], list[bytes]]:
        """Block hashes stored in and evicted from the prefix cache since the last call (step thread)."""
        return self.kv.pool.drain_events()

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed = self._adopt_grammars() if self._awaiting else []
        if self.micro_batches is not None:  # pipeline stages: several steps in flight
            out, res = self.micro_batches.advance()
        else:
            out = self.batcher.schedule()
            t0 = time.perf_counter()
            res = self.runner.execute(out)
            if self.spec is not None:  # a row's cost, for how many drafts pay
                self.spec.speculation.observe_step(out, time.perf_counter() - t0)
        changed = self.batcher.update(out, res)
        self.last_stats = StepStats(
            out.total_num_scheduled_tokens,
            self.batcher.num_running,
            self.batcher.num_waiting,
            self.kv.usage(),
            out.num_preempted,
        )
        outputs = [self._output(r, r.new_token_ids, res) for r in changed]
        self._forget_finished([r for r in changed if r.is_finished])
        return failed + outputs

    def _adopt_grammars(self) -> list[RequestOutput]:
        """Requests whose grammar is ready join the batcher; those whose grammar failed finish
        (aborted). With nothing else to run, wait a little for one instead of spinning."""
        if not self.batcher.has_unfinished():
            wait([f for f, _ in self._awaiting.values()], timeout=0.05, return_when=FIRST_COMPLETED)
        failed: list[Request] = []
        for rid, (future, reqs) in list(self._awaiting.items()):
            if not future.done():
                continue
            del self._awaiting[rid]
            try:
                grammars = future.result()
            except Exception as err:
                logger.warning("request %s: its grammar could not be built: %s", rid, err)
                failed += _finished(reqs)
                continue
            for req, grammar in zip(reqs, grammars, strict=True):
                req.grammar = grammar
                self.batcher.add_request(req)
        outs = [self._output(r, []) for r in failed]
        self._forget_finished(failed)
        return outs

    def _output(self, req: Request, new_ids: list[int], res: RunnerOutput | None = None) -> RequestOutput:
        lps = res.logprobs_of(req.request_id, len(new_ids)) if res is not None else None
        return RequestOutput(
            request_id=req.parent_id,
            new_token_ids=new_ids,
            index=req.index,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=req.num_output_tokens,
            new_logprobs=lps,
            finished=req.is_finished,
            finish_reason=req.finish_reason if req.is_finished else None,
            stop_token_id=req.stop_token_id,
            queue_time_s=req.queue_time_s,
            embedding=req.embedding,
        )

    def _forget_finished(self, reqs: list[Request]) -> None:
        for r in reqs:
            if self.lora is not None and r.lora_request is not None:
                self.lora.release(r.lora_request)
            kids = self._children.get(r.parent_id)
            if kids is None:
                continue
            if r.request_id in kids:
                kids.remove(r.request_id)
            if not kids:
                del self._children[r.parent_id]


def _finished(reqs: list[Request]) -> list[Request]:
    """`reqs`, which never reached the batcher, marked aborted."""
    for req in reqs:
        req.status = RequestStatus.FINISHED
        req.finish_reason = "abort"
    return reqs
