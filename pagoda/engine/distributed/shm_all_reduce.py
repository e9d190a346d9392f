"""All-reduce between ranks on one host through shared memory: what a CPU decode step's
all-reduces take instead of gloo (issue 18 allows it; perf.md: gloo's ~1.5 ms wake-ups per call
were more than a whole one-rank step on 2 cores).

One file in /dev/shm, mapped by every rank: a flag per rank (each on its own cache line) and two
buffers of one slot per rank. A call copies this rank's tensor into its slot of buffer `seq % 2`,
raises its flag to `seq`, waits until every flag reaches `seq`, then sums the slots in rank order,
so every rank gets the same sum bit for bit. Two buffers make one barrier per call enough: a rank
writes buffer `seq % 2` again only at `seq + 2`, after every rank raised its flag to `seq + 1`,
which each did after reading `seq`'s slots. Tensors larger than a slot go to gloo (the decision
depends only on the size, the same on every rank). The wait spins briefly, then yields the core,
and fails after the collective timeout.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch

LINE = 64  # bytes per flag: one cache line each
SLOT_BYTES = 4 << 20  # the largest tensor reduced here (a decode batch's hidden states, many times over)
SPINS = 200  # busy polls before yielding the core between polls
WATCH_S = 0.1


def shm_path() -> str:
    return f"/dev/shm/pagoda-tp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ShmAllReduce:
    """Rank `rank` of `size`'s view of the file at `path` (rank 0 creates it; it unlinks it once
    every rank mapped it, so nothing is left behind however the ranks end)."""

    def __init__(self, path: str, rank: int, size: int, timeout_s: float, create: bool = False) -> None:
        self.path, self.rank, self.size, self.timeout_s = path, rank, size, timeout_s
        total = LINE * size + 2 * size * SLOT_BYTES
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._flags: np.ndarray = np.frombuffer(self._map, dtype=np.int64, count=LINE // 8 * size)[
            :: LINE // 8
        ]
        self._data = torch.frombuffer(self._map, dtype=torch.uint8, offset=LINE * size)
        self.seq = 0
        # called every WATCH_S of a wait (rank 0: raises when a follower's process ended, so a
        # dead rank fails the call at once rather than at the timeout)
        self.watch: Callable[[], None] | None = None

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= SLOT_BYTES

    def _slot(self, buffer: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (buffer * self.size + rank) * SLOT_BYTES
        raw = self._data[start : start + like.numel() * like.element_size()]
        return raw.view(like.dtype).view(like.shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (x contiguous, on the CPU, at most SLOT_BYTES)."""
        self.seq += 1
        buffer = self.seq % 2
        self._slot(buffer, self.rank, x).copy_(x)
        self._flags[self.rank] = self.seq
        self._wait(self.seq)
        x.copy_(self._slot(buffer, 0, x))
        for rank in range(1, self.size):
            x.add_(self._slot(buffer, rank, x))
        return x

    def _wait(self, seq: int) -> None:
        flags = self._flags
        spins = 0
        deadline = watched = 0.0
        while int(flags.min()) < seq:
            spins += 1
            if spins < SPINS:
                continue
            os.sched_yield()
            now = time.monotonic()
            if not deadline:
                deadline, watched = now + self.timeout_s, now
            elif self.watch is not None and now - watched > WATCH_S:
                watched = now
                self.watch()
            if now > deadline:
                late = [r for r in range(self.size) if int(flags[r]) < seq]
                raise RuntimeError(
                    f"shared-memory all-reduce {seq} timed out after {self.timeout_s:g}s: rank(s) {late} "
                    "never arrived"
                )

    def unlink(self) -> None:
        """Remove the file (its mappings live on): rank 0, once every rank mapped it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
