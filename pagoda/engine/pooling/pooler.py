"""A pooling request's hidden states -> its embedding, on the worker.

A decoder's prompt may run in several prefill chunks (chunked prefill), so each request's pool
is folded in as its chunks pass: the running sum (mean), the first row (cls) or the latest last
row (last), in float32. The result is cut to the requested dimensions, then normalized where the
model or the request says so: the order of sentence-transformers' Matryoshka truncation and vLLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.engine.pooling.params import PoolerConfig, PoolingParams


class PoolState:
    """One request's pool across its chunks."""

    def __init__(self, config: PoolerConfig, params: PoolingParams) -> None:
        self.config, self.params = config, params
        self.pooled: torch.Tensor | None = None  # sum (mean), first row (cls) or last row (last)
        self.count = 0

    def add(self, rows: torch.Tensor, start: int) -> None:
        """The hidden states [n, hidden] of the prompt's positions [start, start + n)."""
        kind = self.config.pooling_type
        if kind == "mean":
            total = rows.float().sum(dim=0)
            self.pooled = total if self.pooled is None else self.pooled + total
        elif kind == "cls":
            if start == 0:
                self.pooled = rows[0].float()
        else:
            self.pooled = rows[-1].float()
        self.count += rows.shape[0]

    def result(self) -> list[float]:
        assert self.pooled is not None and self.count > 0, "pooled before any row"
        vec = self.pooled / self.count if self.config.pooling_type == "mean" else self.pooled
        if self.params.dimensions is not None:
            vec = vec[: self.params.dimensions]
        normalize = self.config.normalize if self.params.normalize is None else self.params.normalize
        if normalize:
            vec = F.normalize(vec, dim=0)
        return vec.tolist()  # type: ignore[no-any-return]
