"""A GGUF with a SentencePiece (`llama`) vocabulary, as llama.cpp writes Llama 2's or Mistral's:
pagoda's tokenizer against transformers loading the same file (the reference) and against the
SentencePiece model it came from, trained here in milliseconds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFWriter

from pagoda.engine.loader import ModelLoadError
from pagoda.engine.loader.model_info import read_model_info
from pagoda.engine.tokenization.detokenizer import IncrementalDetokenizer
from pagoda.engine.tokenization.tokenizer import Tokenizer
from tests.tiny_gguf import SPM_TRAINING_TEXT, train_tiny_sentencepiece, write_sentencepiece_vocab_gguf

# Text SentencePiece itself encodes the same way: no leading whitespace, no special token.
PLAIN_TEXTS = [
    "Hello world",
    "",
    "trailing spaces  ",
    "multiple   inner    spaces and\ttabs\t\t",
    "a\nb\n\nnewlines\r\nCRLF\n",
    "numbers 1234567, 3.14159 and -42; 2024-01-01",
    "café déjà vu naïve élève Straße über Bäume",
    "日本語のテキスト, ελληνικά, русский, 한국어 🤖👍🏽 émoji",  # byte fallback
    "def tokenize(text):\n    return [piece for piece in text.split()]",
    "ask<|im_start|>user hi",  # a user-defined piece: kept whole by both
    "zero\u200bwidth \x00\x01\x7f control bytes",
    SPM_TRAINING_TEXT,
]
# Text where transformers (and so pagoda) and SentencePiece part ways (see `test_leading_whitespace`).
OTHER_TEXTS = [
    " ",
    "   ",
    " leading space",
    "  two leading spaces",
    "\nleading newline",
    "<s>bos in text",
    "hi</s>there",
    "hi </s> there </s>",
    "<unk> and </s><s>",
    "<|im_start|>assistant",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spm")
    model = train_tiny_sentencepiece(root / "tiny.model")
    return model, write_sentencepiece_vocab_gguf(root / "tiny-spm.gguf", model)


@pytest.fixture(scope="module")
def ours(files: tuple[Path, Path]) -> Tokenizer:
    return Tokenizer.from_gguf(files[1])


@pytest.fixture(scope="module")
def reference(files: tuple[Path, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(files[1].parent), gguf_file=files[1].name)


@pytest.fixture(scope="module")
def spm(files: tuple[Path, Path]) -> Any:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(files[0]))


@pytest.mark.parametrize("text", PLAIN_TEXTS + OTHER_TEXTS)
def test_encode_decode_match_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == reference.encode(text, add_special_tokens=add_special)
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_encode_decode_match_sentencepiece(ours: Tokenizer, spm: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ids == [spm.bos_id(), *spm.encode(text)]
    assert ours.decode(ids) == spm.decode(ids) == text


def test_leading_whitespace(ours: Tokenizer, spm: Any) -> None:
    """transformers prepends `▁` only to text that does not start with a space, and only at the
    start of the text; SentencePiece (and llama.cpp) always prepend it. pagoda follows transformers."""
    assert ours.convert_ids_to_tokens(ours.encode(" ", add_special_tokens=False)) == ["▁"]
    assert spm.encode(" ", out_type=str) == ["▁▁"]
    assert ours.decode(ours.encode("  two")) == " two"  # the decoder strips the one it assumes
    assert ours.encode("hi</s>there", add_special_tokens=False)[-2:] == ours.encode("</s>there")[-2:]


def test_special_tokens_and_byte_fallback(ours: Tokenizer, spm: Any) -> None:
    assert (ours.bos_token, ours.eos_token) == ("<s>", "</s>")
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos_token) == (1, (2,), True)
    assert ours.vocab_size == spm.get_piece_size()
    assert all(ours.is_special(i) for i in (0, 1, 2))
    assert ours.encode("</s>", add_special_tokens=False) == [2]
    assert ours.encode("<unk>", add_special_tokens=False) == [0]
    user = spm.piece_to_id("<|im_start|>")
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [user] and not ours.is_special(user)
    tokens = ours.convert_ids_to_tokens(ours.encode("a\n🤖", add_special_tokens=False))
    assert tokens == ["▁a", "<0x0A>", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert not any(ours.is_special(i) for i in ours.encode(SPM_TRAINING_TEXT, add_special_tokens=False))


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenization(ours: Tokenizer, reference: Any, skip: bool) -> None:
    """Token by token, the streamed text is what decoding prompt + output at once adds to the
    prompt's text, and never shows half a byte-fallback character."""
    for prompt_text in ("", "Question: 日本?", "café 🤖"):
        prompt = ours.encode(prompt_text)
        output = ours.encode(" Answer:  ünïcode 🤖👍🏽 \n\n  x</s> and 12345 </s>", add_special_tokens=False)
        detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
        deltas = [detok.add([i]) for i in output]
        assert all("\ufffd" not in d for d in deltas)
        whole = reference.decode(prompt + output, skip_special_tokens=skip)
        start = reference.decode(prompt, skip_special_tokens=skip)
        assert whole.startswith(start)
        assert "".join(deltas) == whole[len(start) :]


