"""Tool calling through the official openai SDK, unchanged, on both stacks: a round trip (a
required call, the tool's result, the final answer), streamed and not, and, at temperature 1 over
several tools, arguments that always validate against their tool's schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
        "gift": {"type": "boolean"},
    },
    "required": ["sku", "qty"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "order", "description": "Order an item", "parameters": ORDER}},
]
SCHEMAS = {"get_weather": WEATHER, "order": ORDER}


def test_round_trip_streamed_and_not(sdk: openai.OpenAI) -> None:
    msgs: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=128, seed=1
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    stream = sdk.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=128, seed=2, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [t for d in deltas if d.delta.tool_calls for t in d.delta.tool_calls]
    # the head first (id, name), then the arguments as they are generated
    assert calls[0].id and calls[0].function.name == "get_weather" and len(calls) > 2
    assert all(c.function.name is None and c.id is None for c in calls[1:])
    assert deltas[-1].finish_reason == "stop"  # a named function finishes as OpenAI's does
    jsonschema.validate(json.loads("".join(c.function.arguments or "" for c in calls)), WEATHER)
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})},
    ]
    final = sdk.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as auto:
        sdk.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=8)
    assert auto.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_required_and_named_arguments_always_validate(embedded: str) -> None:
    """The acceptance run at temperature 1: every call's arguments validate."""
    sdk = openai.OpenAI(base_url=f"{embedded}/v1", api_key="none", max_retries=0)
    asks = ["Weather in Oslo, please.", "Order two of item ABC-123.", "Help me.", "Buy a gift."]
    choices: list[Any] = ["required", *({"type": "function", "function": {"name": n}} for n in SCHEMAS)]
    count = 0
    for i, ask in enumerate(asks):
        for tool_choice in choices:
            r = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": ask}], tools=TOOLS,
                tool_choice=tool_choice, max_tokens=256, temperature=1.0, seed=i,
                parallel_tool_calls=False,
            )  # fmt: skip
            calls = r.choices[0].message.tool_calls
            assert calls and len(calls) == 1, r
            for c in calls:
                jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
                count += 1
    assert count == len(asks) * len(choices)
