"""Gemma 2 and Gemma 3 (text): the Llama skeleton with Gemma's own numerics, in a class of its
own so that llama.py's hot path keeps no branch for them.

What differs from Llama: RMSNorm scales by (1 + weight) in float32 before the cast back; the
embeddings are multiplied by sqrt(hidden) (rounded to the model's dtype, as HF does); the MLP is
GeGLU (tanh-approximated GELU on the gate); each layer norms the attention and MLP outputs too
(four norms, the residual added after the post-norms); the softmax scale is
query_pre_attn_scalar ** -0.5. Local layers attend within a sliding window (Gemma 2: every other
layer, Gemma 3: five of six, with their own RoPE base). Gemma 2 soft-caps attention scores and
the final logits (cap * tanh(x / cap)); Gemma 3 has per-head q/k norms instead.

Tokens come flattened: input_ids and positions are [num_tokens]; hidden states [num_tokens, hidden].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.layers import RotaryEmbedding, embedding
from pagoda.engine.models.llama import Attention
from pagoda.engine.models.weight_loading import FusedHFWeights
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata

# HF hidden_activation -> F.gelu's `approximate`
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, then cast to x's dtype (Llama casts before the
    weight): HF's numerics. The weight is stored zero-centred."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GeGLU(nn.Module):
    """down(gelu(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, hidden: int, intermediate: int, approximate: str) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.approximate = approximate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)  # type: ignore[no-any-return]


class GemmaAttention(Attention):
    """Llama's attention with Gemma's q/k norms and soft-capped scores; q and k are always rotated
    apart (no fused rotary path to keep in step with)."""

    def __init__(self, cfg: ModelArchConfig, rope: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__(cfg, rope, sliding_window, norm=GemmaRMSNorm)
        self.softcap = cfg.attn_logit_softcap

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        nh, nkv = self.num_heads, self.num_kv_heads
        heads = self.qkv_proj(x).view(-1, nh + 2 * nkv, self.head_dim)  # [tokens, nh + 2 nkv, head_dim]
        q, k, v = heads[:, :nh], heads[:, nh : nh + nkv], heads[:, nh + nkv :]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        o = backend.forward(
            q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, self.softcap
        )
        return self.o_proj(o.reshape(-1, self.q_size))  # type: ignore[no-any-return]


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, rope: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = GemmaAttention(cfg, rope, sliding_window)
        self.mlp = GeGLU(h, cfg.intermediate_size, _GELU[cfg.hidden_act])
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden], the residual stream
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, backend)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)  # type: ignore[no-any-return]


class GemmaForCausalLM(FusedHFWeights, nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_position: int) -> None:
        super().__init__()
        if cfg.hidden_act not in _GELU:
            raise ValueError(
                f"Gemma hidden_activation {cfg.hidden_act!r} is not supported; pagoda runs {', '.join(_GELU)}"
            )
        self.cfg = cfg
        self.attention_needs = cfg.attention_needs(max_position)  # what the attention backend must do
        full = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        local = full
        if cfg.local_rope_theta is not None:  # Gemma 3: local layers turn at their own base, unscaled
            local = RotaryEmbedding(cfg.head_dim, max_position, cfg.local_rope_theta, None)
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, local if cfg.is_sliding(i) else full, cfg.layer_window(i, max_position))
            for i in range(cfg.num_layers)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the embeddings' dtype first (HF: 55.4256 is 55.5 in bf16)
        x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, kv_cache, meta, backend)
        return self.norm(x)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] float32
        if getattr(self.lm_head, "float_logits", False):  # a head whose kernel sums in float32 anyway
            hidden = hidden.float()
        logits = self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits  # type: ignore[no-any-return]
