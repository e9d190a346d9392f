"""Incremental detokenization and stop-string matching for streamed output.

`IncrementalDetokenizer` turns token-id deltas into text deltas the way vLLM does: it keeps the
token strings of the output (plus a short window of the prompt for context) and two offsets,
`prefix_offset` and `read_offset`. Each new token decodes the window `[prefix_offset:]` and emits
only what lies beyond the already-emitted `[prefix_offset:read_offset]`; a window whose text ends
in U+FFFD (a multi-byte UTF-8 character still incomplete) emits nothing until the next token
completes it. With a byte-level vocabulary (`Tokenizer.byte_level`: GPT-2-style BPE, where each
token stands for fixed bytes) the same text comes cheaper: the new tokens' bytes go through an
incremental UTF-8 decoder, which holds back an incomplete character's bytes, with no window
decodes (a third of the gateway's CPU per streamed token went to those).

`StopChecker` holds back the tail of the text that could still grow into a stop string, so a stop
string split across deltas is never streamed before it is recognised.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol

# How many prompt tokens give the first output token its decoding context (vLLM uses the same).
_PROMPT_CONTEXT = 5
# Drop token strings that can no longer influence decoding once this many have piled up.
_TRIM_AT = 1024
_REPLACEMENT_CHAR = "\ufffd"


class DetokenizerTokenizer(Protocol):
    """The part of `engine.tokenizer.Tokenizer` incremental detokenization needs."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...

    def convert_tokens_to_string(self, tokens: list[str]) -> str: ...

    def is_special(self, token_id: int) -> bool: ...


class IncrementalDetokenizer:
    """Text deltas for one output sequence. Not thread-safe; one per choice."""

    def __init__(
        self,
        tokenizer: DetokenizerTokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.text = ""  # all output text emitted so far
        # byte-level vocabularies: the output's bytes through one incremental UTF-8 decoder, which
        # needs no window of the prompt's tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if _byte_level(tokenizer) else None
        tail = [] if self._utf8 is not None else list(prompt_token_ids[-(_PROMPT_CONTEXT + 2) :])
        context = self._keep(tail)
        self._tokens: list[str] = tokenizer.convert_ids_to_tokens(context) if context else []
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - _PROMPT_CONTEXT, 0)

    def _keep(self, ids: list[int]) -> list[int]:
        if not self._skip_special:
            return ids
        return [i for i in ids if not self._tokenizer.is_special(i)]

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Feed newly generated ids; returns the text they complete (possibly "")."""
        if len(new_token_ids) == 1:  # the usual delta: one token, without the list copies
            if self._skip_special and self._tokenizer.is_special(new_token_ids[0]):
                return ""
            kept = list(new_token_ids)
        else:
            kept = self._keep(list(new_token_ids))
            if not kept:
                return ""
        if self._utf8 is not None:
            bytes_of = self._tokenizer.token_bytes  # type: ignore[attr-defined]
            delta = self._utf8.decode(bytes_of(kept[0]) if len(kept) == 1 else b"".join(map(bytes_of, kept)))
            self.text += delta
            return delta
        tokens = self._tokens
        new_tokens = self._tokenizer.convert_ids_to_tokens(kept)
        to_string = self._tokenizer.convert_tokens_to_string
        pieces: list[str] = []
        for token in new_tokens:
            tokens.append(token)
            prefix_text = to_string(tokens[self._prefix_offset : self._read_offset])
            new_text = to_string(tokens[self._prefix_offset :])
            if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
                continue  # nothing new yet, or a multi-byte character still incomplete
            pieces.append(new_text[len(prefix_text) :])
            self._prefix_offset = self._read_offset
            self._read_offset = len(tokens)
            if self._prefix_offset >= _TRIM_AT:
                del tokens[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
        delta = pieces[0] if len(pieces) == 1 else "".join(pieces)
        self.text += delta
        return delta


def _byte_level(tokenizer: DetokenizerTokenizer) -> bool:
    return bool(getattr(tokenizer, "byte_level", False))


class StopChecker:
    """Feed text deltas; get back the text that is safe to emit and the stop string that hit.

    Without `include_stop_str_in_output`, the longest tail (at most `max(len(stop)) - 1` characters)
    that could be the start of a stop string is held back; the output is cut right before the first
    stop string found. With it, nothing is held back and the output ends right after the stop
    string. After a hit the checker swallows everything.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        longest = max((len(s) for s in self.stop), default=0)
        self._hold = 0 if include_stop_str_in_output else max(longest - 1, 0)
        # Keep enough already-emitted text to find a stop string that straddles deltas.
        self._lookback = max(longest - 1, 0)
        self._pending = ""  # held back, not yet emitted
        self._tail = ""  # last emitted characters (only used with include_stop_str_in_output)
        self.hit: str | None = None

    def add(self, delta: str) -> tuple[str, str | None]:
        """Returns (text to emit now, the stop string if one hit in this delta else None)."""
        if self.hit is not None:
            return "", None
        if not self.stop:
            return delta, None
        window = self._tail + self._pending + delta
        start = len(self._tail)  # window[:start] is already emitted
        found = self._find(window)
        if found is not None:
            pos, stop_str = found
            self.hit = stop_str
            end = pos + len(stop_str) if self.include_stop_str_in_output else pos
            self._pending = ""
            return window[start:end], stop_str
        text = window[start:]
        cut = len(text) - self._partial_match(text)
        emit, self._pending = text[:cut], text[cut:]
        if self.include_stop_str_in_output and self._lookback:
            self._tail = (self._tail + emit)[-self._lookback :]
        return emit, None

    def add_token_by_token(
        self, detokenizer: IncrementalDetokenizer, ids: Sequence[int]
    ) -> tuple[str, str | None, int]:
        """Several tokens of one output (a speculative step's accepted drafts, or outputs
        coalesced on the way) fed one at a time, so that a stop string ending in token i leaves
        the tokens after it out of the count and the log-probs, as if they had come one by one.
        Returns (text to emit, the stop string hit or None, tokens used)."""
        pieces: list[str] = []
        for i, token in enumerate(ids):
            text, hit = self.add(detokenizer.add([token]))
            pieces.append(text)
            if hit is not None:
                return "".join(pieces), hit, i + 1
        return "".join(pieces), None, len(ids)

    def _find(self, window: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            pos = window.find(stop_str)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop_str)
        return best

    def _partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, once the sequence has finished without hitting a stop string."""
        if self.hit is not None:
            return ""
        text, self._pending = self._pending, ""
        return text
