"""Decode-only steps through `torch.compile` (inductor) on the CPU: `--compile`.

An eager decode step of the demo model runs ~1,400 small aten ops (norms, rotary, views, the KV
write and gather); at batch 1 their dispatch costs about as much as the matmuls. Compiled, the
model's forward becomes one graph whose elementwise work is fused into a few C++ loops.

Two compiles cover every decode step: batch size and context length are dynamic dimensions
(`mark_dynamic`), but dynamo specializes a size of 1, so a batch of one gets its own graph (the
first call of each compiles; padding one row to two would cost ~40% more int4 matmul time, and
unbacked sizes fail in inductor, torch 2.13). A one-block context runs with a second, masked-out
block. Guards on the model's modules are skipped (the model does not change after loading).
Inductor caches its output (FX graph and AOTAutograd caches under TORCHINDUCTOR_CACHE_DIR,
/tmp/torchinductor_<user> by default), so a later start with the same model and dtype skips the
C++ code generation of the first compile (dynamo still traces: ~1 min on 2 busy cores).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from pagoda.engine.models.layers import RotaryEmbedding
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


class _GraphDecodeAttention(AttentionBackend):
    """Decode-only attention written for the compiler: the KV write as an indexed store (inductor
    keeps it in place on the cache), the gather and the mask from the step's block tables."""

    name: ClassVar[str] = "compiled-decode"

    def __init__(self, block_size: int) -> None:
        super().__init__(torch.device("cpu"))
        self.block_size = block_size

    def forward(
        self,
        q: torch.Tensor,  # [n, heads, head_dim]
        k: torch.Tensor,  # [n, kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [n, heads, head_dim]
        n = q.shape[0]
        _, bs, kvh, hd = k_cache.shape
        k_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, v)
        tables = meta.decode_block_tables  # [n, max_blocks]
        length = tables.shape[1] * bs
        # [n, kv_heads, L, head_dim] views through the block tables: written as products and sums
        # (not matmuls), inductor reads the keys and values in place inside its reduction loops,
        # where a gather + SDPA copied them first (2x faster at 16 rows x 192 tokens)
        kd = k_cache[tables].view(n, length, kvh, hd).permute(0, 2, 1, 3)
        vd = v_cache[tables].view(n, length, kvh, hd).permute(0, 2, 1, 3)
        qd = q.view(n, kvh, -1, hd).float()  # the query heads sharing a KV head form its rows
        s = (qd[:, :, :, None, :] * kd[:, :, None].float()).sum(-1) * scale  # [n, kvh, rows, L]
        keep = torch.arange(length, device=q.device)[None, :] < meta.decode_seq_lens[:, None]
        p = torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1)
        o = (p[..., None] * vd[:, :, None].float()).sum(3)  # [n, kvh, rows, head_dim]
        return o.to(q.dtype).flatten(1, 2)  # [n, heads, head_dim]


class CompiledDecode:
    """Runs decode-only steps of `model` through one compiled graph (CPU, torch attention)."""

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = _GraphDecodeAttention(block_size)
        self._fn = torch.compile(
            self._forward,
            fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )
        self.num_calls = 0

    def _forward(
        self,
        input_ids: torch.Tensor,  # [n]
        positions: torch.Tensor,  # [n]
        slot_mapping: torch.Tensor,  # [n]
        block_tables: torch.Tensor,  # [n, max_blocks]
        seq_lens: torch.Tensor,  # [n]
    ) -> torch.Tensor:  # [n, hidden]
        n = input_ids.shape[0]
        for t in (positions, slot_mapping, block_tables, seq_lens):  # one batch-size symbol
            torch._check(t.shape[0] == n)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decode_tokens=n,
            decode_seq_lens=seq_lens,
            decode_block_tables=block_tables,
            decode_max_seq_len=0,
            prefill_query_starts=[],
            prefill_query_lens=[],
            prefill_context_lens=[],
            prefill_block_tables=[],
        )
        return self.model(input_ids, positions, self.kv_caches, meta, self.backend)  # type: ignore[no-any-return]

    @torch.inference_mode()  # as the runner's steps: grad mode is part of the graph's guards
    def warm_up(self) -> float:
        """Compile both graphs now rather than in the first requests' steps: decodes of one and
        of two dummy sequences at position 0, writing slot 0 of block 0 (no request has filled
        it yet). Returns the seconds it took."""
        t0 = time.perf_counter()
        for module in self.model.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_tables(torch.device("cpu"))
        for n in (1, 2):
            # a new tensor each: aliased inputs would be guarded on
            ids, pos, slots = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
            meta = AttentionMetadata(
                slot_mapping=slots,
                num_decode_tokens=n,
                decode_seq_lens=torch.ones(n, dtype=torch.int64),
                decode_block_tables=torch.zeros((n, 1), dtype=torch.int64),
                decode_max_seq_len=1,
                prefill_query_starts=[],
                prefill_query_lens=[],
                prefill_context_lens=[],
                prefill_block_tables=[],
            )
            self(ids, pos, meta)
        seconds = time.perf_counter() - t0
        logger.info("compiled the decode steps (batch 1 and larger) in %.1fs", seconds)
        return seconds

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [n, hidden]
        """One decode-only step of n sequences (meta: built by the runner, decodes only)."""
        n = input_ids.shape[0]
        assert meta.num_decode_tokens == n, (meta.num_decode_tokens, n)
        max_blocks = -(-meta.decode_max_seq_len // self.block_size)
        tables = meta.decode_block_tables[:, :max_blocks]
        if max_blocks < 2:  # a second, masked-out column: a size of 1 would get its own graph
            tables = F.pad(tables, (0, 2 - max_blocks))
        args = (input_ids, positions, meta.slot_mapping, tables, meta.decode_seq_lens)
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(tables, 1)
        self.num_calls += 1
        return self._fn(*args)  # type: ignore[no-any-return]
