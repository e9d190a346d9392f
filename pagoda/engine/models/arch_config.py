"""What a checkpoint says about its network: the hyperparameters one model definition needs.

Loaders (GGUF, Hugging Face directories) fill this in; `engine.models` builds the network from it.
Weights always travel under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "bert",
    "mixtral", "qwen2_moe", "qwen3_moe", "granitemoe",
)  # fmt: skip
MOE_ARCHITECTURES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "granitemoe"})
ENCODER_ARCHITECTURES = frozenset({"bert"})
# what a model may ask of its attention backend beyond causal attention (AttentionBackend.features)
SLIDING_WINDOW = "sliding_window"
SOFTCAP = "softcap"


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES (mistral and granite load as "llama")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the norms' epsilon (BERT: its LayerNorm's)
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Granite's scaling multipliers; 1.0 (and attention_multiplier None) mean plain Llama.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # softmax scale; None -> 1/sqrt(head_dim)
    logits_scaling: float = 1.0  # logits are divided by this
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # encoders (BERT): token type embeddings (every token is of type 0) and the MLP's activation
    type_vocab_size: int = 0
    hidden_act: str = "silu"
    # RoPE on the first partial_rotary_factor * head_dim dims of each head only (Phi-4-mini)
    partial_rotary_factor: float = 1.0
    # local attention: a query at position p sees keys at positions > p - sliding_window, on the
    # layers that layer_types names "sliding_attention" (every layer when layer_types is empty)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    # Gemma 2: attention scores become cap * tanh(scores / cap) (attention), and so do the logits (final)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # mixture of experts (MOE_ARCHITECTURES): each token runs the top num_experts_per_tok of
    # num_experts gated MLPs of moe_intermediate_size, weighted by the router's softmax, the top-k
    # weights renormalised to sum to 1 where norm_topk_prob; Qwen2-MoE adds a shared expert (a
    # dense MLP every token takes, gated by a sigmoid). Layers in dense_mlp_layers keep the dense
    # MLP of intermediate_size (Qwen's mlp_only_layers / decoder_sparse_step).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    dense_mlp_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; pagoda runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral/Granite/SmolLM2 as llama)"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types names {len(self.layer_types)} layers, the model has {self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be within 1..{self.num_experts} experts"
            )

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_mlp_layers

    @property
    def is_encoder(self) -> bool:
        """Bidirectional attention over the whole prompt at once: embeddings only, no KV cache."""
        return self.architecture in ENCODER_ARCHITECTURES

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window (Gemma's local layers)."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int, max_model_len: int) -> int | None:
        """The sliding window of layer `layer`, or None where it sees every earlier key: a full
        layer, or a window that no sequence of max_model_len tokens outgrows."""
        if not self.is_sliding(layer) or self.sliding_window is None or self.sliding_window >= max_model_len:
            return None
        return self.sliding_window

    def attention_needs(self, max_model_len: int) -> frozenset[str]:
        """The attention features (SLIDING_WINDOW, SOFTCAP) this model needs of a backend when
        serving sequences of up to max_model_len tokens."""
        needs = set()
        if any(self.layer_window(i, max_model_len) is not None for i in range(self.num_layers)):
            needs.add(SLIDING_WINDOW)
        if self.attn_logit_softcap is not None:
            needs.add(SOFTCAP)
        return frozenset(needs)

    @property
    def softmax_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return float(self.head_dim) ** -0.5
