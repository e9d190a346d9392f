"""Routers on the CPU: prefix preference, the load gate, session affinity, fallbacks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagoda.services.scheduler.router import WorkerState, leading_overlap, make_router


def w(wid: str, running: int = 0, waiting: int = 0, kv: float = 0.0) -> WorkerState:
    return WorkerState(wid, running, waiting, kv, max_num_seqs=16)


def test_leading_overlap_counts_only_unbroken_prefixes() -> None:
    owners = [{"a", "b"}, {"a"}, {"a", "b"}, set()]
    assert leading_overlap(owners) == {"a": 3, "b": 1}
    assert leading_overlap([]) == {}
    assert leading_overlap([set(), {"a"}]) == {}


def test_prefix_router_prefers_cache_then_load() -> None:
    r = make_router("prefix")
    workers = [w("a", running=2), w("b", running=1)]
    assert r.choose(workers, {"a": 5}).worker_id == "a"
    assert r.choose(workers, {"a": 5}).reason == "prefix"
    assert r.choose(workers, {}).worker_id == "b"  # nothing cached: least loaded


def test_load_gate_stops_a_hot_prefix_pinning_one_worker() -> None:
    r = make_router("prefix")
    workers = [w("hot", running=16, waiting=4), w("cold")]
    d = r.choose(workers, {"hot": 50})
    assert d.worker_id == "cold" and d.reason == "least-load"


def test_session_affinity_under_the_gate() -> None:
    r = make_router("prefix")
    workers = [w("a", running=1), w("b", running=1)]
    assert r.choose(workers, {"b": 3}, session_worker="a").worker_id == "a"
    busy = [w("a", running=16, waiting=8), w("b")]
    assert r.choose(busy, {}, session_worker="a").worker_id == "b"


def test_round_robin_and_least_load() -> None:
    rr = make_router("round-robin")
    workers = [w("a"), w("b"), w("c")]
    assert [rr.choose(workers, {}).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    ll = make_router("least-load")
    assert ll.choose([w("a", 3), w("b", 1), w("c", 2)], {}).worker_id == "b"
    with pytest.raises(ValueError, match="router 'fastest' is not known"):
        make_router("fastest")


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10), st.floats(0, 1)), min_size=1, max_size=6),
    st.dictionaries(st.integers(0, 5), st.integers(0, 30)),
)
def test_prefix_choice_always_within_gate(loads: list[tuple[int, int, float]], ov: dict[int, int]) -> None:
    workers = [w(f"w{i}", r_, q, kv) for i, (r_, q, kv) in enumerate(loads)]
    overlap = {f"w{k}": v for k, v in ov.items() if k < len(workers)}
    r = make_router("prefix")
    d = r.choose(workers, overlap)
    least = min(x.load for x in workers)
    chosen = next(x for x in workers if x.worker_id == d.worker_id)
    assert chosen.load <= least + 0.25 + 1e-9
