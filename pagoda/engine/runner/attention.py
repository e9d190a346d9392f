"""Attention over the paged KV cache, behind a small interface so kernels can be swapped.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens arrive flattened (varlen, no padding); `AttentionMetadata` says which slice of
the batch belongs to which sequence and where each token's K/V goes (slot = block * size + offset).

Beyond causal attention a layer may ask for a sliding window (Gemma's local layers, Phi-3's
window) and for logit soft-capping (Gemma 2); a backend lists what it does in `features`, and
`get_backend` gives a model only a backend that has what it needs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from pagoda.engine.quantization import native
from pagoda.kernels.runtime import check_triton, triton_installed


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # Decode sequences (one query token each) come first in the batch, then prefill chunks.
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # [num_decodes] int64, context length incl. the new token
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_max_seq_len: int
    # Prefill chunks: python lists, one entry per sequence (few per step).
    prefill_query_starts: list[int]  # offsets into the batch
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # tokens already in the cache before this chunk
    prefill_block_tables: list[torch.Tensor]  # [num_blocks_of_seq] int64 each
    # The same batch as one varlen view (decodes first), for kernels that take every sequence at
    # once (TritonAttention's unified kernel). Built by the runner; None when no backend needs it.
    query_start_loc: torch.Tensor | None = None  # [num_seqs + 1] int32
    seq_lens: torch.Tensor | None = None  # [num_seqs] int32, context incl. this step's tokens
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32 (padded with 0)
    max_query_len: int = 0
    # Per-step values a backend derives once and reuses in every layer (TorchAttention: the flat
    # block ids to gather and the additive mask of a decode batch). Filled on first use.
    step_cache: dict[str, torch.Tensor | None] = field(default_factory=dict)


class AttentionBackend(abc.ABC):
    """Computes attention for one layer and writes that layer's new K/V into the cache.

    Owns nothing: the caches belong to the model runner. Must write all of the step's K/V before
    reading, so a request may attend to blocks another request in the same step is filling.
    """

    name: ClassVar[str]
    # The model's RMSNorm / rotary / SiLU-and-mul run as Triton kernels alongside this backend.
    triton_layers: ClassVar[bool] = False
    # Decode steps may be captured in CUDA graphs: forward() launches depend only on tensor shapes
    # and decode_max_seq_len, and a negative slot or a zero decode_seq_len marks a padding row.
    supports_cuda_graphs: ClassVar[bool] = False
    # what forward() does beyond causal attention: "sliding_window", "softcap" (the names of
    # arch_config.SLIDING_WINDOW and SOFTCAP; not imported: the models package imports this one)
    features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """`sliding_window`: a query at position p sees only keys at positions > p - window (HF's
        sliding-window mask); `softcap`: scores become softcap * tanh(scores / softcap) before
        the mask and softmax. Both None (plain causal attention) unless `features` has them."""
        ...


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, device: torch.device, needs: frozenset[str] = frozenset()) -> AttentionBackend:
    """`auto`: Triton on a GPU where triton is installed and has every feature in `needs` (what
    the model asks of attention: ModelArchConfig.attention_needs), else the torch reference.
    A named backend without one of them is a ValueError that says which backend has it."""
    if name == "auto":
        triton_fits = needs <= _BACKENDS["triton"].features
        name = "triton" if device.type == "cuda" and triton_installed() and triton_fits else "torch"
    if name not in _BACKENDS:
        raise ValueError(
            f"attention backend {name!r} is not available; choose one of {', '.join(sorted(_BACKENDS))}"
        )
    missing = needs - _BACKENDS[name].features
    if missing:
        raise ValueError(
            f"attention backend {name!r} has no {' or '.join(sorted(missing))} attention, which this "
            "model needs; use --attention-backend torch (or auto)"
        )
    return _BACKENDS[name](device)


@register_backend
class TorchAttention(AttentionBackend):
    """PyTorch reference: SDPA per prefill chunk, one batched SDPA over gathered blocks for all
    decodes. A sliding window is a mask over the same keys (blocks out of the window are still
    gathered: the cache keeps them); soft-capping runs HF's eager attention instead of SDPA."""

    name = "torch"
    features = frozenset({"sliding_window", "softcap"})

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        # pagoda's CPU decode attention, where this CPU runs pagoda's kernels (decided here, once:
        # the check reads /proc/cpuinfo, which a compiled graph's trace cannot)
        self.native = device.type == "cpu" and native.runs("decode_attention")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        _num_blocks, _block_size, num_kv_heads, head_dim = k_cache.shape
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:  # decode only: no output buffer to fill
            return self._decode(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale, sliding_window, softcap)
        for start, qlen, ctx, table in zip(
            meta.prefill_query_starts,
            meta.prefill_query_lens,
            meta.prefill_context_lens,
            meta.prefill_block_tables,
            strict=True,
        ):
            qs = q[start : start + qlen].transpose(0, 1)  # [heads, qlen, head_dim]
            if ctx == 0:
                ks = k[start : start + qlen].transpose(0, 1)
                vs = v[start : start + qlen].transpose(0, 1)
            else:
                total = ctx + qlen
                ks = k_cache.index_select(0, table).view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
                vs = v_cache.index_select(0, table).view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
            o = self._masked_chunk(qs, ks, vs, ctx, scale, sliding_window, softcap)
            out[start : start + qlen] = o.transpose(0, 1)
        return out

    @staticmethod
    def _masked_chunk(
        qs: torch.Tensor,  # [heads, qlen, head_dim]
        ks: torch.Tensor,  # [kv_heads, ctx + qlen, head_dim]
        vs: torch.Tensor,
        ctx: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # [heads, qlen, head_dim]
        """A prefill chunk after `ctx` cached tokens: query i sits at position ctx + i and sees
        keys 0..ctx + i (the last `window` of them); without either, SDPA's own causal mask."""
        qlen = qs.shape[1]
        rows = torch.arange(qlen, device=qs.device)[:, None] + ctx
        cols = torch.arange(ctx + qlen, device=qs.device)[None, :]
        mask = cols <= rows
        if sliding_window is not None:
            mask &= cols > rows - sliding_window
        if softcap is None:
            gqa, causal = qs.shape[0] != ks.shape[0], ctx == 0 and sliding_window is None
            # with a batch dimension: on CPUs torch's flash kernel (3-D inputs take its math path,
            # 2-4x slower for prompts of 150-500 tokens)
            given = None if causal else mask
            o = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], given, is_causal=causal, scale=scale, enable_gqa=gqa
            )
            return o[0]
        rep = qs.shape[0] // ks.shape[0]  # HF's repeat_kv: query head h reads KV head h // rep
        return eager_attention(
            qs, ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0), mask, scale, softcap
        )

    def _decode(
        self,
        q: torch.Tensor,  # [nd, heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [nd, heads, head_dim]
        """One SDPA over each sequence's gathered blocks, keys past a sequence's length masked.
        The gather ids and the mask are built once per step (meta.step_cache; one mask per window
        size). A single sequence is masked too rather than cut to its length: the masked form
        gives a sequence the same result whatever else is in the batch (SDPA's unmasked path
        rounds differently), so a greedy stream does not change with the load, alone at the end
        or in a crowd."""
        if self.native and native_decode_usable(q, k_cache):
            return native_decode(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
        nd = q.shape[0]
        _num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        cache = meta.step_cache
        if "decode_ids" not in cache:
            max_blocks = -(-meta.decode_max_seq_len // block_size)
            cache["decode_ids"] = meta.decode_block_tables[:, :max_blocks].reshape(-1)
        mask_key = "decode_mask" if sliding_window is None else f"decode_mask_{sliding_window}"
        if mask_key not in cache:
            cache[mask_key] = _decode_bias(meta, block_size, q.dtype, sliding_window)
        ids, mask = cache["decode_ids"], cache[mask_key]
        assert ids is not None and mask is not None
        # [nd * max_blocks, block_size, kv_heads, head_dim] -> [nd, kv_heads, L, head_dim]
        # (index_select: ~5x faster than advanced indexing on CPU)
        kd = k_cache.index_select(0, ids).view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        vd = v_cache.index_select(0, ids).view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        # GQA without repeating K/V: the query heads sharing a KV head form its query rows
        qd = q.view(nd, num_kv_heads, -1, head_dim)
        if softcap is None:
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        else:
            od = eager_attention(qd, kd, vd, mask, scale, softcap)
        return od.reshape(nd, -1, head_dim)


def native_decode_usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether pagoda's CPU decode attention (quantization/csrc/attention.cpp) takes these (on a
    CPU that runs it: the caller checks `native.runs("decode_attention")` once): float32 or
    bfloat16 throughout, head_dim a multiple of 16 up to 256, at most 16 query heads per KV head,
    a contiguous cache."""
    heads, (_, _, kv_heads, dim) = q.shape[1], k_cache.shape
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and k_cache.dtype == q.dtype
        and dim % 16 == 0
        and dim <= 256
        and heads % kv_heads == 0
        and heads // kv_heads <= 16
        and k_cache.is_contiguous()
    )


def native_decode(
    q: torch.Tensor,  # [nd, heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:  # [nd, heads, head_dim]
    """Each sequence's keys and values read in place through its block table (no gather, no
    mask, no padding): 1.5x inductor's loops and 5x gather + SDPA at 16 rows x 192 tokens. The
    result of a sequence does not depend on the rest of the batch."""
    return torch.ops.pagoda_cpu.decode_attention(  # type: ignore[no-any-return]
        q.contiguous(),
        k_cache,
        v_cache,
        meta.decode_block_tables,
        meta.decode_seq_lens,
        scale,
        sliding_window or 0,
        softcap or 0.0,
    )


def _decode_bias(
    meta: AttentionMetadata, block_size: int, dtype: torch.dtype, sliding_window: int | None
) -> torch.Tensor:  # [nd, 1, 1, L]
    """The additive mask of a decode batch: 0 on each sequence's keys (the last `sliding_window`
    of them), -inf elsewhere."""
    length = -(-meta.decode_max_seq_len // block_size) * block_size
    lens = meta.decode_seq_lens[:, None]
    cols = torch.arange(length, device=lens.device)[None, :]
    keep = cols < lens
    if sliding_window is not None:
        keep &= cols >= lens - sliding_window
    bias = torch.zeros(keep.shape, dtype=dtype, device=lens.device)
    bias.masked_fill_(~keep, float("-inf"))
    return bias[:, None, None, :]


def eager_attention(
    q: torch.Tensor,  # [..., n, head_dim]
    k: torch.Tensor,  # [..., L, head_dim], as many heads as q (or broadcastable)
    v: torch.Tensor,
    mask: torch.Tensor,  # bool (True: attend) or additive float, broadcastable to [..., n, L]
    scale: float,
    softcap: float | None,
) -> torch.Tensor:  # [..., n, head_dim]
    """Attention written out as HF's eager path computes it (SDPA cannot soft-cap): scores,
    softcap * tanh(scores / softcap), the mask, a float32 softmax cast back, then the values."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


