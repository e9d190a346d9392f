"""The CPU experts' two paths side by side: one `F.grouped_mm` over the rows sorted by expert
against a matmul per expert present (StackedExperts.use_grouped_mm), best and median of 9 runs
(docs/moe.md holds the figures this printed). Run: python -m pagoda.load.bench_moe_cpu"""

from __future__ import annotations

import statistics
import time

import torch

from pagoda.engine.models.moe import route
from pagoda.engine.models.moe_experts import StackedExperts


def _times(layer: StackedExperts, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """(best, median) ms of one MoE layer's experts over x."""
    layer(x, w, ids)
    runs = []
    for _ in range(9):
        t0 = time.perf_counter()
        layer(x, w, ids)
        runs.append((time.perf_counter() - t0) * 1e3)
    return min(runs), statistics.median(runs)


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per layer, best/median of 9")
    for dtype in (torch.bfloat16, torch.float32):
        for hidden, inter, experts, top_k in ((1024, 512, 32, 4), (1024, 512, 64, 8)):
            layer = StackedExperts(experts, hidden, inter)
            layer.gate_up_proj.data = (torch.randn(experts, 2 * inter, hidden) * 0.02).to(dtype)
            layer.down_proj.data = (torch.randn(experts, hidden, inter) * 0.02).to(dtype)
            for tokens in (1, 8, 64, 256):
                x = torch.randn(tokens, hidden).to(dtype)
                w, ids = route(torch.randn(tokens, experts), top_k, True)
                row = []
                for grouped in (False, True):
                    layer.use_grouped_mm = grouped
                    best, median = _times(layer, x, w, ids)
                    row.append(f"{best:8.2f}/{median:8.2f}")
                shape = f"{str(dtype).removeprefix('torch.'):8} e{experts} top{top_k} t{tokens:<4}"
                print(f"{shape} per-expert {row[0]}  grouped_mm {row[1]}")


if __name__ == "__main__":
    main()
