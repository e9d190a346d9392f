"""The tokenizer: text <-> token ids, plus the model's chat template.

Built on the `tokenizers` library (never `transformers`), from either a GGUF file's metadata
(byte-level or SentencePiece BPE, rebuilt by `gguf_vocab.py`) or a Hugging Face directory
(tokenizer.json + tokenizer_config.json + generation_config.json). Chat templates render in a
sandboxed jinja2 environment configured like Hugging Face's, so a template written for
`transformers` renders the same string here.
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
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, processors

from pagoda.engine.tokenization.gguf_vocab import default_add_bos, gguf_backend

if TYPE_CHECKING:
    from pagoda.engine.loader.gguf_file import GgufFile


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
        self._decoder = backend.decoder  # read once (each read of the property builds a new wrapper)
        # byte-level BPE: each token stands for fixed bytes (GPT-2's byte-to-character table)
        self._byte_chars = _byte_chars() if isinstance(self._decoder, decoders.ByteLevel) else None
        self._bytes: dict[int, bytes] = {}
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
        decoder = self._decoder
        if decoder is None:
            return "".join(tokens)
        return str(decoder.decode(tokens if isinstance(tokens, list) else list(tokens)))

    @property
    def byte_level(self) -> bool:
        """Whether `token_bytes` gives each token's bytes (a byte-level BPE vocabulary)."""
        return self._byte_chars is not None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token of a byte-level vocabulary stands for (an added token's characters
        outside the byte table as UTF-8, as the ByteLevel decoder reads them): a sequence's text
        is its tokens' bytes joined, read as UTF-8, so streamed text needs no window decodes."""
        data = self._bytes.get(token_id)
        if data is None:
            table = self._byte_chars
            assert table is not None, "token_bytes of a vocabulary that is not byte-level"
            piece = self.backend.id_to_token(token_id) or ""
            data = b"".join(bytes((table[c],)) if c in table else c.encode() for c in piece)
            self._bytes[token_id] = data
        return data

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
        backend = gguf_backend(meta)  # ModelLoadError for a tokenizer model pagoda cannot build
        tokens: list[str] = meta.get("tokenizer.ggml.tokens")

        def token(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        model = meta.get("tokenizer.ggml.model")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos(model))) and bos is not None
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


def _set_template_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """Make `encode(..., add_special_tokens=True)` add `bos` before and/or `eos` after the text."""
    if bos is None and eos is None:
        return  # the backend's own post-processor (byte-level offsets, or none) adds nothing
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


@lru_cache(maxsize=1)
def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character standing for each byte. Printable
    Latin-1 bytes stand for themselves; the other 68 take the code points from 256 up, in order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    chars = {chr(b): b for b in kept}
    chars.update({chr(256 + n): b for n, b in enumerate(moved)})
    return chars
