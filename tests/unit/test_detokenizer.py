"""Incremental detokenization and stop strings, with a byte-level fake tokenizer (and the demo's
byte-level BPE vocabulary, whose bytes path must stream what the window decodes do)."""

from __future__ import annotations

import pytest

from pagoda.engine import Tokenizer
from pagoda.engine.tokenization.detokenizer import IncrementalDetokenizer, StopChecker
from tests.fakes import BOS, EOS
from tests.fakes import FakeTokenizer as ByteTokenizer


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.mark.parametrize("text", ["héllo wörld", "price: 5€", "🙂 ok 🚀🚀", "日本語のテキスト"])
def test_multibyte_chars_split_across_tokens_never_emit_replacement(text: str) -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [BOS, *_ids("Q: ")])
    deltas = [detok.add([i]) for i in _ids(text)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == detok.text


def test_several_ids_per_add_and_prompt_ending_mid_character() -> None:
    prompt = [BOS, *_ids("ab€")[:-1]]  # prompt's last character incomplete: context only
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt)
    assert detok.add(_ids("xé")[:2]) == "x"
    assert detok.add(_ids("é")[1:] + _ids("z")) == "éz"


def test_special_tokens_skipped_or_kept() -> None:
    ids = [*_ids("hi"), EOS]
    skip = IncrementalDetokenizer(ByteTokenizer(), [BOS], skip_special_tokens=True)
    assert skip.add(ids) == "hi"
    keep = IncrementalDetokenizer(ByteTokenizer(), [BOS], skip_special_tokens=False)
    assert keep.add(ids) == "hi</s>"


def test_long_output_trims_token_buffer() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [BOS])
    text = "abcé" * 800
    assert "".join(detok.add([i]) for i in _ids(text)) == text


def _feed(checker: StopChecker, deltas: list[str]) -> tuple[str, str | None]:
    out, hit = [], None
    for d in deltas:
        text, h = checker.add(d)
        out.append(text)
        hit = hit or h
    if hit is None:
        out.append(checker.flush())
    return "".join(out), hit


def test_stop_string_spanning_deltas_is_never_emitted() -> None:
    checker = StopChecker(["world"])
    emitted = [checker.add(d) for d in ["Hello wo", "r", "ld and more"]]
    assert emitted[0] == ("Hello ", None)  # "wo" held back: it could start "world"
    assert emitted[1] == ("", None)
    assert emitted[2] == ("", "world")
    assert checker.add("more") == ("", None)


def test_include_stop_str_in_output() -> None:
    assert _feed(StopChecker(["world"], include_stop_str_in_output=True), ["Hello wo", "rld!"]) == (
        "Hello world",
        "world",
    )
    # Straddling a delta boundary where the first part was already emitted.
    checker = StopChecker(["END"], include_stop_str_in_output=True)
    assert checker.add("abcE") == ("abcE", None)
    assert checker.add("ND tail") == ("ND", "END")


def test_no_hit_flushes_held_back_text() -> None:
    checker = StopChecker(["xyz"])
    assert checker.add("abcx") == ("abc", None)  # only "x" could start "xyz"
    assert checker.add("y") == ("", None)
    assert checker.add("!") == ("xy!", None)
    assert checker.add("zx") == ("z", None)
    assert checker.flush() == "x"


def test_earliest_of_several_stop_strings_wins() -> None:
    assert _feed(StopChecker(["long stop", "op"]), ["a long st", "op here"]) == ("a ", "long stop")
    assert _feed(StopChecker(["long stop", "op"]), ["a long sh", "op here"]) == ("a long sh", "op")
    assert _feed(StopChecker(["\n\n", "."]), ["one. two\n\n"]) == ("one", ".")


def test_no_stop_strings_pass_through() -> None:
    checker = StopChecker(["", ""])
    assert checker.add("anything") == ("anything", None)
    assert checker.flush() == ""


class _Windowed:
    """A real tokenizer seen without its byte-level shortcut: the window decodes run instead."""

    byte_level = False

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.convert_ids_to_tokens = tokenizer.convert_ids_to_tokens
        self.convert_tokens_to_string = tokenizer.convert_tokens_to_string
        self.is_special = tokenizer.is_special


@pytest.mark.parametrize("per_add", [1, 3])
def test_byte_level_vocabulary_streams_what_the_windows_do(demo_gguf: str, per_add: int) -> None:
    """The demo's GPT-2-style vocabulary takes the bytes path (no window decodes): the same text
    as the windowed path and a full decode, never later than the windowed path (a complete
    space before a split character goes out at once rather than with it), and no replacement
    character from characters split across tokens."""
    tok = Tokenizer.from_gguf(demo_gguf)
    assert tok.byte_level
    text = "Crème brûlée costs 5€ 🙂🚀 — 日本語のテキスト, <|im_end|> ok"
    ids = tok.encode(text, add_special_tokens=False)
    split = [tok.token_bytes(i).decode("utf-8", "replace") for i in ids]
    assert "\ufffd" in "".join(split)  # some characters do span tokens
    prompt = tok.encode("Q: ", add_special_tokens=False)
    fast, windowed = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(_Windowed(tok), prompt)
    assert fast._utf8 is not None and windowed._utf8 is None
    chunks = [ids[i : i + per_add] for i in range(0, len(ids), per_add)]
    deltas = []
    for chunk in chunks:
        deltas.append(fast.add(chunk))
        windowed.add(chunk)
        assert fast.text.startswith(windowed.text), (fast.text, windowed.text)
    assert "".join(deltas) == fast.text == windowed.text == tok.decode(ids) and "\ufffd" not in fast.text
