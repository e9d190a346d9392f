"""The Llama family: Llama 2/3, SmolLM2, Mistral, Granite (scaling multipliers), Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm) and Phi-3/Phi-4-mini (q/k/v and gate/up stored fused, partial
rotary, LongRoPE). One definition; the differences are flags in ModelArchConfig.

Tokens come flattened: input_ids and positions are [num_tokens]; hidden states [num_tokens, hidden].
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.distributed.tensor_parallel import SINGLE, TensorParallel
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, embedding
from pagoda.engine.models.weight_loading import FusedHFWeights
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        rope: RotaryEmbedding,
        sliding_window: int | None = None,
        norm: type[nn.Module] = RMSNorm,  # of the per-head q/k norms (Gemma's scales by 1 + weight)
        tp: TensorParallel = SINGLE,  # this rank's heads only; o_proj's partial sums all-reduced
    ) -> None:
        super().__init__()
        self.sliding_window = sliding_window  # Mistral's and Phi-3's window, where it binds
        self.num_heads = tp.heads(cfg.num_heads)[1]
        self.num_kv_heads = tp.kv_heads(cfg.num_kv_heads)[1]
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.tp = tp
        self.scale = cfg.softmax_scale
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        nh, nkv = self.num_heads, self.num_kv_heads
        # heads of the fused output, sliced (no view of a strided slice: the compiler would
        # specialize a batch of one): [tokens, heads + 2 * kv_heads, head_dim]
        heads = self.qkv_proj(x).view(-1, nh + 2 * nkv, self.head_dim)
        v = heads[:, nh + nkv :]
        if self.q_norm is None and not self.rope.use_triton:
            qk = self.rope.forward_qk(positions, heads[:, : nh + nkv])  # q and k rotated together
            q, k = qk[:, :nh], qk[:, nh:]
        else:
            q, k = heads[:, :nh], heads[:, nh : nh + nkv]
            if self.q_norm is not None and self.k_norm is not None:
                q = self.q_norm(q)
                k = self.k_norm(k)
            q, k = self.rope(positions, q, k)
        o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window)
        return self.tp.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        rope: RotaryEmbedding,
        sliding_window: int | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, rope, sliding_window, tp=tp)
        self.mlp = GatedMLP(cfg.hidden_size, tp.split(cfg.intermediate_size)[1], tp.all_reduce)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(
        self,
        h: torch.Tensor,  # the previous layer's output (the embeddings for the first layer)
        residual: torch.Tensor | None,  # the residual stream before h is added (None: first layer)
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's output, the residual stream before it)
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(h, positions, kv_cache, meta, backend)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        h = self.mlp(h)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        return h, residual


class LlamaForCausalLM(FusedHFWeights, nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_position: int, tp: TensorParallel = SINGLE) -> None:
        """`tp`: build this rank's shard (pagoda/engine/distributed): its heads, its slice of the
        MLP, its range of the vocabulary."""
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.num_kv_heads = tp.kv_heads(cfg.num_kv_heads)[1]  # what this rank's KV cache holds
        self.attention_needs = cfg.attention_needs(max_position)  # what the attention backend must do
        rope = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim)
        vocab = tp.vocab(cfg.vocab_size)[1]
        self.embed_tokens = embedding(vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rope, cfg.layer_window(i, max_position), tp) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
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
        self.tp.begin_forward(input_ids, positions, meta)  # rank 0 of several: the others run it too
        x = self.tp.embed(self.embed_tokens, input_ids, self.cfg.vocab_size)
        if self.cfg.embedding_multiplier != 1.0:
            x = x * self.cfg.embedding_multiplier
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv_cache, meta, backend)
        if residual is None:
            return self.norm(x)  # type: ignore[no-any-return]
        return self.norm.add_forward(x, residual)[0]  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] float32
        self.tp.begin_logits(hidden)
        if getattr(self.lm_head, "float_logits", False):  # a head whose kernel sums in float32 anyway
            hidden = hidden.float()  # its logits stay float32, not rounded to bf16 (ties at 1/8)
        logits = self.tp.gather_logits(self.lm_head(hidden), self.cfg.vocab_size)  # rank 0: whole vocab
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        return logits.float()  # type: ignore[no-any-return]
