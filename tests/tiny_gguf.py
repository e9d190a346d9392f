"""Tiny random llama GGUF files with chosen quantization types (K-quants as random blocks: gguf-py
cannot quantize to them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from tests.tiny_models import VOCAB

Q = GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 4, 2, 64, 512  # K-quant blocks span 256 inputs


def random_blocks(qtype: GGMLQuantizationType, out_f: int, in_f: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small fp16 super-block scales (weights of magnitude ~0.1)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (out_f, in_f // block, size), dtype=np.uint8)
    for pos in [208] if qtype == Q.Q6_K else [0, 2]:
        halves = rng.uniform(1e-4, 2e-3, (out_f, in_f // block)).astype(np.float16)
        raw[..., pos : pos + 2] = halves.view(np.uint8).reshape(out_f, in_f // block, 2)
    return raw.reshape(out_f, -1)


def _add(
    writer: GGUFWriter,
    name: str,
    shape: tuple[int, ...],
    qtype: GGMLQuantizationType,
    rng: np.random.Generator,
) -> None:
    if qtype == Q.F32:
        writer.add_tensor(
            name, (rng.standard_normal(shape) * 0.1 + (1.0 if len(shape) == 1 else 0)).astype(np.float32)
        )
    elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        data = random_blocks(qtype, shape[0], shape[1], rng)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    else:
        data = quantize((rng.standard_normal(shape) * 0.1).astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def write_tiny_llama_gguf(
    path: Path, layers: GGMLQuantizationType, embedding: GGMLQuantizationType, num_layers: int = 2
) -> Path:
    """A llama GGUF with tied embeddings: every linear of type `layers`, the embedding `embedding`."""
    from pagoda.engine.tokenization.tokenizer import _bytes_to_unicode

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*_bytes_to_unicode().values(), "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    writer.add_token_types([1] * 256 + [3, 3, 3, 3])
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    _add(writer, "token_embd.weight", (VOCAB, HIDDEN), embedding, rng)
    _add(writer, "output_norm.weight", (HIDDEN,), Q.F32, rng)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
    }  # fmt: skip
    for i in range(num_layers):
        _add(writer, f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32, rng)
        _add(writer, f"blk.{i}.ffn_norm.weight", (HIDDEN,), Q.F32, rng)
        for name, shape in shapes.items():
            _add(writer, f"blk.{i}.{name}.weight", shape, layers, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
