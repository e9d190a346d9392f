"""config.json as the Hub ships it (transformers 4 names) -> ModelArchConfig for the Phi-3 and
Gemma families: what transformers fills in when a field is absent (Gemma's local-layer pattern,
Phi-3's LongRoPE names and factor), and clear errors for what pagoda does not run."""

from __future__ import annotations

from typing import Any

import pytest

from pagoda.engine.loader import ModelLoadError
from pagoda.engine.loader.hf_loader import arch_from_hf_config

COMMON: dict[str, Any] = {
    "vocab_size": 260,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 8192,
}


def test_gemma2_of_the_hub() -> None:
    config = {
        **COMMON,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 144,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "rope_theta": 10000.0,
    }
    arch = arch_from_hf_config(config)
    assert arch.architecture == "gemma2" and not arch.qk_norm
    assert arch.layer_types == ("sliding_attention", "full_attention") * 2  # even layers local
    assert (arch.sliding_window, arch.attn_logit_softcap, arch.final_logit_softcap) == (4096, 50.0, 30.0)
    assert arch.softmax_scale == 144**-0.5 and arch.local_rope_theta is None


def test_gemma3_text_of_the_hub() -> None:
    config = {
        **COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 12,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }
    arch = arch_from_hf_config(config)
    assert arch.architecture == "gemma3" and arch.qk_norm
    assert arch.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 2
    assert (arch.rope_theta, arch.local_rope_theta) == (1e6, 1e4)
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert arch.attn_logit_softcap is None and arch.final_logit_softcap is None
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        arch_from_hf_config({**config, "use_bidirectional_attention": True})


def test_phi3_longrope_of_the_hub() -> None:
    """Phi-3-mini-128k's names: type "su" (now "longrope"), original_max_position_embeddings
    outside rope_scaling, no factor (max_position_embeddings / original)."""
    config = {
        **COMMON,
        "model_type": "phi3",
        "num_hidden_layers": 2,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "sliding_window": 262144,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
    }
    arch = arch_from_hf_config(config)
    assert arch.architecture == "phi3" and arch.rotary_dim == 12
    assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "longrope"
    assert arch.rope_scaling["original_max_position_embeddings"] == 4096
    assert arch.rope_scaling["factor"] == 32.0
    assert arch.sliding_window == 262144 and arch.layer_window(0, 4096) is None


def test_unsupported_rope_type_is_a_load_error() -> None:
    config = {
        **COMMON,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "rope_scaling": {"rope_type": "dynamic"},
    }
    with pytest.raises(ModelLoadError, match="rope_scaling type 'dynamic' is not supported"):
        arch_from_hf_config(config)
