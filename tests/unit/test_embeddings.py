"""Embeddings (issue 20): pooled hidden states equal Hugging Face's on tiny random checkpoints of a
decoder (Qwen3Model: last-token and mean pooling) and an encoder (BertModel: CLS, and mean as a
sentence-transformers directory states it), batched in shared steps, chunked or not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pagoda.engine import LLM, PoolerConfig, PoolingParams, SamplingParams, resolve_pooler
from tests.tiny_models import make_tiny_embedder

TEXTS = ["the cat sat on the mat, the dog runs on the mat!", "dog runs", "a"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("qwen3-embed")
    return path, make_tiny_embedder("qwen3", path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("bert")
    return path, make_tiny_embedder("bert", path)


def _hidden(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).last_hidden_state[0]  # type: ignore[no-any-return]


def _check(llm: LLM, hf: Any, pool: str, normalize: bool = True, dims: int | None = None) -> None:
    results = llm.embed(TEXTS, PoolingParams(dimensions=dims))
    assert len({len(r.prompt_token_ids) for r in results}) == 3
    for r in results:
        h = _hidden(hf, r.prompt_token_ids)
        ref = {"last": h[-1], "cls": h[0], "mean": h.mean(dim=0)}[pool][:dims]
        ref = F.normalize(ref, dim=0) if normalize else ref
        got = torch.tensor(r.outputs.embedding)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_decoder_last_token_and_mean_pooling_equal_hf(qwen3: tuple[Path, Any]) -> None:
    path, hf = qwen3
    llm = LLM(str(path), dtype="float32")  # a bare Qwen3Model: an embedding model, last-token pooling
    assert llm.engine.pooler == PoolerConfig("last")
    _check(llm, hf, "last")
    _check(llm, hf, "last", dims=16)  # truncated, then normalized
    # 8-token steps: the long prompt pools over three chunks, mixed with the others' rows
    chunked = LLM(str(path), dtype="float32", pooling_type="mean", max_num_batched_tokens=8)
    _check(chunked, hf, "mean")


def test_encoder_cls_and_sentence_transformers_mean_equal_hf(bert: tuple[Path, Any]) -> None:
    path, hf = bert
    llm = LLM(str(path), dtype="float32")
    assert llm.engine.pooler == PoolerConfig("cls")
    assert all(k.numel() == 0 for k, _ in llm.engine.runner.kv_caches)  # an encoder keeps no KV
    _check(llm, hf, "cls")
    # a sentence-transformers directory: mean pooling, and no Normalize module
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    try:
        st = LLM(str(path), dtype="float32")
        assert st.engine.pooler == PoolerConfig("mean", normalize=False)
        _check(st, hf, "mean", normalize=False)
    finally:
        (path / "modules.json").unlink()


def test_pooling_requests_share_one_step_and_keep_no_kv(qwen3: tuple[Path, Any]) -> None:
    llm = LLM(str(qwen3[0]), dtype="float32")
    core = llm.engine
    params = SamplingParams(pooling=PoolingParams())
    for i, text in enumerate(TEXTS):
        core.add_request(str(i), llm.tokenizer.encode(text), params)
    outs = core.step()
    assert sorted(o.request_id for o in outs) == ["0", "1", "2"]
    assert all(o.finished and o.embedding and not o.new_token_ids for o in outs)
    assert not core.has_unfinished() and core.kv.pool.num_used_blocks == 0


def test_task_mismatches_are_refused(qwen3: tuple[Path, Any], bert: tuple[Path, Any]) -> None:
    embedder = LLM(str(qwen3[0]), dtype="float32")
    with pytest.raises(ValueError, match="serves embeddings"):
        embedder.engine.add_request("g", [1, 2, 3], SamplingParams())
    generator = LLM(str(qwen3[0]), dtype="float32", task="generate")  # the same weights as an LM
    with pytest.raises(ValueError, match="--task embed"):
        generator.embed(["a"])
    with pytest.raises(ValueError, match="encoder"):
        LLM(str(bert[0]), dtype="float32", task="generate")
    with pytest.raises(ValueError, match="--task embed"):
        resolve_pooler("auto", "mean", None, encoder=False)
    assert resolve_pooler("embed", None, None, encoder=False) == PoolerConfig("last")
    assert resolve_pooler("embed", "cls", PoolerConfig("mean", normalize=False), False) == PoolerConfig(
        "cls", normalize=False
    )
