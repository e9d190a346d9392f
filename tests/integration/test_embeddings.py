"""/v1/embeddings end to end (issue 20): a tiny random BERT checkpoint served by `pagoda serve`
and by the four services as separate processes over the real RabbitMQ and Redis; the official
`openai` client's embeddings equal Hugging Face's CLS vectors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.processes import AMQP, REDIS, Proc, free_port, wait_ready
from tests.tiny_models import make_tiny_embedder

pytestmark = pytest.mark.integration
TEXTS = ["The cat sat on the mat.", "dog runs", "the dogs sat"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("bert")
    return path, make_tiny_embedder("bert", path)


def _stack(procs: list[Proc], port: int) -> Iterator[str]:
    try:
        wait_ready(f"http://127.0.0.1:{port}", procs, timeout=180)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        codes = [p.stop() for p in procs]
        outputs = "\n".join(p.output()[-2000:] for p in procs)
        assert codes == [0] * len(procs) and "Traceback" not in outputs, outputs


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def base(request: pytest.FixtureRequest, bert: tuple[Path, Any]) -> Iterator[str]:
    # float32 as HF's reference: `--dtype auto` is bf16 on CPUs with avx512_bf16
    model = ["--model", str(bert[0]), "--served-model-name", "bert", "--dtype", "float32"]
    port = free_port()
    if request.param == "embedded":
        yield from _stack([Proc("serve", *model, "--port", str(port))], port)
        return
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", f"pagoda-embed-{uuid.uuid4().hex[:8]}"]
    common += ["--heartbeat-interval", "0.3"]
    procs = [
        Proc("worker", *model, *common, "--worker-id", "e1"),
        Proc("scheduler", *common),
        Proc("tokenizer", *model, *common),
        Proc("gateway", *model, *common, "--port", str(port)),
    ]
    yield from _stack(procs, port)


def test_sdk_embeddings_equal_hf(base: str, bert: tuple[Path, Any]) -> None:
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    got = client.embeddings.create(model="bert", input=TEXTS)
    root = base.removesuffix("/v1")
    ids = [httpx.post(f"{root}/tokenize", json={"prompt": t}).json()["tokens"] for t in TEXTS]
    assert ids[0][0] == 2 and ids[0][-1] == 3  # [CLS] ... [SEP]
    assert got.usage.prompt_tokens == sum(map(len, ids)) and [d.index for d in got.data] == [0, 1, 2]
    for data, prompt in zip(got.data, ids, strict=True):
        with torch.no_grad():
            cls = bert[1](input_ids=torch.tensor([prompt])).last_hidden_state[0, 0]
        torch.testing.assert_close(torch.tensor(data.embedding), F.normalize(cls, dim=0), atol=1e-4, rtol=0)
    by_ids = client.embeddings.create(model="bert", input=ids[1])  # one prompt of token ids
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), torch.tensor(got.data[1].embedding))
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.chat.completions.create(model="bert", messages=[{"role": "user", "content": "hi"}])
