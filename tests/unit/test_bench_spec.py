"""`pagoda bench serve` for speculative decoding: the code-editing data set (prompts an answer
copies from), the `pagoda-no-spec` peer (the target's --launch args less --speculative-config),
and the acceptance rate read from a real engine's /metrics counters."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pagoda.engine.spec_decode import SpeculativeConfig
from pagoda.engine.spec_decode.engine_parts import SpecParts
from pagoda.load.bench_serve import format_result
from pagoda.load.datasets import DatasetSpec, load_dataset
from pagoda.load.peers import make_peer, without_flag
from pagoda.load.serve_runner import summarize
from pagoda.load.server_metrics import parse_kv, summarize_kv
from pagoda.services.ops.metrics import Metrics
from tests.unit.test_bench_kv_metrics import _core


def test_code_edit_prompts_hold_the_code_the_answer_copies() -> None:
    convs = load_dataset(DatasetSpec("code-edit", num_prompts=3, input_len=200, output_len=64, seed=1))
    texts = [c[0].messages[0]["content"] for c in convs]
    assert len(set(texts)) == 3 and all(c[0].output_len == 64 for c in convs)
    for conv, text in zip(convs, texts, strict=True):
        assert text.startswith("Here is some Python code:") and text.count("def ") >= 3
        assert 200 <= conv[0].input_len < 300  # about input_len tokens of code, then the instruction
    assert texts == [
        c[0].messages[0]["content"] for c in load_dataset(DatasetSpec("code-edit", 3, 200, 64, 1))
    ]


def test_no_spec_peer_runs_the_target_without_speculation() -> None:
    spec = '{"method": "ngram", "num_speculative_tokens": 4}'
    launch = ["--dtype", "float32", "--speculative-config", spec, "--max-num-seqs", "4"]
    peer: Any = make_peer("pagoda-no-spec", serve_args=launch)
    peer.port = 1
    cmd = peer.command()
    assert "--speculative-config" not in cmd and spec not in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--max-num-seqs") + 1] == "4"
    assert without_flag([f"--speculative-config={spec}", "--seed", "1"], "--speculative-config") == [
        "--seed",
        "1",
    ]


def test_acceptance_rate_from_the_engines_counters() -> None:
    core = _core("a", (5,))
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    core.spec = SpecParts.build(config, 64, 32, [0], torch.device("cpu"))
    metrics = Metrics()
    metrics.engines().add("w0", core)
    before = parse_kv(metrics.render().decode())
    assert core.spec is not None
    core.spec.metrics.observe_draft(3, 2)  # 3 drafted, 2 accepted
    core.spec.metrics.observe_draft(2, 0)
    after = parse_kv(metrics.render().decode())
    assert before is not None and after is not None
    assert (after.drafts, after.draft_tokens, after.accepted) == (2, 5, 2)
    kv = summarize_kv([before, after])
    assert kv is not None
    assert kv["spec_acceptance_rate"] == 2 / 5 and kv["spec_mean_acceptance_length"] == 1 + 2 / 2
    assert "spec_acceptance_rate" not in (summarize_kv([before, before]) or {})  # no drafts in the run
    text = format_result(dataclasses.replace(summarize([], 1.0, {}), kv=kv))
    assert "Draft acceptance rate:" in text and "0.400" in text and "Mean acceptance length" in text
