"""Runs one scheduled step: flattens the batch (no padding), runs the model, samples.

The runner keeps its own state for every request it has seen (tokens, block table), updated from
the batcher's diffs, so a step sends only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.engine.models.layers import use_triton_layers
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata
from pagoda.engine.runner.compiled_decode import CompiledDecode
from pagoda.engine.runner.cuda_graphs import DecodeGraphs
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import Sampler, SamplingMetadata
from pagoda.engine.scheduling.batcher import BatchPlan, RunnerOutput


@dataclass
class _ReqState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None


def kv_bytes_per_block(
    num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _padded(rows: list[list[int]], dtype: type) -> np.ndarray:
    """Block tables as one [len(rows), longest] array, padded with block 0."""
    table: np.ndarray = np.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=dtype)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        graph_sizes: list[int] | None = None,
        max_model_len: int = 0,
        compile_decode: bool = False,
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.backend = backend
        use_triton_layers(model, backend.triton_layers)
        self.block_size = block_size
        self.device = device
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = eos_token_ids
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler()
        self.requests: dict[str, _ReqState] = {}
        self.graphs: DecodeGraphs | None = None
        if graph_sizes:  # CUDA only (engine.cuda_graphs.capture_sizes)
            max_blocks = -(-max_model_len // block_size)
            self.graphs = DecodeGraphs(
                model, backend, self.kv_caches, graph_sizes, max_blocks, max_model_len, device
            )
            self.graphs.capture()
        self.compiled: CompiledDecode | None = None
        if compile_decode:
            assert device.type == "cpu" and backend.name == "torch", (device, backend.name)
            self.compiled = CompiledDecode(model, self.kv_caches, block_size)
            self.compiled.warm_up()

    def _apply_diff(self, out: BatchPlan) -> None:
        for rid in out.finished_req_ids:
            self.requests.pop(rid, None)
        for c in out.cached_requests:
            self.requests[c.req_id].block_ids.extend(c.new_block_ids)
        for n in out.new_requests:
            self.requests[n.req_id] = _ReqState(
                list(n.token_ids), n.num_prompt_tokens, list(n.block_ids), n.params, n.generator
            )

    @torch.inference_mode()
    def execute(self, out: BatchPlan) -> RunnerOutput:
        self._apply_diff(out)
        if out.is_empty:
            return RunnerOutput()
        computed = {c.req_id: c.num_computed_tokens for c in out.cached_requests}
        computed.update({n.req_id: n.num_computed_tokens for n in out.new_requests})
        # decodes (one query token) first, then prefill chunks
        order = sorted(out.num_scheduled_tokens.items(), key=lambda kv: kv[1] != 1)
        bs = self.block_size
        ids: list[int] = []
        pos_chunks: list[np.ndarray] = []
        slot_chunks: list[np.ndarray] = []
        sample_rows: list[str] = []
        logits_idx: list[int] = []
        decode_lens: list[int] = []
        decode_tables: list[list[int]] = []
        pf_starts: list[int] = []
        pf_lens: list[int] = []
        pf_ctx: list[int] = []
        pf_tables: list[torch.Tensor] = []
        all_lens: list[int] = []
        all_tables: list[list[int]] = []
        for rid, n in order:
            st = self.requests[rid]
            start = computed[rid]
            ids.extend(st.token_ids[start : start + n])
            pos = np.arange(start, start + n, dtype=np.int64)
            blocks = np.asarray(st.block_ids, dtype=np.int64)
            pos_chunks.append(pos)
            slot_chunks.append(blocks[pos // bs] * bs + pos % bs)
            all_lens.append(start + n)
            all_tables.append(st.block_ids)
            if n == 1:
                decode_lens.append(start + 1)
                decode_tables.append(st.block_ids)
            else:
                pf_starts.append(len(ids) - n)
                pf_lens.append(n)
                pf_ctx.append(start)
                pf_tables.append(torch.from_numpy(blocks[: -(-(start + n) // bs)]).to(self.device))
            if start + n == len(st.token_ids):
                sample_rows.append(rid)
                logits_idx.append(len(ids) - 1)
        dev = self.device
        table = _padded(decode_tables, np.int64)
        # the same batch as one varlen view, for backends with a unified kernel
        query_lens = [n for _, n in order]
        query_start_loc = np.zeros(len(order) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(dev),
            num_decode_tokens=len(decode_lens),
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.int64, device=dev),
            decode_block_tables=torch.from_numpy(table).to(dev),
            decode_max_seq_len=max(decode_lens, default=0),
            prefill_query_starts=pf_starts,
            prefill_query_lens=pf_lens,
            prefill_context_lens=pf_ctx,
            prefill_block_tables=pf_tables,
            query_start_loc=torch.from_numpy(query_start_loc).to(dev),
            seq_lens=torch.tensor(all_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(_padded(all_tables, np.int32)).to(dev),
            max_query_len=max(query_lens),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_chunks)).to(dev)
        if self.graphs is not None and not pf_starts and len(ids) <= self.graphs.max_batch:
            hidden = self.graphs.replay(input_ids, positions, meta)
        elif self.compiled is not None and not pf_starts:
            hidden = self.compiled(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not sample_rows:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[torch.tensor(logits_idx, device=dev)])
        states = [self.requests[r] for r in sample_rows]
        smeta = SamplingMetadata.build(
            params=[s.params for s in states],
            prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in states],
            output_token_ids=[s.token_ids[s.num_prompt_tokens :] for s in states],
            generators=[s.generator for s in states],
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            device=dev,
        )
        sampled = self.sampler(logits, smeta)
        res = RunnerOutput()
        for rid, st, tok, lp in zip(sample_rows, states, sampled.token_ids, sampled.logprobs, strict=True):
            st.token_ids.append(tok)
            res.sampled_token_ids[rid] = tok
            if lp is not None:
                res.logprobs[rid] = lp
        return res
