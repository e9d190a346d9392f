"""The tokenizer: text <-> token ids, plus the model's chat template.

Built on the `tokenizers` library (never `transformers`), from either a GGUF file's metadata or a
Hugging Face directory (tokenizer.json + tokenizer_config.json + generation_config.json). Chat
templates render in a sandboxed jinja2 environment configured like Hugging Face's, so a template
written for `transformers` renders the same string here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

if TYPE_CHECKING:
    from pagoda.engine.loader.gguf_file import GgufFile

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

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


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with the special-token facts and chat template of one model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token is not None else None
        eos = list(eos_token_ids)
        if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
            eos.insert(0, eos_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos_token: bool = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join tokens into text (byte-level pieces become UTF-8); for incremental detokenization."""
        decoder = self.backend.decoder
        if decoder is None:
            return "".join(tokens)
        return str(decoder.decode(list(tokens)))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` as the model's prompt text (extra kwargs, e.g. `tools`, go to the template)."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template (none in its GGUF metadata or tokenizer_config.json); "
                "use the completions API with a plain prompt, or use a chat/instruct model"
            )
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    # -- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, the Hugging Face layout `from_hf_dir` reads."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, file_or_path: GgufFile | str | Path) -> Tokenizer:
        from pagoda.engine.loader.gguf_file import GgufFile

        meta = file_or_path if isinstance(file_or_path, GgufFile) else GgufFile(file_or_path)
        model_type = meta.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {model_type!r} is not supported (pagoda builds byte-level BPE "
                "'gpt2' tokenizers from GGUF); load the model from its Hugging Face directory instead"
            )
        tokens: list[str] = meta.get("tokenizer.ggml.tokens")
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges: list[str] = meta.get("tokenizer.ggml.merges") or []
        pre = meta.get("tokenizer.ggml.pre")
        backend = _byte_level_bpe(tokens, types, merges, pre)

        def token(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        _set_template_processor(backend, bos if add_bos else None, eos if add_eos else None)
        extra_eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=[int(i) for i in extra_eos if i is not None],
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(
                f"{root} has no tokenizer.json; pagoda needs the fast-tokenizer file "
                "(save one with transformers' tokenizer.save_pretrained)"
            )
        backend = _Backend.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json")
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        if config.get("add_bos_token") and bos is not None:
            ids = backend.encode("a", add_special_tokens=True).ids
            if ids[:1] != [backend.token_to_id(bos)]:
                add_eos = eos if config.get("add_eos_token") else None
                _set_template_processor(backend, bos, add_eos)
        eos_ids: list[int] = []
        for source in (_read_json(root / "generation_config.json"), _read_json(root / "config.json")):
            value = source.get("eos_token_id")
            if value is not None:
                eos_ids += [int(v) for v in (value if isinstance(value, list) else [value])]
                break
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=eos_ids,
            chat_template=_hf_chat_template(root, config),
        )


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
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


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> _Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))  # mislabelled raw text
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for a, b in pairs],
        ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"),
    )
    backend = _Backend(bpe)
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
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: "
            f"{', '.join(sorted(str(p) for p in set(_SPLIT_BY_PRE) | set(_GPT2_PRE) if p))}"
        )
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind == _CONTROL
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    return backend


def _set_template_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """Make `encode(..., add_special_tokens=True)` add `bos` before and/or `eos` after the text."""
    if bos is None and eos is None:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return
    pre = f"{bos}:0 " if bos else ""
    post = f" {eos}:0" if eos else ""
    pre_b = f" {bos}:1" if bos else ""
    post_b = f" {eos}:1" if eos else ""
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{pre}$A:0{post}",
        pair=f"{pre}$A:0{post}{pre_b} $B:1{post_b}",
        special_tokens=list(dict.fromkeys(specials)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return value if isinstance(value, str) else None


def _hf_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's override: no HTML escaping, and indent/separators exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
