"""`pagoda bench serve --plot`: the throughput series is exact on known records, the PNG is a
real image, and the CLI writes it after a run against the fake server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda.load.plots import plot_serve, throughput_series, token_times
from pagoda.load.serve_runner import RequestRecord
from pagoda.services.cli.main import main
from tests.unit.test_bench_serve import FakeOpenAI, fake  # noqa: F401  (the fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records() -> list[RequestRecord]:
    return [
        # start 10.0: chunks at 10.5, 10.7, 11.2
        RequestRecord(start_s=10.0, ttft_s=0.5, e2e_s=1.2, itl_s=[0.2, 0.5], completion_tokens=3),
        # start 11.0: chunks at 11.1, 12.6
        RequestRecord(start_s=11.0, ttft_s=0.1, e2e_s=1.6, itl_s=[1.5], completion_tokens=2),
        RequestRecord(start_s=11.5, e2e_s=0.1, error="HTTP 500: x"),  # no chunks
    ]


def test_token_times_and_throughput_series() -> None:
    assert token_times(_records()).tolist() == pytest.approx([10.5, 10.7, 11.2, 11.1, 12.6])
    x, y = throughput_series(_records(), bin_s=1.0)
    assert x.tolist() == [0.0, 1.0, 2.0]
    assert y.tolist() == [2.0, 2.0, 1.0]  # [10, 11): 2 chunks, [11, 12): 2, [12, 13): 1
    x, y = throughput_series([], bin_s=1.0)
    assert x.size == 0 and y.size == 0


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from matplotlib import image

    out = plot_serve({"pagoda": _records(), "peer": _records()[:1]}, tmp_path / "p.png", title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC
    height, width = image.imread(out).shape[:2]
    assert (width, height) == (1200, 800)


def test_cli_plot(fake: tuple[FakeOpenAI, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    _, url = fake
    png = tmp_path / "run.png"
    argv = ["bench", "serve", "--base-url", url, "--num-prompts", "4", "--input-len", "8",
            "--output-len", "3", "--concurrency", "2", "--plot", str(png), "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 4
    assert png.read_bytes()[:8] == PNG_MAGIC
