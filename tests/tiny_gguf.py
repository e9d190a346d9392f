"""Tiny random llama GGUF files with chosen quantization types (K-quants as random blocks: gguf-py
cannot quantize to them), with the byte-level vocabulary of `tests.tiny_models` or a tiny
SentencePiece one trained here in a few milliseconds."""

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
    path: Path,
    layers: GGMLQuantizationType,
    embedding: GGMLQuantizationType,
    num_layers: int = 2,
    sentencepiece: Path | None = None,
) -> Path:
    """A llama GGUF with tied embeddings: every linear of type `layers`, the embedding `embedding`;
    the vocabulary of the SentencePiece model file `sentencepiece` if given (see
    `train_tiny_sentencepiece`), else the byte-level one of `tests.tiny_models`."""
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
    vocab = (
        _add_byte_level_vocab(writer)
        if sentencepiece is None
        else add_sentencepiece_vocab(writer, sentencepiece)
    )
    _add(writer, "token_embd.weight", (vocab, HIDDEN), embedding, rng)
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


def _add_byte_level_vocab(writer: GGUFWriter) -> int:
    from pagoda.engine.tokenization.gguf_vocab import bytes_to_unicode

    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*bytes_to_unicode().values(), "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    writer.add_token_types([1] * 256 + [3, 3, 3, 3])
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    return VOCAB


# What the tiny SentencePiece model learns from: words that share pieces, digits, accents, code.
SPM_TRAINING_TEXT = """The quick brown fox jumps over the lazy dog. Hello world, hello there!
A tokenizer splits the text into pieces; the pieces are merged by their scores.
def tokenize(text):
    return [piece for piece in text.split()]
Numbers 1234567 and 3.14159; dates 2024-01-01 and times 12:30.
    indented lines   with   runs of spaces and\ttabs
Une phrase en français avec des accents: café, déjà vu, naïve, élève.
Ein deutscher Satz über Straßen, Bäume und Flüsse.
<|im_start|>user asks the assistant a question<|im_start|>assistant answers it
"""
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def train_tiny_sentencepiece(path: Path, vocab_size: int = 400, add_dummy_prefix: bool = True) -> Path:
    """A SentencePiece BPE model trained as Llama 2's was (byte fallback, digits split, no
    normalization, whitespace-only pieces) on `SPM_TRAINING_TEXT`; `<|im_start|>` user-defined."""
    import sentencepiece

    lines = [line for line in SPM_TRAINING_TEXT.splitlines() if line] * 4
    with path.open("wb") as out:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            normalization_rule_name="identity",
            character_coverage=1.0,
            user_defined_symbols=["<|im_start|>"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    return path


def add_sentencepiece_vocab(writer: GGUFWriter, model_file: Path, merges: list[str] | None = None) -> int:
    """The tokenizer metadata llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece model
    (no merges, unless given: llama.cpp merges by score); returns the vocabulary size."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_bos_token_id(proto.trainer_spec.bos_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(SPM_CHAT_TEMPLATE)
    if merges is not None:
        writer.add_token_merges(merges)
    return len(proto.pieces)


def write_sentencepiece_vocab_gguf(path: Path, model_file: Path, merges: list[str] | None = None) -> Path:
    """A GGUF with the vocabulary of `model_file` and no tensors: enough for a tokenizer."""
    writer = GGUFWriter(str(path), "llama")
    add_sentencepiece_vocab(writer, model_file, merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
