"""Request sets for `pagoda bench serve`: random, multi-turn and local ShareGPT files.

A data set is a list of conversations; a conversation is a tuple of turns that the benchmark
sends in order (one turn for random and ShareGPT, T turns for multi-turn). Lengths are counted
in words times `tokens_per_word`, which the benchmark may calibrate with the server's /tokenize;
nothing here loads a tokenizer or downloads anything.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Short, common English words: one token each (with a leading space) in the usual BPE vocabularies.
_WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has "
    "look two more write go see number no way could people my than first water been call who oil its "
    "now find long down day did get come made may part over new sound take only little work know place "
    "year live me back give most very after thing our just name good sentence man think say great where "
    "help through much before line right too mean old any same tell boy follow came want show also "
    "around form three small set put end does another well large must big even such because turn here "
    "why ask went men read need land different home us move try kind hand picture again change off play "
    "spell air away animal house point page letter mother answer found study still learn should world"
).split()

ChatTurn = dict[str, str]


@dataclass(frozen=True)
class BenchTurn:
    """One request: the chat messages to send, and its expected prompt and output lengths."""

    messages: tuple[ChatTurn, ...]
    input_len: int  # estimated prompt tokens (usage.prompt_tokens replaces it when the server reports it)
    output_len: int  # max_tokens to request

    def prompt(self) -> str:
        """The same text for /v1/completions: message contents joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages)


Conversation = tuple[BenchTurn, ...]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_prompts: int
    input_len: int = 256
    output_len: int | None = None  # None: 128 (random, multi-turn) or the reply's length (sharegpt)
    seed: int = 0
    tokens_per_word: float = 1.0
    num_turns: int = 4  # multi-turn: turns per conversation
    system_len: int = 1024  # multi-turn: tokens of the shared system prompt
    sharegpt_path: str | None = None


