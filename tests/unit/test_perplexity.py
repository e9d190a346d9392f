"""`pagoda eval perplexity` on the demo model: it measures prediction (real text scores far better
than the same tokens shuffled), its windowing is exactly the documented one, and the CLI prints
the function's number. float32 throughout, so two loads give bit-identical logits on the CPU."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine import LLM
from pagoda.engine.runner.forward import forward_tokens
from pagoda.load.perplexity import builtin_text, perplexity, split_windows
from pagoda.services.cli.main import main


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("", dtype="float32", quantization="none", num_blocks=1, enforce_eager=True)


@pytest.fixture(scope="module")
def builtin_ids(llm: LLM) -> list[int]:
    return llm.tokenizer.encode(builtin_text()[:4000], add_special_tokens=False)[:256]


def test_builtin_text_is_the_first_half_of_the_pydoc_topics_in_key_order() -> None:
    from pydoc_data.topics import topics

    text = builtin_text()
    keys = sorted(topics)[: len(topics) // 2]
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(topics[k]) for k in keys) + 2 * (len(keys) - 1)


def test_text_perplexity_is_finite_and_far_below_shuffled(llm: LLM, builtin_ids: list[int]) -> None:
    assert len(builtin_ids) == 256
    ppl, scored = perplexity(llm, builtin_ids, 128)
    assert scored == 2 * 127
    assert 1.0 < ppl < 100.0, ppl  # a uniform guess over 49,152 tokens would score 49,152
    shuffled = list(builtin_ids)
    random.Random(0).shuffle(shuffled)
    ppl_shuffled, scored_shuffled = perplexity(llm, shuffled, 128)
    assert scored_shuffled == scored
    assert ppl_shuffled > 10 * ppl, (ppl, ppl_shuffled)


def test_windows_are_fresh_and_cover_every_token_but_each_first() -> None:
    assert split_windows(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert split_windows(17, 8) == [(0, 8), (8, 16)]  # a lone last token predicts nothing
    assert split_windows(1, 8) == []
    with pytest.raises(ValueError, match="at least 2"):
        split_windows(20, 1)


def test_three_windows_equal_the_hand_computed_nll(llm: LLM, builtin_ids: list[int]) -> None:
    ids = builtin_ids[:20]  # windows of 8, 8 and 4 tokens: 7 + 7 + 3 predictions
    model: Any = llm.engine.model
    nlls: list[float] = []
    for window in (ids[0:8], ids[8:16], ids[16:20]):
        with torch.no_grad():
            logits = model.compute_logits(forward_tokens(model, window))  # [len(window), vocab]
        logp = torch.log_softmax(logits.float(), dim=-1)
        nlls += [-float(logp[i, window[i + 1]]) for i in range(len(window) - 1)]
    expected = math.exp(math.fsum(nlls) / len(nlls))
    assert perplexity(llm, ids, 8) == (expected, 17)
    assert perplexity(llm.engine, torch.tensor(ids), 8) == (expected, 17)
    one_window = perplexity(llm, ids, 20)[0]
    assert one_window != expected  # context across the boundaries changes the score: windows are cut


def test_cli_json_prints_the_functions_number(
    llm: LLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(builtin_text()[:1000], encoding="utf-8")
    argv = ["eval", "perplexity", "--text", str(text), "--dtype", "float32", "--quantization", "none"]
    assert main([*argv, "--max-tokens", "64", "--window", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = llm.tokenizer.encode(builtin_text()[:1000], add_special_tokens=False)[:64]
    assert len(ids) == 64
    ppl, scored = perplexity(llm, ids, 32)
    assert out["perplexity"] == ppl
    assert (out["tokens"], out["windows"], out["window"]) == (scored, 2, 32)
    assert (out["model"], out["dtype"], out["quantization"]) == ("SmolLM2-135M-Instruct", "float32", "none")
    assert out["corpus"] == str(text) and out["seconds"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--text", "{missing}"], "no such file"),
        (["--text", "{empty}"], "is empty"),
        (["--window", "1"], "--window must be at least 2"),
        (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    paths = {"missing": str(tmp_path / "missing.txt"), "empty": str(tmp_path / "empty.txt")}
    assert main(["eval", "perplexity", *(f.format(**paths) for f in flags)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pagoda: error: ") and message in err and "\n" not in err, err
