"""Structured outputs through the official openai SDK, unchanged, on both stacks: `parse` with a
pydantic model returns the parsed object, vLLM's `structured_outputs` works through `extra_body`,
and a regex llguidance cannot take is a 400 from the gateway on both."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


class Pet(BaseModel):
    name: str = Field(min_length=1, max_length=16)
    species: str = Field(pattern="^(cat|dog|bird)$")
    age: int = Field(ge=0, le=30)


def test_parse_extra_body_and_refusals(sdk: openai.OpenAI) -> None:
    msg = [{"role": "user", "content": "Describe a pet as JSON."}]
    parsed = sdk.chat.completions.parse(
        model=MODEL, messages=msg, response_format=Pet, max_tokens=128, temperature=1.0, seed=4
    )  # type: ignore[call-overload]
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and parsed.choices[0].finish_reason == "stop", parsed
    stream = sdk.chat.completions.create(
        model=MODEL, messages=msg, max_tokens=64, stream=True, seed=2,
        extra_body={"structured_outputs": {"choice": ["cat", "dog"]}},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("cat", "dog")
    comp = sdk.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=8, seed=3,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )  # fmt: skip
    assert comp.choices[0].text in ("yes", "no") and comp.choices[0].finish_reason == "stop"
    ask = [{"role": "user", "content": "Give a JSON object with a name and an age."}]
    chat = sdk.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model=MODEL, messages=msg, max_tokens=8, extra_body={"structured_outputs": {"regex": "(?<=a)b"}}
        )
    assert "invalid regex" in str(bad.value) and bad.value.body["param"] == "structured_outputs"  # type: ignore[index]


def test_bench_serve_structured_json(embedded: str) -> None:
    """The bench runs the same requests free and under a schema no answer completes before
    max_tokens: equal token counts, so the throughput ratio is the masks' cost."""
    cmd = [
        sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", embedded, "--structured", "json",
        "--num-prompts", "4", "--concurrency", "4", "--input-len", "16", "--output-len", "8", "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["free"]["output_tokens"] == out["json"]["output_tokens"] == 32
    assert out["json"]["failed"] == 0 and out["ratio"] > 0
    assert out["compile_probe"]["first_ms"] > 0 and "compile_ms" in out["compile_probe"]
