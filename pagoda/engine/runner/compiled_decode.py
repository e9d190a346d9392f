"""Decode-only steps through `torch.compile` (inductor) on the CPU, the default there (`--compile`).

An eager decode step of the demo model runs ~1,400 small aten ops (norms, rotary, views, the KV
write and gather); at batch 1 their dispatch costs about as much as the matmuls. Compiled, the
model's forward becomes one graph whose elementwise work is fused into a few C++ loops.

Two graphs cover every decode step: batch size, context length and the KV pool's block count are
dynamic dimensions, but dynamo specializes a size of 1, so a batch of one gets its own graph
(padding one row to two would cost ~40% more int4 matmul time, and unbacked sizes fail in
inductor, torch 2.13). A one-block context runs with a second, masked-out block.

The graphs are compiled ahead of time (`aot_compile`, torch's precompile API) and saved: a later
start loads them in ~1.5 s instead of tracing again (~1 min on 2 cores, even with inductor's
caches warm). Guards are dropped: the runner picks the graph by batch size itself, and the
model does not change after loading. compile_cache.py decides where the files live and when
they are compiled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from pagoda.engine.lora.layers import LoRAContext, LoRALinear, no_adapter_rows
from pagoda.engine.models import DecoderModel
from pagoda.engine.models.layers import RotaryEmbedding
from pagoda.engine.quantization import native
from pagoda.engine.runner.attention import (
    AttentionBackend,
    AttentionMetadata,
    native_decode,
    native_decode_usable,
)

logger = logging.getLogger(__name__)


class _GraphDecodeAttention(AttentionBackend):
    """Decode-only attention written for the compiler: the KV write as an indexed store (inductor
    keeps it in place on the cache), the gather and the mask from the step's block tables."""

    name: ClassVar[str] = "compiled-decode"
    features: ClassVar[frozenset[str]] = frozenset({"sliding_window", "softcap"})

    def __init__(self, block_size: int) -> None:
        super().__init__(torch.device("cpu"))
        self.block_size = block_size
        self.native = native.runs("decode_attention")  # decided before any trace

    def forward(
        self,
        q: torch.Tensor,  # [n, heads, head_dim]
        k: torch.Tensor,  # [n, kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [n, heads, head_dim]
        n = q.shape[0]
        _, bs, kvh, hd = k_cache.shape
        k_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, v)
        if self.native and native_decode_usable(q, k_cache):  # one opaque op, the cache read in place
            return native_decode(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
        tables = meta.decode_block_tables  # [n, max_blocks]
        length = tables.shape[1] * bs
        # [n, kv_heads, L, head_dim] views through the block tables: written as products and sums
        # (not matmuls), inductor reads the keys and values in place inside its reduction loops,
        # where a gather + SDPA copied them first (2x faster at 16 rows x 192 tokens)
        kd = k_cache[tables].view(n, length, kvh, hd).permute(0, 2, 1, 3)
        vd = v_cache[tables].view(n, length, kvh, hd).permute(0, 2, 1, 3)
        qd = q.view(n, kvh, -1, hd).float()  # the query heads sharing a KV head form its rows
        s = (qd[:, :, :, None, :] * kd[:, :, None].float()).sum(-1) * scale  # [n, kvh, rows, L]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        cols = torch.arange(length, device=q.device)[None, :]
        keep = cols < meta.decode_seq_lens[:, None]
        if sliding_window is not None:  # the last `sliding_window` keys
            keep = keep & (cols >= meta.decode_seq_lens[:, None] - sliding_window)
        p = torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1)
        o = (p[..., None] * vd[:, :, None].float()).sum(3)  # [n, kvh, rows, head_dim]
        return o.to(q.dtype).flatten(1, 2)  # [n, heads, head_dim]


