"""`pagoda bench offline --lora-adapters`: alternating rounds of the base model in an engine without
LoRA, the base model in the LoRA engine, and the prompts spread over random adapters, which do
change the answers (so the adapter rounds ran the adapters)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from pagoda.engine.engine_args import add_engine_args
from pagoda.engine.llm import LLM
from pagoda.load import bench_lora
from pagoda.load.cli import add_offline_args


def test_bench_lora_times_three_systems(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers: list[list[list[int]]] = []
    generate = LLM.generate

    def spy(self: LLM, *args: Any, **kwargs: Any) -> Any:
        results = generate(self, *args, **kwargs)
        answers.append([list(r.outputs[0].token_ids) for r in results])
        return results

    monkeypatch.setattr(LLM, "generate", spy)
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    add_offline_args(ap)
    argv = ["--output-len", "6", "--lora-adapters", "2", "--rounds", "2", "--compile", "off"]
    args = ap.parse_args([*argv, "--lora-targets", "q_proj", "down_proj", "--max-model-len", "512"])
    prompts = [[1, 9690, 198, *range(400, 420)], [1, 9690, 198, *range(500, 510)]]
    summaries = bench_lora.bench_lora(args, prompts)
    assert [s["system"] for s in summaries] == ["base", "base, LoRA engine", "2 adapters"]
    for s in summaries:
        assert len(s["output_tok_s"]) == 2 and min(s["output_tok_s"]) > 0
    rounds = answers[-6:]  # base, LoRA engine base, adapters; twice
    assert rounds[0] == rounds[1] == rounds[3] == rounds[4]  # the base model, with or without LoRA slots
    assert rounds[2] == rounds[5] and rounds[2] != rounds[0]  # the adapters changed the answers
    bench_lora.print_lora(summaries, as_json=False)
    out = capsys.readouterr().out
    assert "2 adapters / base:" in out and "base, LoRA engine / base:" in out
