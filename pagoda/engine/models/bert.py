"""BERT-style encoders for embeddings: learned absolute positions, post-norm LayerNorm layers,
GELU MLPs, and bidirectional attention within each sequence (every token sees the whole prompt,
so a prompt runs whole in one step and leaves no KV behind).

Tokens come flattened as in the decoders ([num_tokens]); the attention metadata's
`query_start_loc` says where each sequence starts. Weights load under Hugging Face's `BertModel`
names (with or without the `bert.` prefix of `BertForMaskedLM`; its heads and the pooler are not
used: CLS pooling takes the first token's hidden state, as sentence-transformers does).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.weight_loading import LoadReport, ModelLoader, Weight
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata

_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
# HF BertModel name (after the layer index) -> this module's
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "mlp_norm",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.softmax_scale
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.approximate = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        heads = self.qkv(x).view(-1, 3, self.num_heads, self.head_dim).transpose(0, 2)  # [nh, 3, n, d]
        out = torch.empty(x.shape[0], self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        for lo, hi in itertools.pairwise(bounds):  # each sequence attends to itself only
            q, k, v = heads[:, 0, lo:hi], heads[:, 1, lo:hi], heads[:, 2, lo:hi]
            out[lo:hi] = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(0, 1)
        h = self.attn_norm(x + self.attn_out(out.view(x.shape[0], -1)))
        return self.mlp_norm(h + self.down(F.gelu(self.up(h), approximate=self.approximate)))  # type: ignore[no-any-return]


class BertModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_position: int) -> None:
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BERT hidden_act {cfg.hidden_act!r} is not supported; pagoda runs " + ", ".join(_ACTIVATIONS)
            )
        self.cfg = cfg
        self.attention_needs: frozenset[str] = frozenset()  # attends on its own, with no backend
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(max(cfg.type_vocab_size, 1), h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # unused: an encoder keeps no KV
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        assert meta.query_start_loc is not None and not any(meta.prefill_context_lens), (
            "an encoder runs whole prompts"
        )
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.embed_norm(x + self.token_type_embeddings.weight[0])
        bounds = meta.query_start_loc.tolist()
        for layer in self.layers:
            x = layer(x, bounds)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError("an encoder has no language-model head: it serves embeddings only")

    def load_weights(
        self,
        weights: Iterable[tuple[str, Weight]],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        keep_quantized: bool = True,
    ) -> LoadReport:
        """Load HF `BertModel` weights (query/key/value fused into one matrix)."""
        h = self.cfg.hidden_size
        first = self.embed_norm.weight
        fused = {"query": ("qkv", 0, h), "key": ("qkv", h, h), "value": ("qkv", 2 * h, h)}
        loader = ModelLoader(self, fused, device or first.device, dtype or first.dtype, keep_quantized, False)
        return loader.load(_renamed(weights))


def _renamed(weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
    """HF BERT names -> this module's; the pooler, the MLM/NSP heads and position ids are dropped."""
    for name, value in weights:
        name = name.removeprefix("model.").removeprefix("bert.")
        if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
            continue
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        m = _LAYER.match(name)
        if m is not None:
            part = _LAYER_NAMES.get(m.group(2))
            if part is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in a BERT encoder")
            yield f"layers.{m.group(1)}.{part}.{m.group(3)}", value
            continue
        name = name.removeprefix("embeddings.").replace("LayerNorm", "embed_norm")
        yield name, value
