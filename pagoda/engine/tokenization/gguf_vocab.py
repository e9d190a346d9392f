"""A `tokenizers` backend rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json, only the vocabulary and llama.cpp's description of it. Two of
llama.cpp's tokenizer models are rebuilt here, each so it encodes and decodes like `transformers`
loading the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`):

- `gpt2`: byte-level BPE (SmolLM, Qwen, Llama 3...): GPT-2's byte alphabet, the file's merges, and
  the split regex its `tokenizer.ggml.pre` names.
- `llama`: SentencePiece BPE (Llama 2, Mistral, TinyLlama...): spaces spelled `▁`, a `▁` prepended
  to the text (`tokenizer.ggml.add_space_prefix`), characters outside the vocabulary spelled as
  byte tokens `<0x0A>`, and merges ranked by the score of the piece they make, the order in which
  SentencePiece merges (the file lists none).

Tokens the file marks control or unknown (`<s>`, `</s>`, `<unk>`) become special added tokens, and
user-defined ones plain added tokens, so text containing them keeps them whole.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from pagoda.engine.loader import ModelLoadError

if TYPE_CHECKING:
    from pagoda.engine.loader.gguf_file import GgufFile

# llama.cpp's token types (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's spelling of " "

# Split regexes for llama.cpp's `tokenizer.ggml.pre` values (each a copy of its model's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# plain GPT-2 byte-level splitting (+ individual digits where the model was trained that way)
_GPT2_PRE = ("default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo", "", None)
_DIGIT_PRE = ("smollm", "starcoder", "refact")
SUPPORTED_MODELS = ("gpt2", "llama")


def gguf_backend(meta: GgufFile) -> Backend:
    """The backend `meta` describes, without a post-processor (bos/eos are the caller's).
    Raises ModelLoadError naming the tokenizer model or pre-tokenizer pagoda cannot build."""
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if model not in SUPPORTED_MODELS:
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported (pagoda builds 'gpt2' byte-level BPE and "
            "'llama' SentencePiece BPE tokenizers from GGUF); load the model from its Hugging Face "
            "directory instead"
        )
    if not tokens:
        raise ModelLoadError("the GGUF file carries no tokenizer.ggml.tokens; it cannot be tokenized")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if model == "gpt2":
        backend = _byte_level_bpe(tokens, types, merges, meta.get("tokenizer.ggml.pre"))
    else:
        scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_bpe(tokens, types, scores, merges, add_prefix)
    _add_marked_tokens(backend, tokens, types, byte_level=model == "gpt2")
    return backend


def default_add_bos(model: str | None) -> bool:
    """Whether a file that states no `tokenizer.ggml.add_bos_token` gets BOS: llama.cpp (and
    transformers) add it for SentencePiece vocabularies, which were all trained behind one."""
    return model == "llama"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> Backend:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (CONTROL, USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))  # mislabelled raw text
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for a, b in pairs],
        ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"),
    )
    backend = Backend(bpe)
    if pre in _SPLIT_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if pre in ("qwen2", "deepseek-r1-qwen"):
            backend.normalizer = normalizers.NFC()
    elif pre in _GPT2_PRE:
        steps: list[pre_tokenizers.PreTokenizer] = []
        if pre in _DIGIT_PRE:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    else:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: "
            f"{', '.join(sorted(str(p) for p in set(_SPLIT_BY_PRE) | set(_GPT2_PRE) if p))}"
        )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece_bpe(
    tokens: list[str], types: list[int], scores: list[float], merges: list[str], add_prefix: bool
) -> Backend:
    """SentencePiece BPE as `tokenizers` spells it: the text is one word (no splitting: pieces never
    hold an inner `▁` except whitespace runs), `▁` for spaces and, with `add_prefix`, before the text;
    unknown characters as their UTF-8 byte tokens (runs of `<unk>` fused where bytes are missing).

    Like transformers, `▁` is prepended only at the start of the text, not after a special token,
    and not to text that already starts with a space (" hi" -> `▁hi`, where SentencePiece and
    llama.cpp give `▁▁hi`). Unlike transformers 5, which ignores it, `add_space_prefix` false is
    honoured (nothing prepended, as SentencePiece and llama.cpp do).
    """
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges] or _merges_from_scores(tokens, types, scores, vocab)
    unk = next((tok for tok, kind in zip(tokens, types, strict=True) if kind == UNKNOWN), None)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for a, b in pairs],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # the prepended space is not part of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies, best first.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring normal piece; `tokenizers` merges the pair ranked first in its list. Ranking
    every split (left, right) of every normal piece by that piece's score gives the same order. The
    splits of one piece tie in SentencePiece; like transformers we put a longer left part first (then
    a longer right part, then the earlier piece: files whose scores tie keep transformers' order).
    """
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for i, (tok, kind, score) in enumerate(zip(tokens, types, scores, strict=True)):
        if kind != NORMAL or vocab[tok] != i:
            continue  # control, byte and user-defined pieces are never made by merging
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), i, left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(left, right) for *_, left, right in ranked]


def _add_marked_tokens(backend: Backend, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens (and SentencePiece's `<unk>`, which transformers counts special too) as special
    added tokens, user-defined ones as plain added tokens: both are matched whole in the text
    before the model splits it."""
    special = {CONTROL} if byte_level else {CONTROL, UNKNOWN}
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in special
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
