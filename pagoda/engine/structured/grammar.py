"""Structured outputs as llguidance grammars, and the check a request passes before it reaches a
worker. Torch-free: the gateway runs `check_structured_outputs` with the model's tokenizer, so a
schema, regex or grammar llguidance cannot take is a 400 there, never a worker's error.

JSON is compact (", " and ": " between items, no other whitespace): a model cannot spend its
max_tokens on whitespace, and a valid answer is as short as it can be.
"""

from __future__ import annotations

import functools
import json
import weakref
from typing import TYPE_CHECKING, Any

from llguidance import LLMatcher, LLTokenizer, StructTag
from llguidance.gbnf_to_lark import any_to_lark

from pagoda.engine.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagoda.engine.tokenization.tokenizer import Tokenizer

JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type": "object"}'

_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, LLTokenizer]] = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=256)
def grammar_of(so: StructuredOutputsParams) -> str:
    """The llguidance grammar for `so`; ValueError naming the problem where it has one that
    shows without a tokenizer (a bad regex, schema type or grammar rule). Memoized: the gateway's
    check, the engine's check as a request arrives and its compile ask for the same one."""
    try:
        grammar = _grammar(so)
    except Exception as err:  # the converters raise bare Exceptions and asserts about the input
        raise ValueError(f"invalid {so.kind}: {err}") from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"invalid {so.kind}: {problem}")
    return grammar


def _grammar(so: StructuredOutputsParams) -> str:
    if so.kind in ("json", "json_object"):
        schema = so.spec if so.kind == "json" else ANY_OBJECT
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(so.spec)))
    if so.kind == "grammar":
        return LLMatcher.grammar_from_lark(any_to_lark(so.spec))
    return _structural_tag(json.loads(so.spec))


def _structural_tag(spec: dict[str, Any]) -> str:
    """vLLM's structural tags: free text in which each `begin` (which starts with one of the
    `triggers`) is followed by JSON of its `schema` and then `end`."""
    triggers = spec.get("triggers")
    structures = spec.get("structures")
    if not isinstance(triggers, list) or not triggers or not isinstance(structures, list) or not structures:
        raise ValueError("a structural tag needs non-empty 'structures' and 'triggers' lists")
    tags = []
    for s in structures:
        begin = s.get("begin", "")
        trigger = next((t for t in triggers if isinstance(t, str) and t and begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structure begin {begin!r} starts with none of the triggers {triggers}")
        schema, end = s.get("schema", {}), s.get("end", "")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=schema, end=end))
    lark = StructTag.to_grammar(tags)
    return lark if lark.startswith("{") else LLMatcher.grammar_from_lark(lark)


def lltokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> LLTokenizer:
    """llguidance's view of `tokenizer` with `vocab_size` tokens (the model's logits may have
    more than the tokenizer), built once per tokenizer and size (~0.4 s for a 49k vocabulary)."""
    size = vocab_size or tokenizer.vocab_size
    per_size = _tokenizers.setdefault(tokenizer, {})
    if size not in per_size:
        eos = list(tokenizer.eos_token_ids) or None
        per_size[size] = LLTokenizer(tokenizer.backend.to_str(), n_vocab=size, eos_token=eos)
    return per_size[size]


def check_structured_outputs(so: StructuredOutputsParams, tokenizer: Tokenizer) -> None:
    """ValueError naming the problem when `so` cannot constrain this tokenizer's output."""
    grammar = grammar_of(so)
    problem = LLMatcher.validate_grammar(grammar, lltokenizer(tokenizer))
    if problem:
        raise ValueError(f"invalid {so.kind}: {problem}")
