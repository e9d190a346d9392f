"""`pagoda bench step` on the demo model: a few profiled decode steps, the linears found by op
whichever kind of linear the model holds."""

from __future__ import annotations

import argparse

import pytest

from pagoda.engine.runner.onednn_linear import onednn_bf16_available
from pagoda.load.bench_step import run_step_bench
from pagoda.load.cli import add_step_args

# `auto` is bf16 with oneDNN-packed linears where the CPU has native bf16, else float32 F.linear
PLAIN = "mkldnn::_linear_pointwise" if onednn_bf16_available() else "aten::linear"


INT8 = "quantized::linear_dynamic"


@pytest.mark.parametrize(("quantization", "linear_op"), [("none", PLAIN), ("int8", INT8)])
def test_bench_step_times_and_attributes_the_linears(quantization: str, linear_op: str) -> None:
    ap = argparse.ArgumentParser()
    add_step_args(ap)
    argv = ["--batch", "2", "--input-len", "8", "--steps", "3", "--profile-steps", "2", "--compile", "off"]
    # int8 runs float32 activations: the bench must size the KV cache for its own sequences, not
    # for the model's 8192-token limit
    result = run_step_bench(ap.parse_args([*argv, "--quantization", quantization]))
    assert result["batch"] == 2 and result["quantization"] == quantization
    assert 0 < result["step_ms_min"] <= result["step_ms_p50"]
    by_op = result["profiled_ms_per_step_by_op"]
    assert next(iter(by_op)) == linear_op, by_op  # the linears take most of a decode step
    assert result["ops_top_level_per_step"] > 0 and result["profiled_ms_per_step_by_part"]