def test_without_space_prefix(tmp_path: Path) -> None:
    """A vocabulary trained without SentencePiece's dummy prefix (`add_space_prefix` false) encodes
    as SentencePiece and llama.cpp do. (transformers 5 ignores the flag and prepends `▁`.)"""
    import sentencepiece

    model = train_tiny_sentencepiece(tmp_path / "raw.model", add_dummy_prefix=False)
    ours = Tokenizer.from_gguf(write_sentencepiece_vocab_gguf(tmp_path / "raw.gguf", model))
    spm = sentencepiece.SentencePieceProcessor(model_file=str(model))
    for text in ["Hello world", " leading", "two  spaces ", "a\nb 🤖", SPM_TRAINING_TEXT]:
        ids = ours.encode(text)
        assert ids == [1, *spm.encode(text)]
        assert ours.decode(ids) == text
    assert ours.encode("x</s> y", add_special_tokens=False) == [*spm.encode("x"), 2, *spm.encode(" y")]


def test_merges_in_the_file_are_used(files: tuple[Path, Path], tmp_path: Path) -> None:
    """A file that lists merges is merged by them, not by scores (llama.cpp writes none for
    SentencePiece models; other converters may)."""
    path = write_sentencepiece_vocab_gguf(tmp_path / "merges.gguf", files[0], merges=["H e"])
    tok = Tokenizer.from_gguf(path)
    assert tok.convert_ids_to_tokens(tok.encode("Hello")) == ["<s>", "▁", "He", "l", "l", "o"]


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", None])
def test_unsupported_tokenizer_models_are_refused(tmp_path: Path, model: str | None) -> None:
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "llama")
    if model is not None:
        writer.add_tokenizer_model(model)
    writer.add_token_list(["[UNK]", "a", "b"])
    writer.add_context_length(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=rf"tokenizer model {model!r} is not supported"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ModelLoadError, match=rf"other\.gguf.*{model!r}"):
        read_model_info(str(path))


def test_hf_dir_round_trip(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    for text in PLAIN_TEXTS + OTHER_TEXTS:
        assert loaded.encode(text) == ours.encode(text)
        assert loaded.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.add_bos_token) == (1, (2,), True)


def test_engine_serves_a_sentencepiece_gguf(files: tuple[Path, Path], reference: Any, tmp_path: Path) -> None:
    """A tiny random llama with the SentencePiece vocabulary: prompts (plain and chat) tokenized as
    transformers does, output text decoded as transformers does, greedy tokens the same from
    text or ids."""
    from gguf import GGMLQuantizationType

    from pagoda.engine import LLM, SamplingParams
    from tests.tiny_gguf import write_tiny_llama_gguf

    f32 = GGMLQuantizationType.F32
    path = write_tiny_llama_gguf(tmp_path / "tiny-spm.gguf", f32, f32, num_layers=1, sentencepiece=files[0])
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=128)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = "Hello world, café 🤖\n"
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    assert out.prompt_token_ids == reference.encode(prompt)
    (completion,) = out.outputs
    assert len(completion.token_ids) == 8
    assert completion.text == reference.decode(completion.token_ids, skip_special_tokens=True)
    (again,) = llm.generate([out.prompt_token_ids], params, use_tqdm=False)
    assert again.outputs[0].token_ids == completion.token_ids
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}]
    (chat,) = llm.chat([messages], params, use_tqdm=False)
    text = reference.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s>[INST] hi there [/INST]ok</s>")
    assert chat.prompt_token_ids == reference.encode(text, add_special_tokens=False)
    assert chat.prompt_token_ids.count(1) == 1  # the template's BOS, no second one


def test_random_text_matches_both_references(ours: Tokenizer, reference: Any, spm: Any) -> None:
    """Seeded random mixes of training words, stray characters, whitespace runs and special tokens:
    the score-ranked merges must pick SentencePiece's pieces everywhere, not only on the texts above."""
    rng = random.Random(0)
    words = SPM_TRAINING_TEXT.replace("\n", " \n ").split(" ")
    extra = ["🤖", "ß", "中", " ", "  ", "\n", "\t", "<s>", "</s>", "<unk>", "<|im_start|>"]
    alphabet = sorted(set(SPM_TRAINING_TEXT)) + extra
    for _ in range(500):
        parts = [
            rng.choice(words) if rng.random() < 0.6 else "".join(rng.choices(alphabet, k=rng.randint(1, 6)))
            for _ in range(rng.randint(1, 12))
        ]
        text = "".join(p + rng.choice(["", " ", " ", "  "]) for p in parts)
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
        plain = not text[:1].isspace() and not any(s in text for s in ("<s>", "</s>", "<unk>"))
        if plain and not text.startswith("<|im_start|>"):
            assert ids == [1, *spm.encode(text)], text


def test_structured_outputs_see_each_tokens_bytes(ours: Tokenizer) -> None:
    """llguidance reads the rebuilt backend's tokenizer.json: `▁` is a space, byte tokens are
    their byte, so grammars constrain a SentencePiece model's output by its real text."""
    from pagoda.engine.structured.grammar import lltokenizer

    llt = lltokenizer(ours)
    text = "a\nb 🤖 café"
    ids = ours.encode(text, add_special_tokens=False)
    assert llt.decode_bytes(ids) == b" " + text.encode()
    assert [llt.decode_bytes([i]) for i in ours.encode("a\n", add_special_tokens=False)] == [b" a", b"\n"]
