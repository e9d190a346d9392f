"""Our tokenizer against transformers' (the reference) on the demo GGUF, plus the HF-dir path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagoda.engine.loader import demo_model_path
from pagoda.engine.tokenization.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "numbers 1234567, 3.14159 and -42; 2024-01-01",
    "日本語のテキスト, ελληνικά, русский, 한국어 🤖👍🏽 émoji café",
    "def f(x):\n    return x ** 2\n\n\n\tindented\r\nCRLF",
    "whitespace    runs\n\n\n\n   and\t\t\ttabs",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b<|im_end|>c",
    "<|im_start|><|im_start|> <|im_end|>",
    "it's we're I'll they've she'd DON'T",
    "x" * 40 + "y" * 7,
    "<repo_name>pagoda<file_sep>engine/tokenizer.py",
    "ĠĊ weird bytes \x00\x01\x7f and \u200b zero width",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    [{"role": "user", "content": "unicode ✓ and\nnewlines\n"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(demo_model_path())


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoTokenizer

    path = Path(demo_model_path())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == reference.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    got = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    want = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert got == want


def test_special_token_facts(ours: Tokenizer, reference: Any) -> None:
    assert ours.vocab_size == len(reference) == 49152
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == (2,)
    assert ours.add_bos_token is False
    assert ours.is_special(0) and ours.is_special(1) and ours.is_special(2)
    assert not any(ours.is_special(i) for i in ours.encode("plain words"))
    assert ours.encode("<|im_start|>") == [1]


def test_digits_split_individually(ours: Tokenizer) -> None:
    tokens = ours.convert_ids_to_tokens(ours.encode("1234567"))
    assert tokens == list("1234567")


def test_incremental_detokenization_pieces(ours: Tokenizer, reference: Any) -> None:
    text = "héllo wörld 🤖 <|im_end|> done"
    ids = ours.encode(text)
    tokens = ours.convert_ids_to_tokens(ids)
    assert tokens == reference.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_string(tokens) == text
    # a prefix ending inside a multi-byte character decodes to a replacement char, not an error
    emoji_start = next(i for i, t in enumerate(tokens) if "ð" in t)
    partial = ours.convert_tokens_to_string(tokens[: emoji_start + 1])
    assert partial.endswith("\ufffd")


def test_chat_template_features() -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}GO{{ eos_token }}{% endif %}"
    )
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=template)
    out = tok.apply_chat_template([{"role": "user", "content": "é<b>"}])
    assert out == '<s>{"role": "user", "content": "é<b>"}\nGO</s>'
    with pytest.raises(Exception, match="bad role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    no_template = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_dir_round_trip(ours: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == ours.encode(text) == reference.encode(text)
        assert loaded.decode(ids) == ours.decode(ids)
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.vocab_size) == (1, (2,), 49152)
    for conversation in CONVERSATIONS:
        assert loaded.apply_chat_template(conversation) == ours.apply_chat_template(conversation)


def test_hf_dir_bos_and_generation_config(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.add_bos_token
    assert loaded.encode("hi") == [1, *ours.encode("hi")]
    assert loaded.encode("hi", add_special_tokens=False) == ours.encode("hi")
    assert loaded.eos_token_ids == (2, 0)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
