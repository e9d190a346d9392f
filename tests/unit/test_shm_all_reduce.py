"""The shared-memory all-reduce (ranks on one host): every rank gets the same sum, bit for bit,
call after call through both buffers; a rank that never arrives fails the call within the timeout
instead of hanging it. Ranks are threads here: the protocol is the same across processes."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from pagoda.engine.distributed.shm_all_reduce import ShmAllReduce, shm_path


def _ranks(size: int, timeout_s: float = 10.0) -> list[ShmAllReduce]:
    path = shm_path()
    ranks = [ShmAllReduce(path, 0, size, timeout_s, create=True)]
    ranks += [ShmAllReduce(path, r, size, timeout_s) for r in range(1, size)]
    ranks[0].unlink()  # every rank mapped it: nothing stays in /dev/shm
    assert not os.path.exists(path)
    return ranks


@pytest.mark.parametrize("size", [2, 3])
def test_every_rank_gets_the_same_sum_call_after_call(size: int) -> None:
    ranks = _ranks(size)
    g = torch.Generator().manual_seed(0)
    calls = [[torch.randn(7, 33, generator=g) for _ in range(size)] for _ in range(25)]  # odd sizes
    results: list[list[torch.Tensor]] = [[] for _ in range(size)]

    def run(rank: int) -> None:
        for call in calls:
            results[rank].append(ranks[rank].all_reduce(call[rank].clone()))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, call in enumerate(calls):
        want = call[0].clone()
        for x in call[1:]:
            want += x
        for rank in range(size):
            assert torch.equal(results[rank][i], want), (i, rank)


def test_a_rank_that_never_arrives_fails_the_call_within_the_timeout() -> None:
    ranks = _ranks(2, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timed out after 0\.5s: rank\(s\) \[1\] never arrived"):
        ranks[0].all_reduce(torch.ones(4))
    assert time.monotonic() - start < 3.0


def test_a_watch_that_sees_a_dead_rank_fails_the_call_at_once() -> None:
    ranks = _ranks(2, timeout_s=60.0)

    def follower_gone() -> None:
        raise RuntimeError("tensor-parallel rank 1 exited")

    ranks[0].watch = follower_gone
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        ranks[0].all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5.0  # not the 60 s timeout
