"""Runs one scheduled step: flattens the batch (no padding), runs the model, samples.

The runner keeps its own state for every request it has seen (tokens, block table), updated from
the batcher's diffs, so a step sends only what changed.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch

from pagoda.engine.distributed.pipeline import sample_rows
from pagoda.engine.models import DecoderModel, Model
from pagoda.engine.models.layers import use_triton_layers
from pagoda.engine.pooling.params import PoolerConfig
from pagoda.engine.pooling.pooler import PoolState
from pagoda.engine.quantization.vnni import prompt_rows
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata
from pagoda.engine.runner.compile_cache import DecodeCompiler
from pagoda.engine.runner.compiled_decode import CompiledDecode
from pagoda.engine.runner.cuda_graphs import DecodeGraphs
from pagoda.engine.runner.kv_caches import zero_kv_caches
from pagoda.engine.runner.spec_verify import verify_drafts
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import Sampler
from pagoda.engine.sampling.sampling_metadata import SamplingMetadata
from pagoda.engine.scheduling.batcher import BatchPlan, RunnerOutput
from pagoda.engine.structured.compiler import SequenceGrammar, fill_bitmask_async

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.lora.manager import LoRAManager
    from pagoda.engine.lora.request import LoRARequest
    from pagoda.engine.spec_decode.rejection_sampler import RejectionSampler


@dataclass
class _ReqState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    grammar: SequenceGrammar | None = None
    pool: PoolState | None = None  # a pooling request's embedding, folded in chunk by chunk
    lora: LoRARequest | None = None  # its LoRA adapter (None: the base model)


def _padded(rows: list[list[int]], dtype: type) -> np.ndarray:
    """Block tables as one [len(rows), longest] array, padded with block 0."""
    table: np.ndarray = np.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=dtype)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


# a launched step (ModelRunner.launch): (the flat batch, its grammar masks, hidden states), or None
Launched: TypeAlias = "tuple[_FlatBatch, tuple[list[int], Future[torch.Tensor]] | None, torch.Tensor] | None"


class ModelRunner:
    def __init__(
        self,
        model: Model,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        graph_sizes: list[int] | None = None,
        max_model_len: int = 0,
        compile_decode: str = "off",
        compile_config: EngineConfig | None = None,
        pooler: PoolerConfig | None = None,
        lora: LoRAManager | None = None,
        rejection: RejectionSampler | None = None,
    ) -> None:
        """`pooler`: an embedding model's pooling (requests with `params.pooling` are pooled);
        `lora`: the adapters' slots (the model's projections wrapped already), set each step;
        `rejection`: speculative decoding's verifier of the plan's draft tokens."""
        cfg = model.cfg
        self.model = model
        self.backend = backend
        use_triton_layers(model, backend.triton_layers)
        self.block_size = block_size
        self.device = device
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = eos_token_ids
        self.pooler = pooler
        self.lora = lora
        # an encoder attends within each step's sequences: it keeps no KV; a tensor-parallel
        # rank keeps its KV heads only (model.num_kv_heads)
        shape = (
            (0, block_size, 0, 0)
            if cfg.is_encoder
            else (num_blocks, block_size, getattr(model, "num_kv_heads", cfg.num_kv_heads), cfg.head_dim)
        )
        self.kv_caches = zero_kv_caches(cfg.num_layers, shape, dtype, device)
        self.sampler = Sampler()
        self.rejection = rejection
        self.requests: dict[str, _ReqState] = {}
        self.graphs: DecodeGraphs | None = None
        if graph_sizes:  # CUDA only (engine.cuda_graphs.capture_sizes)
            max_blocks = -(-max_model_len // block_size)
            assert isinstance(model, DecoderModel), "decode graphs are for decoders"
            self.graphs = DecodeGraphs(
                model, backend, self.kv_caches, graph_sizes, max_blocks, max_model_len, device
            )
            self.graphs.capture()
        self.compiled: CompiledDecode | None = None
        self.compiler: DecodeCompiler | None = None
        if compile_decode != "off":  # see compile_cache.py
            assert device.type == "cpu" and backend.name == "torch", (device, backend.name)
            assert isinstance(model, DecoderModel), "decode graphs are for decoders"
            self.compiled = CompiledDecode(model, self.kv_caches, block_size)
            self.compiler = DecodeCompiler(self.compiled, compile_decode, compile_config)

    def _apply_diff(self, out: BatchPlan) -> None:
        for rid in out.finished_req_ids:
            self.requests.pop(rid, None)
        for c in out.cached_requests:
            self.requests[c.req_id].block_ids.extend(c.new_block_ids)
        for n in out.new_requests:
            pooling = n.params.pooling
            pool = (
                PoolState(self.pooler, pooling) if pooling is not None and self.pooler is not None else None
            )
            self.requests[n.req_id] = _ReqState(
                list(n.token_ids),
                n.num_prompt_tokens,
                list(n.block_ids),
                n.params,
                n.generator,
                n.grammar,
                pool,
                n.lora_request,
            )

    def execute(self, out: BatchPlan) -> RunnerOutput:
        """One step: apply the plan's diff, run the model over every scheduled token (one flat
        batch, no padding), and sample a token for each request whose scheduled tokens reach the
        end of its known tokens. Returns those tokens (and logprobs where asked)."""
        return self.finish(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: BatchPlan) -> Launched:
        """A step's first half: the diff applied, the model run (on a pipeline's first stage: its
        layers run and sent on, the rows to sample with them). `finish` samples."""
        self._apply_diff(out)
        if self.compiler is not None:
            self.compiler.poll()
        if out.is_empty:
            return None
        batch = self._flatten(out)
        masks = self._grammar_masks(batch)  # filled while the model runs
        with sample_rows(batch.logits_rows()):  # a pipeline's last stage sends these rows' logits
            return batch, masks, self._forward(batch)  # hidden: [num_tokens, hidden]

    @torch.inference_mode()
    def finish(self, launched: Launched) -> RunnerOutput:
        """A step's second half: pool and sample (a pipeline: the last stage's logits)."""
        if launched is None:
            return RunnerOutput()
        batch, masks, hidden = launched
        pooled = self._pool(hidden, batch)
        if not batch.sample_rows and not batch.spec_rows:
            return RunnerOutput(pooled=pooled)
        res = self._sample(hidden, batch, masks)
        res.pooled = pooled
        return res

    def _pool(self, hidden: torch.Tensor, batch: _FlatBatch) -> dict[str, list[float]]:
        """Fold each pooling request's rows of this step into its pool; the embeddings of those
        whose prompt is now complete."""
        done: dict[str, list[float]] = {}
        for rid, first, n, start in batch.pool_spans:
            st = self.requests[rid]
            assert st.pool is not None
            st.pool.add(hidden[first : first + n], start)
            if start + n == st.num_prompt_tokens:
                done[rid] = st.pool.result()
        return done

    def _grammar_masks(self, batch: _FlatBatch) -> tuple[list[int], Future[torch.Tensor]] | None:
        """The rows to sample that follow a grammar, and their bitmask, being filled on another
        thread (structured outputs)."""
        grammars = [(i, self.requests[rid].grammar) for i, rid in enumerate(batch.sample_rows)]
        constrained = [(i, g) for i, g in grammars if g is not None]
        if not constrained:
            return None
        return [i for i, _ in constrained], fill_bitmask_async([g for _, g in constrained], self.vocab_size)

    def _flatten(self, out: BatchPlan) -> _FlatBatch:
        computed = {c.req_id: c.num_computed_tokens for c in out.cached_requests}
        computed.update({n.req_id: n.num_computed_tokens for n in out.new_requests})
        batch = _FlatBatch(self.block_size, self.device)

        # decodes (one query token) first, then prefill chunks; among decodes, generated tokens
        # before one-token prompt chunks, so that prompt tokens are the rows from one index on
        # (and sequences of one LoRA adapter side by side: one segment for its rows). A sequence
        # verifying drafts is decodes too, one per token.
        spec = out.spec_token_ids
        chunks = [
            (
                n != 1 and rid not in spec,
                computed[rid] < self.requests[rid].num_prompt_tokens,
                _lora_id(self.requests[rid]),
                rid,
                n,
            )
            for rid, n in out.num_scheduled_tokens.items()
        ]
        for _, prompt, _, rid, n in sorted(chunks, key=lambda c: c[:3]):
            if not prompt:
                batch.generated_rows += n
            batch.add(rid, self.requests[rid], computed[rid], n, spec.get(rid, []))
        return batch

    def _forward(self, batch: _FlatBatch) -> torch.Tensor:
        """The model's hidden states for the flat batch: CUDA graphs or the compiled forward for
        decode-only steps they cover, else eager."""
        meta = batch.attention_metadata()
        input_ids = torch.tensor(batch.ids, dtype=torch.int64, device=self.device)
        positions = torch.from_numpy(np.concatenate(batch.pos_chunks)).to(self.device)
        # CUDA graphs hold the base model only: on a GPU, steps with adapter rows run eagerly; the
        # CPU's compiled decode graphs run them (a LoRA engine compiles where pagoda's kernel runs)
        adapters = self._lora_step(batch) is not None
        decode_only = not batch.pf_starts
        if (
            self.graphs is not None
            and decode_only
            and not adapters
            and len(batch.ids) <= self.graphs.max_batch
        ):
            return self.graphs.replay(input_ids, positions, meta)
        if self.compiled is not None and decode_only and self.compiled.ready:
            return self.compiled(input_ids, positions, meta)
        prompt_start = batch.generated_rows if batch.generated_rows < len(batch.ids) else None
        with prompt_rows(prompt_start):
            return self.model(input_ids, positions, self.kv_caches, meta, self.backend)

    def _lora_step(self, batch: _FlatBatch) -> object | None:
        """Slot this step's adapters and set their rows on the model (None: no adapter rows)."""
        if self.lora is None:
            return None
        running = {st.lora.lora_int_id for st in self.requests.values() if st.lora is not None}
        return self.lora.prepare_step(batch.loras, batch.query_lens, running)

    def _sample(
        self, hidden: torch.Tensor, batch: _FlatBatch, masks: tuple[list[int], Future[torch.Tensor]] | None
    ) -> RunnerOutput:
        dev = self.device
        all_logits = self.model.compute_logits(hidden[torch.tensor(batch.logits_rows(), device=dev)])
        res = RunnerOutput()
        if batch.spec_rows:
            assert self.rejection is not None, "draft tokens scheduled without a rejection sampler"
            spec_states = [self.requests[r] for r in batch.spec_rows]
            drafts = [batch.ids[first + 1 : first + k + 1] for first, k in batch.spec_spans]
            logits = all_logits[len(batch.logits_idx) :]
            verify_drafts(self.rejection, logits, batch.spec_rows, spec_states, drafts, res, self.block_size)
        if not batch.sample_rows:
            return res
        logits = all_logits[: len(batch.logits_idx)]
        states = [self.requests[r] for r in batch.sample_rows]
        smeta = SamplingMetadata.build(
            params=[s.params for s in states],
            prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in states],
            output_token_ids=[s.token_ids[s.num_prompt_tokens :] for s in states],
            generators=[s.generator for s in states],
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            device=dev,
        )
        if masks is not None:
            smeta.grammar_rows = torch.tensor(masks[0], device=dev)
            smeta.grammar_bitmask = masks[1].result().to(dev)
        sampled = self.sampler(logits, smeta)
        rows = zip(batch.sample_rows, states, sampled.token_ids, sampled.logprobs, strict=True)
        for rid, st, tok, lp in rows:
            st.token_ids.append(tok)
            res.sampled_token_ids[rid] = tok
            if lp is not None:
                res.logprobs[rid] = lp
        return res


