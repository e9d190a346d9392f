"""`--speculative-config`: vLLM's JSON keys, parsed once into a frozen, validated dataclass.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "path/or/hf-id", "num_speculative_tokens": 3}

Defaults follow vLLM's SpeculativeConfig: n-gram lookup sizes both 5 when neither is given, the
missing one equal to the other when one is; `"model": "ngram"` (or `"[ngram]"`) with no method
means n-gram; a model with no method means a draft model; `disable_by_batch_size` must be >= 2.
`adaptive` (pagoda's own key, default true) lets the adaptive policy choose each sequence's drafts;
false proposes up to k every step, as vLLM does.
Unlike vLLM, `num_speculative_tokens` is always required (pagoda does not read it from a draft
checkpoint), and keys vLLM accepts but pagoda does not read are refused by name rather than ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

SpecMethod = Literal["ngram", "draft_model", "layer_skip"]
METHODS: tuple[str, ...] = ("ngram", "draft_model", "layer_skip")
# pagoda's self-speculation: the target's own first layers as the draft (not implemented yet)
SELF_SPECULATION_METHOD = "layer_skip"
_NGRAM_ALIASES = ("ngram", "[ngram]")
_DEFAULT_LOOKUP = 5  # vLLM's default for both prompt_lookup_min and prompt_lookup_max


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine speculates; built by `parse` (or the constructor, which validates too).

    method: "ngram" (prompt lookup, no model), "draft_model" (a smaller model of the same
      tokenizer, `model`) or "layer_skip" (pagoda's self-speculation: the target's first layers
      as the draft; parsed, not implemented yet).
    num_speculative_tokens: k, the most tokens proposed per sequence and step.
    prompt_lookup_min / prompt_lookup_max: the n-gram sizes tried, longest first (ngram only).
    model: the draft checkpoint (draft_model only).
    disable_by_batch_size: no speculation in a step with more running sequences than this
      (None: never turned off by batch size).
    adaptive: whether each sequence gets only the drafts that pay (`adaptive.AdaptivePolicy`);
      False: up to k drafts every step, as vLLM proposes.
    """

    method: SpecMethod
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, minimum=1)
        if self.disable_by_batch_size is not None:
            _check_int("disable_by_batch_size", self.disable_by_batch_size, minimum=2)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {self.adaptive!r}")
        if self.method == "ngram":
            self._check_ngram()
        else:
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to method 'ngram' only, not {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("method 'draft_model' needs \"model\": the draft checkpoint's path or id")
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f'"model" names a draft checkpoint; method {self.method!r} takes none')

    def _check_ngram(self) -> None:
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None or hi is None:
            raise ValueError("method 'ngram' needs prompt_lookup_min and prompt_lookup_max (use parse)")
        _check_int("prompt_lookup_min", lo, minimum=1)
        _check_int("prompt_lookup_max", hi, minimum=1)
        if lo > hi:
            raise ValueError(f"prompt_lookup_min {lo} must be <= prompt_lookup_max {hi}")

    @property
    def lookup_sizes(self) -> tuple[int, int]:
        """(prompt_lookup_min, prompt_lookup_max) of an n-gram config."""
        assert self.prompt_lookup_min is not None and self.prompt_lookup_max is not None, self
        return self.prompt_lookup_min, self.prompt_lookup_max

    def enabled_for(self, num_running: int) -> bool:
        """Whether a step with `num_running` sequences speculates (disable_by_batch_size)."""
        return self.disable_by_batch_size is None or num_running <= self.disable_by_batch_size

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any]) -> SpeculativeConfig:
        """The config from `--speculative-config`'s JSON text (or its decoded object), with vLLM's
        defaults filled in. Raises ValueError naming the key that is wrong."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(spec, Mapping):
            raise ValueError(f"--speculative-config must be a JSON object, got {type(spec).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in spec if k not in known)
        if unknown:
            raise ValueError(
                f"--speculative-config: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"pagoda reads {', '.join(known)}"
            )
        values = dict(spec)
        for name in ("method", "model"):
            if values.get(name) is not None and not isinstance(values[name], str):
                raise ValueError(f"{name} must be a string, got {values[name]!r}")
        if "num_speculative_tokens" not in values or values["num_speculative_tokens"] is None:
            raise ValueError("--speculative-config needs num_speculative_tokens (k, e.g. 4)")
        values["method"] = _method(values.get("method"), values.get("model"))
        if values["method"] == "ngram":
            if values.get("model") in _NGRAM_ALIASES:
                values["model"] = None
            lo, hi = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
            if lo is None and hi is None:
                lo = hi = _DEFAULT_LOOKUP
            values["prompt_lookup_min"] = hi if lo is None else lo
            values["prompt_lookup_max"] = lo if hi is None else hi
        return cls(**values)


def _method(method: str | None, model: str | None) -> SpecMethod:
    """vLLM's method resolution: "[ngram]" is "ngram"; no method with model "ngram" is n-gram, with
    another model a draft model."""
    if method is None:
        if model is None:
            raise ValueError(f'--speculative-config needs "method" (one of {", ".join(METHODS)})')
        method = "ngram" if model in _NGRAM_ALIASES else "draft_model"
    if method in _NGRAM_ALIASES:
        method = "ngram"
    if method not in METHODS:
        raise ValueError(f"speculative method {method!r} is not one of {', '.join(METHODS)}")
    return cast(SpecMethod, method)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
