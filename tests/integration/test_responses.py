"""The Responses API through the official openai SDK, unchanged, on both stacks: create and
stream (the streamed deltas are the final response's text, greedy answers equal whole or
streamed), `parse` with a JSON schema, a function-tool round trip continued with
previous_response_id (the same answer as sending the whole conversation), GET and DELETE, and
the refusals; in the cluster the stored response is in Redis with its TTL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER}
]


def uncached() -> dict[str, Any]:
    """A fresh cache_salt: greedy answers compared across requests must not differ by whether
    their prompt was a prefix-cache hit (a cached prefix can flip a near tie on the CPU)."""
    return {"extra_body": {"cache_salt": uuid.uuid4().hex}}


class Pet(BaseModel):
    name: str = Field(min_length=1, max_length=16)
    species: str = Field(pattern="^(cat|dog|bird)$")
    age: int = Field(ge=0, le=30)


def test_create_stream_and_parse(sdk: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "input": "Say hello to Ann.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    whole = sdk.responses.create(**ask, **uncached())
    assert whole.output_text and whole.usage is not None and 0 < whole.usage.output_tokens <= 12
    with sdk.responses.stream(**ask, **uncached()) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text  # greedy: whole and streamed agree
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.id == events[0].response.id and final.status == whole.status
    parsed = sdk.responses.parse(
        model=MODEL,
        input="Describe a pet as JSON.",
        text_format=Pet,
        max_output_tokens=96,
        temperature=1.0,
        extra_body={"seed": 4},  # pagoda's (and vLLM's) extra field
    )
    assert isinstance(parsed.output_parsed, Pet) and parsed.status == "completed", parsed
    jsonschema.validate(json.loads(parsed.output_text), Pet.model_json_schema())


def test_tool_round_trip_with_previous_response_id(sdk: openai.OpenAI) -> None:
    ask = "What is the weather in Paris?"
    first = sdk.responses.create(
        model=MODEL,
        input=ask,
        tools=TOOLS,
        tool_choice="required",
        max_output_tokens=128,
        extra_body={"seed": 1},
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id, first.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    result: Any = {
        "type": "function_call_output",
        "call_id": calls[0].call_id,
        "output": json.dumps({"temp": 18}),
    }
    after: dict[str, Any] = {"tools": TOOLS, "tool_choice": "none", "max_output_tokens": 16, "temperature": 0}
    second = sdk.responses.create(
        model=MODEL, previous_response_id=first.id, input=[result], **after, **uncached()
    )
    assert second.output_text and not [o for o in second.output if o.type == "function_call"]
    assert second.previous_response_id == first.id
    call = {
        "type": "function_call",
        "call_id": calls[0].call_id,
        "name": "get_weather",
        "arguments": calls[0].arguments,
    }
    conversation: Any = [{"role": "user", "content": ask}, call, result]
    stateless = sdk.responses.create(model=MODEL, input=conversation, store=False, **after, **uncached())
    assert stateless.output_text == second.output_text  # the stored conversation was prepended, all of it
    assert stateless.usage is not None and second.usage is not None
    assert stateless.usage.input_tokens == second.usage.input_tokens

    assert sdk.responses.retrieve(second.id).output_text == second.output_text
    sdk.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(second.id)
    with pytest.raises(openai.BadRequestError) as gone:
        sdk.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=second.id)
    body: Any = gone.value.body
    assert body["param"] == "previous_response_id" and "Previous response with id" in body["message"]
    with pytest.raises(openai.BadRequestError) as builtin:
        sdk.responses.create(model=MODEL, input=ask, tools=[{"type": "web_search"}])
    assert builtin.value.body["param"] == "tools" and "web_search" in str(builtin.value)  # type: ignore[index]


def test_cluster_keeps_stored_responses_in_redis(cluster: dict[str, Any]) -> None:
    sdk = openai.OpenAI(base_url=f"{cluster['base']}/v1", api_key="none", max_retries=0)
    made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    key = f"{cluster['ns']}:responses:{made.id}"
    assert 0 < cluster["redis"].ttl(key) <= 3 * 3600
    assert json.loads(cluster["redis"].get(key))["response"]["output"][0]["id"] == made.output[0].id  # type: ignore[union-attr]