@register_backend
class TritonAttention(AttentionBackend):
    """Triton kernels (kernels/): the KV write by slot mapping, then split-K paged decode for
    decode-only steps and one unified varlen kernel for steps with prefill chunks (decodes in the
    same launch). Needs a GPU, or TRITON_INTERPRET=1 on the CPU (tests). A layer's sliding window
    and soft-cap are switches of the kernels (compiled once per combination); with a window, a
    decode reads only its sequence's last `sliding_window` keys, and the split-K decode splits
    those."""

    name = "triton"
    triton_layers = True
    supports_cuda_graphs = True
    features = frozenset({"sliding_window", "softcap"})

    def __init__(self, device: torch.device) -> None:
        check_triton(device)
        from pagoda.kernels.kv_cache import reshape_and_cache
        from pagoda.kernels.paged_attention import decode_num_splits, paged_decode, unified_attention

        self._write = reshape_and_cache
        self._decode = paged_decode
        self._unified = unified_attention
        self._num_splits = decode_num_splits
        super().__init__(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.num_sms = sms

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        self._write(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:  # decode only
            span = meta.decode_max_seq_len  # the most keys a query reads
            if sliding_window is not None:
                span = min(span, sliding_window)
            splits = self._num_splits(nd, k_cache.shape[2], span, self.num_sms)
            self._decode(
                out,
                q,
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_seq_lens,
                meta.decode_max_seq_len,
                scale,
                num_splits=splits,
                sliding_window=sliding_window,
                softcap=softcap,
            )
            return out
        qsl, seq_lens, tables = meta.query_start_loc, meta.seq_lens, meta.block_tables
        assert qsl is not None and seq_lens is not None and tables is not None, "no varlen metadata"
        self._unified(
            out,
            q,
            k_cache,
            v_cache,
            tables,
            seq_lens,
            qsl,
            meta.max_query_len,
            scale,
            sliding_window,
            softcap,
        )
        return out
