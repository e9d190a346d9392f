"""pagoda's one import namespace, as a user installs it: the built wheel holds only `pagoda.*`, and
it installs into a fresh venv beside the lock's transformers and the Hugging Face `kernels`
distribution that transformers imports, with both sides importable.

The clash this guards against: a top-level `kernels` package of pagoda's own shadowed Hugging
Face's, so `transformers` failed with `cannot import name 'CUDAProperties' from 'kernels'`."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements/lock.txt"

# Run inside the fresh venv: which file each side came from, and that transformers' Hub-kernels
# integration (the import that failed) and a tiny transformers model both work.
_CHECK = """
import json, kernels, transformers
import transformers.integrations.hub_kernels as hub
from transformers import LlamaConfig, LlamaForCausalLM
import pagoda, pagoda.engine, pagoda.kernels.reference, pagoda.services.transport.messages
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
LlamaForCausalLM(cfg)
print(json.dumps({"kernels": kernels.__file__, "pagoda": pagoda.__file__,
                  "cuda_properties": hasattr(hub, "CUDAProperties"),
                  "sampling_params": pagoda.engine.SamplingParams.__module__}))
"""


def _locked(name: str) -> str:
    for line in LOCK.read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.strip()
    raise AssertionError(f"{name} is not in {LOCK}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (whl,) = out.glob("pagoda-*.whl")
    return whl


def test_the_wheel_holds_only_the_pagoda_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"pagoda"}, tops
    for sub in ("engine", "kernels", "services", "load"):
        assert f"pagoda/{sub}/__init__.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pagoda = pagoda.services.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_wheel_installs_beside_transformers_and_hf_kernels(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin/python"
    purelib = Path(
        subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )  # fmt: skip
    pins = [_locked("transformers"), _locked("kernels")]
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel), *pins],
        check=True, capture_output=True,
    )  # fmt: skip
    # Everything else (torch, tokenizers, huggingface_hub...) from this environment, after the venv's own.
    rest = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    (purelib / "zz_rest.pth").write_text("\n".join(rest) + "\n")
    for cwd in (tmp_path, ROOT):  # ROOT: a checkout on sys.path must not shadow Hugging Face's kernels
        got = subprocess.run([py, "-c", _CHECK], cwd=cwd, capture_output=True, text=True)
        assert got.returncode == 0, got.stderr[-3000:]
        seen = json.loads(got.stdout.strip().splitlines()[-1])
        assert seen["kernels"].startswith(str(purelib)), seen
        assert seen["cuda_properties"], "transformers' hub_kernels did not find kernels.CUDAProperties"
        assert seen["sampling_params"] == "pagoda.engine.sampling.params"
        expected_pagoda = purelib if cwd == tmp_path else ROOT
        assert seen["pagoda"].startswith(str(expected_pagoda)), seen
