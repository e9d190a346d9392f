"""Shared fixtures: the demo model loaded once per session, HF references built in-test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# servers and workers the tests start run eagerly unless a test asks for compiled graphs, which
# then go to a directory of this run (a user's cache is neither read nor written)
os.environ.setdefault("PAGODA_COMPILE", "off")
os.environ.setdefault("PAGODA_COMPILE_CACHE", tempfile.mkdtemp(prefix="pagoda-compiled-"))
if not torch.cuda.is_available():  # Triton kernels run under its interpreter (must precede their import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_gguf() -> str:
    from pagoda.engine.loader import demo_model_path

    return demo_model_path()


class CachedCheckpoint:
    """A Checkpoint whose dequantized weights are kept, so many engines load fast. It reports no
    quantization of its own, so engines built on it run the dense path that the HF comparisons
    of these tests are about (the quantized GGUF path has its own tests)."""

    quantization = None

    def __init__(self, ckpt: Any) -> None:
        self.name = ckpt.name
        self.arch = ckpt.arch
        self.tokenizer = ckpt.tokenizer
        self.pooler = ckpt.pooler
        self._weights = list(ckpt.dense_weights())

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._weights)


@pytest.fixture(scope="session")
def demo_checkpoint(demo_gguf: str) -> CachedCheckpoint:
    from pagoda.engine.loader import load_checkpoint

    return CachedCheckpoint(load_checkpoint(demo_gguf))


@pytest.fixture(scope="session")
def hf_demo_model(demo_gguf: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = Path(demo_gguf)
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _kernel_kinds() -> list[str]:
    """The CPU kernels this machine runs: pagoda's own where the CPU has what they need
    (AVX512-VNNI for all of them, AVX2 for the integer GEMM and the decode attention; machines
    differ from session to session), and torch's everywhere."""
    from pagoda.engine.quantization.native import runs

    return ["native", "torch"] if runs("qgemm") else ["torch"]


@pytest.fixture(params=_kernel_kinds())
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each case on pagoda's own CPU kernels, as the defaults run them on a CPU with AVX512-VNNI
    (every integer layer) or AVX2 (the integer layers; fp8 and norms on torch's), and on torch's
    kernels (what other CPUs run, as defaults there). Where the CPU runs them the kernels must
    build."""
    from pagoda.engine.quantization.linear import native_kernels

    if request.param == "native":
        assert native_kernels("qgemm"), "pagoda's CPU kernels must build on the test machine"
        monkeypatch.delenv("PAGODA_INT8_ACTIVATIONS", raising=False)
    else:
        monkeypatch.setenv("PAGODA_NATIVE_KERNELS", "0")
    return str(request.param)