def _lora_id(st: _ReqState) -> int:
    return st.lora.lora_int_id if st.lora is not None else 0


@dataclass
class _FlatBatch:
    """One step's scheduled tokens as one flat sequence, request after request, with what the
    attention metadata and the sampler need of each request."""

    block_size: int
    device: torch.device
    ids: list[int] = field(default_factory=list)  # the query tokens
    pos_chunks: list[np.ndarray] = field(default_factory=list)  # their positions, per request
    slot_chunks: list[np.ndarray] = field(default_factory=list)  # their KV slots, per request
    query_lens: list[int] = field(default_factory=list)
    all_lens: list[int] = field(default_factory=list)  # context + query, per request
    all_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    generated_rows: int = 0  # the rows of generated tokens, which come first
    pf_starts: list[int] = field(default_factory=list)  # prefill chunks: first index in `ids`
    pf_lens: list[int] = field(default_factory=list)
    pf_ctx: list[int] = field(default_factory=list)
    pf_tables: list[torch.Tensor] = field(default_factory=list)
    sample_rows: list[str] = field(default_factory=list)  # requests sampled this step
    logits_idx: list[int] = field(default_factory=list)  # their last token's index in `ids`
    spec_rows: list[str] = field(default_factory=list)  # requests verifying drafts this step
    spec_spans: list[tuple[int, int]] = field(default_factory=list)  # (first index in `ids`, drafts)
    pool_spans: list[tuple[str, int, int, int]] = field(default_factory=list)  # (req, first row, n, position)
    loras: list[LoRARequest | None] = field(default_factory=list)  # per request, as query_lens

    def add(self, rid: str, st: _ReqState, start: int, n: int, draft: list[int]) -> None:
        """Request `rid`'s tokens [start, start + n): one is a decode, more a prefill chunk (causal
        attention over its cached context and itself). With a `draft` (the last len(draft) of
        them, proposed after its known tokens) each token is a decode row of its own that sees
        the positions up to its own: a plain decode's arithmetic, so verification rounds as
        decoding without speculation does, and runs where decode steps run (compiled graphs,
        CUDA graphs, the paged decode kernels)."""
        bs = self.block_size
        self.ids.extend(st.token_ids[start : start + n - len(draft)])
        self.ids.extend(draft)
        pos = np.arange(start, start + n, dtype=np.int64)
        blocks = np.asarray(st.block_ids, dtype=np.int64)
        self.pos_chunks.append(pos)
        self.slot_chunks.append(blocks[pos // bs] * bs + pos % bs)
        if n == 1 or draft:  # as many one-token "sequences" as tokens, each to its own position
            lens = list(range(start + 1, start + n + 1))
            self.decode_lens.extend(lens)
            self.decode_tables.extend([st.block_ids] * n)
            self.query_lens.extend([1] * n)
            self.all_lens.extend(lens)
            self.all_tables.extend([st.block_ids] * n)
            self.loras.extend([st.lora] * n)
        else:
            self.query_lens.append(n)
            self.all_lens.append(start + n)
            self.all_tables.append(st.block_ids)
            self.loras.append(st.lora)
            self.pf_starts.append(len(self.ids) - n)
            self.pf_lens.append(n)
            self.pf_ctx.append(start)
            self.pf_tables.append(torch.from_numpy(blocks[: -(-(start + n) // bs)]).to(self.device))
        if st.pool is not None:  # pooled, never sampled
            self.pool_spans.append((rid, len(self.ids) - n, n, start))
        elif draft:
            assert start + n - len(draft) == len(st.token_ids), (rid, start, n, len(st.token_ids))
            self.spec_rows.append(rid)
            self.spec_spans.append((len(self.ids) - len(draft) - 1, len(draft)))
        elif start + n == len(st.token_ids):
            self.sample_rows.append(rid)
            self.logits_idx.append(len(self.ids) - 1)

    def logits_rows(self) -> list[int]:
        """The rows whose logits the step needs: the sampled rows' last positions, then every
        position of the drafted sequences (their 1 + k verification rows)."""
        return self.logits_idx + [i for first, k in self.spec_spans for i in range(first, first + k + 1)]

    def attention_metadata(self) -> AttentionMetadata:
        """The batch as decode + prefill lists, and as one varlen view for unified kernels."""
        dev = self.device
        query_start_loc = np.zeros(len(self.query_lens) + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=query_start_loc[1:])
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(self.slot_chunks)).to(dev),
            num_decode_tokens=len(self.decode_lens),
            decode_seq_lens=torch.tensor(self.decode_lens, dtype=torch.int64, device=dev),
            decode_block_tables=torch.from_numpy(_padded(self.decode_tables, np.int64)).to(dev),
            decode_max_seq_len=max(self.decode_lens, default=0),
            prefill_query_starts=self.pf_starts,
            prefill_query_lens=self.pf_lens,
            prefill_context_lens=self.pf_ctx,
            prefill_block_tables=self.pf_tables,
            query_start_loc=torch.from_numpy(query_start_loc).to(dev),
            seq_lens=torch.tensor(self.all_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(_padded(self.all_tables, np.int32)).to(dev),
            max_query_len=max(self.query_lens),
        )
