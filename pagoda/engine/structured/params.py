"""What a request constrains its output to: vLLM's `StructuredOutputsParams`, exactly one of a
JSON schema, any JSON object, a regex, a list of choices, a grammar (Lark or GBNF) or structural
tags. Torch-free, hashable (the worker caches grammars by it), and checked for shape here; whether
the schema, regex or grammar itself is valid is grammar.py's check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Kind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
KINDS: tuple[Kind, ...] = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True, init=False)
class StructuredOutputsParams:
    """Exactly one constraint. `json` takes a schema (a dict or its JSON text), `choice` a list of
    strings, `grammar` Lark or GBNF text, `structural_tag` vLLM's structural-tag JSON
    ({"structures": [{"begin", "schema", "end"}], "triggers": [...]})."""

    KINDS: ClassVar[tuple[Kind, ...]] = KINDS  # the keyword arguments, one of which is given

    kind: Kind
    spec: str  # JSON text for json, choice and structural_tag; the text itself otherwise

    def __init__(
        self,
        json: str | dict[str, Any] | None = None,
        regex: str | None = None,
        choice: list[str] | tuple[str, ...] | None = None,
        grammar: str | None = None,
        json_object: bool | None = None,
        structural_tag: str | dict[str, Any] | None = None,
    ) -> None:
        given = {
            "json": json,
            "json_object": json_object or None,
            "regex": regex,
            "choice": choice,
            "grammar": grammar,
            "structural_tag": structural_tag,
        }
        chosen = [k for k, v in given.items() if v is not None]
        if len(chosen) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, regex, choice, grammar or "
                f"structural_tag; got {', '.join(chosen) or 'none'}"
            )
        kind: Kind = chosen[0]  # type: ignore[assignment]
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "spec", _spec(kind, given[kind]))

    @classmethod
    def from_wire(cls, wire: dict[str, str]) -> StructuredOutputsParams:
        """From what `to_wire` gives: {"kind", "spec"}."""
        kind, spec = wire.get("kind"), wire.get("spec", "")
        if kind not in KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}")
        value: Any = True if kind == "json_object" else spec
        if kind == "choice":
            value = _loads(spec, "choice")
        return cls(**{kind: value})

    def to_wire(self) -> dict[str, str]:
        return {"kind": self.kind, "spec": self.spec}


def _spec(kind: Kind, value: Any) -> str:
    if kind == "json_object":
        return ""
    if kind in ("json", "structural_tag"):
        if isinstance(value, str):
            value = _loads(value, kind)
        if not isinstance(value, dict):
            raise ValueError(f"{kind} must be a JSON object, got {type(value).__name__}")
        return json.dumps(value, separators=(",", ":"))  # key order kept: properties come in it
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("choice must be a non-empty list of strings")
        return json.dumps(list(value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    return value


def _loads(text: str, kind: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{kind} is not valid JSON: {err}") from None