def sample_text(num_words: int = 200) -> str:
    """A fixed text from the word list, for calibrating tokens per word against a server."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(num_words))


def _words(rng: random.Random, num_tokens: int, tokens_per_word: float) -> str:
    n = max(1, round(num_tokens / tokens_per_word))
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _approx_tokens(text: str, tokens_per_word: float) -> int:
    return max(1, round(len(text.split()) * tokens_per_word))


def random_dataset(spec: DatasetSpec) -> list[Conversation]:
    """num_prompts independent prompts of about input_len tokens, each different from its first words."""
    rng = random.Random(spec.seed)
    out_len = spec.output_len or 128
    convs: list[Conversation] = []
    for _ in range(spec.num_prompts):
        text = _words(rng, spec.input_len, spec.tokens_per_word)
        convs.append((BenchTurn(({"role": "user", "content": text},), spec.input_len, out_len),))
    return convs


def multi_turn_dataset(spec: DatasetSpec) -> list[Conversation]:
    """ceil(num_prompts / num_turns) conversations of num_turns turns, all under one long system prompt.

    Turn k sends the system prompt, turns 1..k-1 (user message and a fixed assistant reply of about
    output_len tokens) and a new user message of about input_len tokens, so each turn's messages
    extend the previous turn's: the shape prefix caching is meant to serve.
    """
    rng = random.Random(spec.seed)
    out_len = spec.output_len or 128
    tpw = spec.tokens_per_word
    system: ChatTurn = {"role": "system", "content": _words(rng, spec.system_len, tpw)}
    num_convs = -(-spec.num_prompts // spec.num_turns)
    convs: list[Conversation] = []
    for _ in range(num_convs):
        history: list[ChatTurn] = [system]
        input_len = spec.system_len
        turns = []
        for _ in range(spec.num_turns):
            history.append({"role": "user", "content": _words(rng, spec.input_len, tpw)})
            input_len += spec.input_len
            turns.append(BenchTurn(tuple(history), input_len, out_len))
            history.append({"role": "assistant", "content": _words(rng, out_len, tpw)})
            input_len += out_len
        convs.append(tuple(turns))
    return convs


_NAMES = (
    "alpha",
    "bravo",
    "count",
    "delta",
    "echo",
    "fetch",
    "gamma",
    "hotel",
    "index",
    "jolly",
    "kilo",
    "lima",
)
_CODE_CHARS_PER_TOKEN = 3.0  # identifiers, operators and indentation: shorter than words


def _function(rng: random.Random) -> str:
    name, part, arg = rng.sample(_NAMES, 3)
    k, op = rng.randint(2, 9), rng.choice("+-*")
    return (
        f"def {name}_{part}({arg}):\n    total = 0\n    for item in {arg}:\n"
        f"        total += item {op} {k}\n    return total\n"
    )


def code_edit_dataset(spec: DatasetSpec) -> list[Conversation]:
    """num_prompts code-editing requests: about input_len tokens of Python functions and the
    instruction to rewrite them with docstrings, so most of the answer copies the prompt (where
    speculative decoding by prompt lookup pays)."""
    rng = random.Random(spec.seed)
    out_len = spec.output_len or 128
    convs: list[Conversation] = []
    for _ in range(spec.num_prompts):
        code = _function(rng)
        while len(code) / _CODE_CHARS_PER_TOKEN < spec.input_len:
            code += "\n" + _function(rng)
        text = f"Here is some Python code:\n\n{code}\nRewrite this code, adding a docstring to each function."
        n = round(len(text) / _CODE_CHARS_PER_TOKEN)
        convs.append((BenchTurn(({"role": "user", "content": text},), n, out_len),))
    return convs


_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant", "chatgpt", "bard", "model")


def sharegpt_dataset(spec: DatasetSpec) -> list[Conversation]:
    """First human turn of each conversation in a local ShareGPT JSON file, shuffled with the seed.

    output_len defaults to the length of the reply that follows. Conversations without a human turn
    followed by a reply are skipped; fewer than num_prompts usable ones give a shorter list.
    """
    if not spec.sharegpt_path:
        raise ValueError("--dataset sharegpt needs --sharegpt-path FILE (a local ShareGPT JSON file)")
    path = Path(spec.sharegpt_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read ShareGPT file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path} must hold a JSON list of conversations")
    pairs: list[tuple[str, str]] = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for first, second in itertools.pairwise(turns):
            if not (isinstance(first, dict) and isinstance(second, dict)):
                break
            if first.get("from") in _HUMAN and second.get("from") in _GPT:
                prompt, reply = str(first.get("value", "")), str(second.get("value", ""))
                if prompt.strip() and reply.strip():
                    pairs.append((prompt, reply))
                break
    random.Random(spec.seed).shuffle(pairs)
    tpw = spec.tokens_per_word
    return [
        (
            BenchTurn(
                ({"role": "user", "content": prompt},),
                _approx_tokens(prompt, tpw),
                spec.output_len or _approx_tokens(reply, tpw),
            ),
        )
        for prompt, reply in pairs[: spec.num_prompts]
    ]


DATASETS: dict[str, Callable[[DatasetSpec], list[Conversation]]] = {
    "random": random_dataset,
    "multi-turn": multi_turn_dataset,
    "sharegpt": sharegpt_dataset,
    "code-edit": code_edit_dataset,
}


def load_dataset(spec: DatasetSpec) -> list[Conversation]:
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; choose one of {', '.join(DATASETS)}")
    if spec.num_prompts < 1 or spec.input_len < 1 or spec.num_turns < 1:
        raise ValueError(
            f"--num-prompts ({spec.num_prompts}), --input-len ({spec.input_len}) and --num-turns "
            f"({spec.num_turns}) must each be at least 1"
        )
    if spec.output_len is not None and spec.output_len < 1:
        raise ValueError(f"--output-len {spec.output_len} must be at least 1")
    return DATASETS[spec.name](spec)
