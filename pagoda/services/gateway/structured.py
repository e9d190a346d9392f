"""A request's structured-output constraint: OpenAI's `response_format` (json_object,
json_schema), vLLM's `structured_outputs` (json, json_object, regex, choice, grammar,
structural_tag) or its older `guided_*` fields, as one StructuredOutputsParams. Mistakes are 400s
that name the field: a shape or schema problem here (jsonschema), one only llguidance sees with the
model's tokenizer (a regex or grammar it cannot take) in `check`, off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from pagoda.engine import StructuredOutputsParams, Tokenizer, check_structured_outputs
from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.services.transport.errors import bad_request

_GUIDED = {  # vLLM's older fields
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# structured_outputs options that ask for what pagoda does anyway (compact JSON, no fallback)
_HONOURED = {"disable_any_whitespace": (None, True), "disable_fallback": (None, True, False)}


def structured_outputs_of(
    req: ChatCompletionRequest | CompletionRequest,
) -> tuple[StructuredOutputsParams, str] | None:
    """(the constraint, the field that asked for it), or None for free text."""
    asked = []
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        asked.append((_from_response_format(fmt), "response_format"))
    if req.structured_outputs is not None:
        asked.append((_from_vllm(req.structured_outputs, "structured_outputs"), "structured_outputs"))
    guided = [name for name in _GUIDED if getattr(req, name) is not None]
    if guided:
        kinds = {_GUIDED[name]: getattr(req, name) for name in guided}
        asked.append((_from_vllm(kinds, guided[0]), guided[0]))
    if len(asked) > 1:
        names = " and ".join(field for _, field in asked)
        raise bad_request(f"give one structured output constraint; this request sets {names}.", asked[1][1])
    return asked[0] if asked else None


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format json_schema needs a json_schema object.", "response_format")
        schema = spec.get("schema", {})
        _check_schema(schema, "response_format.json_schema.schema")
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":
        return _params({"structural_tag": fmt}, "response_format")
    raise bad_request(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema or structural_tag).",
        "response_format",
    )


def _from_vllm(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    for key, value in fields.items():
        if key not in StructuredOutputsParams.KINDS and value not in _HONOURED.get(key, (None,)):
            raise bad_request(f"{param}.{key} {value!r} is not supported.", f"{param}.{key}")
    given = {k: v for k, v in fields.items() if v is not None and v is not False}
    kinds: dict[str, Any] = {k: v for k, v in given.items() if k in StructuredOutputsParams.KINDS}
    if "json" in kinds and isinstance(kinds["json"], dict):
        _check_schema(kinds["json"], f"{param}.json")
    return _params(kinds, param)


def _params(kinds: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kinds)
    except ValueError as err:
        raise bad_request(f"{param}: {err}.", param) from None


def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON Schema object.", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise bad_request(f"{param} is not a valid JSON Schema: {err.message}.", param) from None


async def check(so: StructuredOutputsParams, param: str, tokenizer: Tokenizer) -> None:
    """400 naming `param` when llguidance cannot constrain this model's output to `so`."""
    try:
        await asyncio.to_thread(check_structured_outputs, so, tokenizer)
    except ValueError as err:
        raise bad_request(f"{param}: {err}", param) from None
