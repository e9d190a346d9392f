"""`pagoda bench serve --plot out.png`: latency histograms and throughput over time of one run, or
of several runs overlaid (pagoda and a --peer), from the per-request records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pagoda.load.serve_runner import RequestRecord


def token_times(records: list[RequestRecord]) -> np.ndarray:
    """Arrival time (s, on perf_counter) of every content chunk of the successful requests."""
    times: list[float] = []
    for r in records:
        if not r.ok or r.completion_tokens == 0:
            continue
        t = r.start_s + r.ttft_s
        times.append(t)
        for gap in r.itl_s:
            t += gap
            times.append(t)
    return np.asarray(times, dtype=np.float64)


def throughput_series(records: list[RequestRecord], bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bin start in s from the first request, chunks per second in that bin)."""
    times = token_times(records)
    starts = [r.start_s for r in records if r.start_s > 0]
    if times.size == 0 or not starts:
        return np.zeros(0), np.zeros(0)
    t0 = min(starts)
    rel = times - t0
    nbins = max(1, math.ceil(float(rel.max()) / bin_s))
    counts, edges = np.histogram(rel, bins=nbins, range=(0.0, nbins * bin_s))
    return edges[:-1], counts / bin_s


def plot_serve(runs: dict[str, list[RequestRecord]], path: str | Path, title: str = "") -> Path:
    """Write a 2x2 PNG: TTFT, ITL and E2E histograms (ms) and output chunks/s over time."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = (
        (axes[0, 0], "TTFT (ms)", lambda rs: [r.ttft_s * 1e3 for r in rs if r.ok]),
        (axes[0, 1], "ITL (ms)", lambda rs: [g * 1e3 for r in rs if r.ok for g in r.itl_s]),
        (axes[1, 0], "E2E latency (ms)", lambda rs: [r.e2e_s * 1e3 for r in rs if r.ok]),
    )
    for ax, label, values in panels:
        for name, records in runs.items():
            data = values(records)
            if data:
                ax.hist(data, bins=40, alpha=0.6, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        ax.legend()
    ax = axes[1, 1]
    for name, records in runs.items():
        x, y = throughput_series(records)
        ax.plot(x, y, drawstyle="steps-post", label=name)
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("output chunks / s")
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
