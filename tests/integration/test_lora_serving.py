"""LoRA adapters through the OpenAI server (`pagoda serve --enable-lora`): adapters from
--lora-modules and from POST /v1/load_lora_adapter are listed with their parent and answer as the
engine does offline with the same adapter (greedy, fp32); unloading an adapter while its requests
stream loses none of them, and later requests for it are 404s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagoda.engine import LLM, LoRARequest, SamplingParams
from pagoda.engine.tokenization.detokenizer import IncrementalDetokenizer
from tests.lora_adapters import make_adapter
from tests.polling import block_until
from tests.processes import Proc, free_port, wait_ready
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--compile", "off"]
PROMPTS = [f"Tell me about {t} in a few words." for t in ("tides", "owls", "glass")]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("lora-serving")
    hf, _ = make_tiny_model("llama", root / "model")
    adapters = {name: root / name for name in ("qv8", "all4")}
    for seed, (name, path) in enumerate(adapters.items()):
        make_adapter(hf, path, name, seed)
    port = free_port()
    proc = Proc(
        "serve", "--model", str(root / "model"), "--served-model-name", "base", *ENGINE, "--port", str(port),
        "--enable-lora", "--max-loras", "2", "--lora-modules", f"qv8={adapters['qv8']}",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [proc])
        yield {"base": base, "model": root / "model", "adapters": adapters, "proc": proc}
    finally:
        assert proc.stop() == 0, proc.output()
        assert "Traceback" not in proc.output(), proc.output()


def _offline(model: Path, adapters: dict[str, Path]) -> dict[str | None, list[str]]:
    """Greedy answers to PROMPTS of the base model and of each adapter, run offline here, as the
    gateway writes them."""
    llm = LLM(str(model), dtype="float32", compile="off", enable_lora=True, max_loras=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    answers: dict[str | None, list[str]] = {}
    for i, name in enumerate([None, *adapters]):
        lora = None if name is None else LoRARequest(name, i, str(adapters[name]))
        results = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=lora)
        answers[name] = [
            IncrementalDetokenizer(llm.tokenizer, r.prompt_token_ids).add(r.outputs[0].token_ids)
            for r in results
        ]
    return answers


async def _complete(base: str, asks: list[str], max_tokens: int = MAX_TOKENS) -> list[tuple[int, Any]]:
    """One completion per model in `asks` (prompts in turn); each (status, body)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(i: int, model: str) -> tuple[int, Any]:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            resp = await client.post("/v1/completions", json=body)
            return resp.status_code, resp.json()

        return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(asks))))


def test_adapters_are_listed_and_answer_as_offline(served: dict[str, Any]) -> None:
    base, adapters = served["base"], served["adapters"]
    cards = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
    assert list(cards) == ["base", "qv8"]
    assert cards["qv8"]["parent"] == "base" and cards["qv8"]["root"] == str(adapters["qv8"])
    expected = _offline(served["model"], adapters)
    assert expected[None] != expected["qv8"] != expected["all4"], "each adapter changes the answers"

    load = {"lora_name": "all4", "lora_path": str(adapters["all4"])}
    resp = httpx.post(f"{base}/v1/load_lora_adapter", json=load)
    assert resp.status_code == 200 and "all4" in resp.text
    again = httpx.post(f"{base}/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"

    asks = [m for _ in range(3) for m in ("base", "qv8", "all4")]  # one batch mixing all three
    answers = asyncio.run(_complete(base, asks))
    for i, (model, (status, body)) in enumerate(zip(asks, answers, strict=True)):
        assert status == 200, body
        assert body["model"] == model
        key = None if model == "base" else model
        assert body["choices"][0]["text"] == expected[key][i % len(PROMPTS)], (model, i)


async def _stream(client: httpx.AsyncClient, model: str, got: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion; `got[0]` counts its tokens as they arrive; returns its usage."""
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            got[0] += len(chunk["choices"])
            usage = chunk.get("usage") or usage
    return usage


def test_unloading_under_load_loses_no_request(served: dict[str, Any]) -> None:
    base, adapters, n = served["base"], served["adapters"], 400
    httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": str(adapters["all4"])})

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            counts = [[0] for _ in range(8)]
            models = ["temp"] * 6 + ["qv8"] * 2
            streams = [
                asyncio.ensure_future(_stream(client, m, c, n)) for m, c in zip(models, counts, strict=True)
            ]
            while not all(c[0] for c in counts):  # every stream has its first tokens
                await asyncio.sleep(0.005)
            resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": "temp"})
            assert resp.status_code == 200, resp.text
            assert all(c[0] < n for c in counts[:6]), "a stream ended before the unload: nothing proven"
            return list(await asyncio.gather(*streams))

    for usage in asyncio.run(run()):
        assert usage["completion_tokens"] == n, usage
    status, body = asyncio.run(_complete(base, ["temp"]))[0]
    assert status == 404 and body["error"]["param"] == "model"
    gone = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "temp"})
    assert gone.status_code == 404
    assert "temp" not in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    log = served["proc"].output
    block_until(lambda: "unloaded LoRA adapter temp" in log(), 10, "the worker to drop the adapter")
