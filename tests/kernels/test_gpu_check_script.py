"""pagoda/load/gpu_check.sh, the one-call script a session runs on a lent GPU: its plumbing (steps,
logs, summary, time budget) checked on the CPU, where its kernel step runs under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_a_step_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET": "100", "PY": sys.executable, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        ["bash", "pagoda/load/gpu_check.sh", "tests", "kernels"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "== kernels rc=0" in summary
    # the kernel tests (limit 240 s) need half their limit left of the 100 s budget: skipped, and said
    assert "== tests skipped" in summary and not (tmp_path / "tests.log").exists()
    log = (tmp_path / "kernels.log").read_text()
    assert "NOT performance figures" in log and "rel err" in log
    assert "---- kernels" in done.stdout  # the closing table of every step's log