class CompiledDecode:
    """Decode-only steps of `model` through two compiled graphs (CPU, torch attention): compiled
    here (`compile`) or loaded from files an earlier compile saved (`load`)."""

    FILES: ClassVar[dict[int, str]] = {
        1: "decode-batch1.bin",
        2: "decode-batch2plus.bin",
    }  # graph for 1 row / 2 or more

    def __init__(
        self, model: DecoderModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = _GraphDecodeAttention(block_size)
        self.graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.num_calls = 0
        # a model with LoRA slots: the graphs run each row's adapter (pagoda's CPU kernel), reading
        # the step's rows and the slots' weights at each call, so adapters loaded later apply
        self.lora_ctx: LoRAContext | None = next(
            (m.ctx for m in model.modules() if isinstance(m, LoRALinear)), None
        )
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_tables(torch.device("cpu"))

    @property
    def ready(self) -> bool:
        return len(self.graphs) == len(self.FILES)

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
        if self.lora_ctx is not None:
            step = self.lora_ctx.step
            assert step is not None and step.row_slot is not None
            torch._check(step.row_slot.shape[0] == n)
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

    @staticmethod
    def _example(n: int) -> tuple[torch.Tensor, ...]:
        """Inputs of a decode of n dummy sequences at position 0 in two blocks, dimensions marked
        dynamic as the graph takes them (new tensors each: aliased inputs would be guarded on)."""
        ids, pos, slots, lens = (torch.zeros(n, dtype=torch.int64) for _ in range(4))
        tables = torch.zeros((n, 2), dtype=torch.int64)
        args = (ids, pos, slots, tables, lens)
        if n > 1:
            for t in args:
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(tables, 1)
        return args

    @torch.inference_mode()  # as the runner's steps: grad mode is part of the graph
    def compile(self) -> float:
        """Compile both graphs (minutes on 2 cores). Returns the seconds it took."""
        t0 = time.perf_counter()
        for k, v in self.kv_caches:  # any pool size
            torch._dynamo.mark_dynamic(k, 0)
            torch._dynamo.mark_dynamic(v, 0)
        # floats as constants: a float that dynamo would turn into a tensor restarts its analysis,
        # which aot_compile does not do (torch 2.13; the dense bf16 model hit it)
        with torch._dynamo.config.patch(enable_aot_compile=True, specialize_float=True):
            fn = torch.compile(
                self._forward,
                fullgraph=True,
                options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
            )
            for n in self.FILES:
                if self.lora_ctx is not None:
                    self.lora_ctx.step = no_adapter_rows(n)
                    if n > 1:
                        torch._dynamo.mark_dynamic(self.lora_ctx.step.row_slot, 0)
                graph = fn.aot_compile((self._example(n), {}))  # type: ignore[attr-defined]
                graph.disable_guard_check()
                self.graphs[n] = graph
        seconds = time.perf_counter() - t0
        logger.info("compiled the decode steps (batch 1 and larger) in %.1fs", seconds)
        return seconds

    def save(self, directory: Path) -> None:
        """Writes the compiled graphs into `directory` (each file atomically)."""
        directory.mkdir(parents=True, exist_ok=True)
        for n, name in self.FILES.items():
            graph = self.graphs[n]
            tmp = directory / f".{name}.{os.getpid()}"
            graph.save_compiled_function(str(tmp))  # type: ignore[attr-defined]
            tmp.replace(directory / name)

    def load(self, directory: Path) -> bool:
        """Loads the graphs that `save` wrote into `directory`; False if any file is missing."""
        if not all((directory / name).is_file() for name in self.FILES.values()):
            return False
        with torch._dynamo.config.patch(enable_aot_compile=True):
            for n, name in self.FILES.items():
                with open(directory / name, "rb") as f:
                    graph = torch.compiler.load_compiled_function(f, f_globals=globals())
                graph.disable_guard_check()  # type: ignore[attr-defined]
                self.graphs[n] = graph
        return True

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
        self.num_calls += 1
        if self.lora_ctx is not None and self.lora_ctx.step is None:
            self.lora_ctx.step = no_adapter_rows(n)
        graph = self.graphs[min(n, 2)]
        return graph(self, input_ids, positions, meta.slot_mapping, tables, meta.decode_seq_lens)
