"""CUDA graphs are never captured on the CPU and the decode replay path pads correctly (run
eagerly on the static buffers); the --enforce-eager flag and `pagoda bench kernels` on the CPU."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from pagoda.engine.engine_args import engine_config_from_args
from pagoda.engine.llm import LLM
from pagoda.engine.runner.attention import TorchAttention, TritonAttention
from pagoda.engine.runner.cuda_graphs import DecodeGraphs, capture_sizes
from pagoda.engine.sampling.params import SamplingParams
from pagoda.kernels.runtime import interpreting
from pagoda.services.cli.main import main
from pagoda.services.cli.parser import build_parser
from tests.kernels import DEV
from tests.tiny_models import make_tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_capture_sizes() -> None:
    triton = TritonAttention(DEV)
    assert capture_sizes(CPU, False, triton, 256) == []  # never on the CPU
    assert capture_sizes(CUDA, True, triton, 256) == []  # --enforce-eager
    assert capture_sizes(CUDA, False, TorchAttention(CPU), 256) == []  # backend cannot be captured
    assert capture_sizes(CUDA, False, triton, 40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(CUDA, False, triton, 3) == [1, 2, 3]


def test_enforce_eager_flag_reaches_the_config() -> None:
    args = build_parser().parse_args(["serve", "--enforce-eager", "--attention-backend", "triton"])
    cfg = engine_config_from_args(args)
    assert cfg.enforce_eager and cfg.attention_backend == "triton"
    assert not engine_config_from_args(build_parser().parse_args(["serve"])).enforce_eager


def test_cpu_engine_never_captures(tmp_path: Path) -> None:
    make_tiny_model("llama", tmp_path)
    backend = "triton" if interpreting() else "torch"  # on a GPU machine Triton compiles for the GPU only
    llm = LLM(
        str(tmp_path), dtype="float32", device="cpu", kv_cache_memory=1 << 20, attention_backend=backend
    )
    assert llm.engine.runner.graphs is None


@pytest.mark.slow
def test_graph_replay_path_pads_and_matches_eager(tmp_path: Path) -> None:
    """Three decodes replayed in the batch-4 buffers (one padding row) give the eager tokens. On a
    GPU the graphs are captured at start and replayed; on the CPU the same padded static buffers
    run the forward eagerly."""
    make_tiny_model("llama3", tmp_path)
    prompts = [[256, *range(40, 57)], [256, 7], [256, *range(90, 121)]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def tokens(graphs: bool) -> list[list[int]]:
        llm = LLM(
            str(tmp_path),
            dtype="float32",
            kv_cache_memory=1 << 20,
            max_model_len=64,
            max_num_seqs=4,
            attention_backend="triton",
            enforce_eager=not graphs,
        )
        runner = llm.engine.runner
        calls = []
        if graphs:
            if DEV.type == "cuda":
                g = runner.graphs
                assert g is not None and g.sizes == [1, 2, 4], "captured at start for batch 1, 2, 4"
            else:
                g = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, [1, 4], 4, 64, CPU)
                runner.graphs = g
            real_replay = g.replay

            def replay(*args: object, **kw: object) -> torch.Tensor:
                calls.append(1)
                return real_replay(*args, capture=DEV.type == "cuda")  # type: ignore[arg-type]

            g.replay = functools.partial(replay)  # type: ignore[method-assign]
        else:
            assert runner.graphs is None
        out = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
        assert len(calls) == (2 if graphs else 0)  # the two decode steps
        return out

    assert tokens(True) == tokens(False)


def test_bench_kernels_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "kernels", "--only", "rms_norm", "--dtype", "float32"]
    if DEV.type == "cuda":  # the GPU table at Llama-3-8B shapes (the e2e 8B model is not built here)
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "copy bandwidth" in out and "rms_norm + residual" in out and "paged_decode" not in out
        return
    assert main([*argv, "--e2e", "--e2e-batch", "2", "--e2e-output-len", "3"]) == 0
    out = capsys.readouterr().out
    assert "NOT performance figures" in out
    assert "rms_norm + residual" in out and "vs torch" in out
    assert "paged_decode" not in out  # --only filters
    assert "e2e decode: random-llama-2x128, batch 2" in out and "over 2 decode steps" in out


def test_bench_kernels_sweep_code_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU tuning sweep's code path, at toy shapes on DEV (the interpreter on the CPU)."""
    from pagoda.load.kernel_sweep import sweep

    sweep(DEV, torch.float32 if DEV.type == "cpu" else torch.bfloat16, big=False)
    out = capsys.readouterr().out
    assert "failed" not in out
    assert out.count("sweep paged_decode splits") == 2  # 2 split counts x 1 tile x 1 launch option
    assert "sweep int4 m16: F.linear" in out
    assert out.count("sweep int4 m1 ") == 8  # 4 kernels x 2 split counts x 1 block_n
