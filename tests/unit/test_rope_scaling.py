"""RoPE scaling types beside transformers' own (`ROPE_INIT_FUNCTIONS`): YaRN (attention factor
from factor, mscale / mscale_all_dim, or given; truncated or not) and LongRoPE (short factors
within the original context, long beyond it), bitwise; and partial rotary leaves the other dims."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagoda.engine.models.layers import RotaryEmbedding
from pagoda.engine.models.rope_scaling import rope_parameters


def _hf(rope: dict[str, Any], max_position: int = 512, partial: float = 1.0, seq_len: int | None = None):  # type: ignore[no-untyped-def]
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**rope, "partial_rotary_factor": partial}
    config = tf.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=max_position, rope_parameters=rope
    )
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, torch.device("cpu"), seq_len=seq_len)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"attention_factor": 1.5},
        {"beta_fast": 16, "truncate": False},
    ],
    ids=["factor", "mscale", "given", "untruncated"],
)
def test_yarn_matches_transformers(extra: dict[str, Any]) -> None:
    rope = {**YARN, **extra}
    want_freq, want_factor = _hf(rope)
    got_freq, got_factor = rope_parameters(16, 10000.0, rope, 256)
    assert torch.equal(got_freq, want_freq)
    assert got_factor == pytest.approx(want_factor, rel=1e-12) and got_factor != 1.0


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
    "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0],
    "original_max_position_embeddings": 128,
    "factor": 4.0,
}


@pytest.mark.parametrize("max_model_len", [128, 512], ids=["short", "long"])
def test_longrope_matches_transformers(max_model_len: int) -> None:
    """Phi-4-mini's shape: 3/4 of a head of 16 turn (12 dims, 6 factors); the engine's
    max_model_len picks the factor set as HF's sequence length does."""
    want_freq, want_factor = _hf(LONGROPE, partial=0.75, seq_len=max_model_len)
    got_freq, got_factor = rope_parameters(12, 10000.0, LONGROPE, max_model_len)
    assert torch.equal(got_freq, want_freq)
    assert got_factor == pytest.approx(want_factor, rel=1e-12) and got_factor > 1.0


def test_longrope_factors_must_cover_the_rotary_dims() -> None:
    with pytest.raises(ValueError, match="6 entries, the rotary dims need 8"):
        rope_parameters(16, 10000.0, LONGROPE, 128)


def test_partial_rotary_turns_the_first_dims_only() -> None:
    rope = RotaryEmbedding(16, 64, 10000.0, None, rotary_dim=12)
    full = RotaryEmbedding(12, 64, 10000.0, None)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    pos = torch.arange(5) * 7
    got_q, got_k = rope(pos, q, k)
    want_q, want_k = full(pos, q[..., :12].contiguous(), k[..., :12].contiguous())
    assert torch.equal(got_q[..., :12], want_q) and torch.equal(got_k[..., :12], want_k)
    assert torch.equal(got_q[..., 12:], q[..., 12:]) and torch.equal(got_k[..., 12:], k[..., 12:])
    qk = torch.cat((q, k), dim=1)
    assert torch.equal(rope.forward_qk(pos, qk), torch.cat((got_q, got_k), dim=1))
    rope.use_triton = True  # the kernel turns whole heads: a partial rotary stays in PyTorch
    assert not rope.use_triton
