"""/v1/embeddings over an in-process engine (issue 20): the openai SDK's calls (base64, its
default, and floats) give HF's pooled vectors; every way to get it wrong is a 400 naming the field."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import torch
import torch.nn.functional as F

from pagoda.engine import AsyncEngine, EngineCore, make_engine_config
from pagoda.services.gateway.frontend import LocalFrontend
from pagoda.services.gateway.server import build_app
from tests.fakes import FakeEngine, local_frontend
from tests.tiny_models import make_tiny_embedder

TEXTS = ["the cat sat on the mat", "dog runs", "a b c"]
# one event loop for the module, so one engine answers every test that only reads from it
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    path = tmp_path_factory.mktemp("qwen3-embed")
    hf = make_tiny_embedder("qwen3", path)
    matryoshka = tmp_path_factory.mktemp("qwen3-mrl")  # the same model, declaring Matryoshka training
    shutil.copytree(path, matryoshka, dirs_exist_ok=True)
    config = json.loads((matryoshka / "config.json").read_text())
    (matryoshka / "config.json").write_text(json.dumps(config | {"is_matryoshka": True}))
    return path, matryoshka, hf


async def _client(path: Path) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    engine = AsyncEngine(
        EngineCore(make_engine_config(str(path), served_model_name="m", dtype="float32", max_model_len=64))
    )
    app = build_app(LocalFrontend(engine))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            yield openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http), http
    finally:
        await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(
    model: tuple[Path, Path, Any],
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    async for pair in _client(model[0]):
        yield pair


def _reference(hf: Any, ids: list[int], dims: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        last = hf(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return F.normalize(last[:dims], dim=0)


async def test_sdk_embeddings_equal_hf_in_base64_and_floats(
    model: tuple[Path, Path, Any], clients: tuple[openai.AsyncOpenAI, httpx.AsyncClient]
) -> None:
    sdk, http = clients
    got = await sdk.embeddings.create(model="m", input=TEXTS)  # the SDK asks for base64
    floats = (await http.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "float"})).json()
    tokens = await http.post("/tokenize", json={"prompt": TEXTS[0]})
    ids = tokens.json()["tokens"]
    assert got.usage.prompt_tokens == sum(len(t.encode()) for t in TEXTS)  # byte-level tokens
    assert [d.index for d in got.data] == [0, 1, 2]
    ref = _reference(model[2], ids)
    torch.testing.assert_close(torch.tensor(got.data[0].embedding), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(floats["data"][0]["embedding"]), ref, atol=1e-4, rtol=0)
    by_ids = await sdk.embeddings.create(model="m", input=[ids, ids[:3]])  # token-id prompts
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), ref, atol=1e-4, rtol=0)
    short = _reference(model[2], ids[:3])
    torch.testing.assert_close(torch.tensor(by_ids.data[1].embedding), short, atol=1e-4, rtol=0)
    raw = (await http.post("/v1/embeddings", json={"input": TEXTS[0], "normalize": False})).json()
    assert abs(float(torch.tensor(raw["data"][0]["embedding"]).norm()) - 1.0) > 0.01  # not normalized


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": []}, "input", "must not be empty"),
        ({"input": ["a", ""]}, "input", "must not be empty"),
        ({"input": "a", "dimensions": 8}, "dimensions", "matryoshka"),
        ({"input": "x" * 80}, "input", "maximum context length is 64"),
        ({"input": "a", "model": "other"}, "model", "does not exist"),
    ],
)
async def test_embedding_mistakes_are_400s_naming_the_field(
    clients: tuple[openai.AsyncOpenAI, httpx.AsyncClient], body: dict[str, Any], param: str, words: str
) -> None:
    resp = await clients[1].post("/v1/embeddings", json=body)
    assert resp.status_code in (400, 404), resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err


async def test_truncation_dimensions_and_task_refusals(model: tuple[Path, Path, Any]) -> None:
    _, matryoshka, hf = model
    async for sdk, http in _client(matryoshka):
        long = "x" * 80  # 80 tokens: over the 64-token context unless truncated to its last 60
        got = await sdk.embeddings.create(model="m", input=long, extra_body={"truncate_prompt_tokens": 60})
        assert got.usage.prompt_tokens == 60
        cut = await sdk.embeddings.create(model="m", input="dog runs", dimensions=16, encoding_format="float")
        ids = (await http.post("/tokenize", json={"prompt": "dog runs"})).json()["tokens"]
        torch.testing.assert_close(
            torch.tensor(cut.data[0].embedding), _reference(hf, ids, 16), atol=1e-4, rtol=0
        )
        too_big = await http.post("/v1/embeddings", json={"input": "a", "dimensions": 65})
        assert too_big.status_code == 400 and "at most the model's 64" in too_big.json()["error"]["message"]
        chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "/v1/embeddings" in chat.json()["error"]["message"]
    generator = build_app(local_frontend(FakeEngine()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=generator), base_url="http://t") as http:
        resp = await http.post("/v1/embeddings", json={"input": "hi"})
    assert resp.status_code == 400 and "--task embed" in resp.json()["error"]["message"]
