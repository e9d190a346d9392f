"""Block pool and KV cache manager: refcounts, LRU eviction, prefix-cache hits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.kv.block_hash import hash_block, hash_full_blocks
from pagoda.engine.kv.block_pool import BlockPool
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.request import Request


def _req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_hash_is_chained_stable_and_salted() -> None:
    a = hash_full_blocks(list(range(40)), 16)
    assert len(a) == 2  # only full blocks
    assert a == hash_full_blocks(list(range(40)), 16)
    assert a[1] == hash_block(a[0], list(range(16, 32)))
    assert hash_full_blocks(list(range(40)), 16, ("salt",)) != a
    # same tokens under a different parent hash to something else
    assert hash_block(None, list(range(16, 32))) != a[1]
    # incremental hashing from a start block gives the same chain
    assert (
        hash_full_blocks(list(range(48)), 16, start=2, parent=a[1])
        == hash_full_blocks(list(range(48)), 16)[2:]
    )


def test_pool_lru_eviction_order() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]))
    pool.free(reversed(blocks))  # tail first: block 2 is evicted first
    assert pool.num_free_blocks == 4
    got = pool.allocate(2)  # the never-used block 3, then blocks[2]
    assert got == [3, blocks[2]]
    assert pool.lookup(bytes([2])) is None
    assert pool.lookup(bytes([0])) == blocks[0]
    _, evicted = pool.drain_events()
    assert evicted == [bytes([2])]


def test_prefix_hit_shares_blocks_and_keeps_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None
    b = _req("b", list(range(12)))
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2  # 12 tokens = 3 full blocks, but the last token is recomputed
    assert kv.allocate_slots(b, 12 - 8, hits) is not None
    assert kv.blocks_of("b")[:2] == kv.blocks_of("a")[:2]
    assert kv.pool.ref_cnt[hits[0]] == 2
    salted = _req("c", list(range(12)), salt="x")
    assert kv.find_cached_prefix(salted) == []
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 16
    assert all(r == 0 for r in kv.pool.ref_cnt)


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = _req("a", list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert kv.pool.num_free_blocks == 2
    assert kv.blocks_of("a") == []


ops = st.lists(
    st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5), st.integers(1, 20)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_manager_never_leaks_or_goes_negative(seq: list[tuple[str, int, int]]) -> None:
    kv = KVCacheManager(num_blocks=12, block_size=4)
    live: dict[str, Request] = {}
    for op, idx, n in seq:
        rid = f"r{idx}"
        if op == "add" and rid not in live:
            req = _req(rid, [idx % 3] * n)  # few distinct prompts -> many prefix hits
            hits = kv.find_cached_prefix(req)
            new = req.num_tokens - len(hits) * 4
            if kv.allocate_slots(req, new, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                live[rid] = req
        elif op == "grow" and rid in live:
            req = live[rid]
            for _ in range(n % 5 + 1):
                req.append_output(7)
            if kv.allocate_slots(req, req.num_tokens - req.num_computed_tokens) is not None:
                req.num_computed_tokens = req.num_tokens
            else:
                del req.all_token_ids[req.num_computed_tokens :]
                del req.output_token_ids[len(req.all_token_ids) - req.num_prompt_tokens :]
        elif op == "free" and rid in live:
            kv.free(live.pop(rid))
        pool = kv.pool
        assert all(c >= 0 for c in pool.ref_cnt)
        held: dict[int, int] = {}
        for r in live.values():
            blocks = kv.blocks_of(r.request_id)
            assert len(blocks) == -(-r.num_computed_tokens // 4)
            for b in blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(pool.num_blocks):
            assert pool.ref_cnt[b] == held.get(b, 0), (b, pool.ref_cnt[b], held.get(b, 0))
        # live tokens, counted the slow way: each block in use once, filled as far as any holder got
        fill: dict[int, int] = {}
        for r in live.values():
            for i, b in enumerate(kv.blocks_of(r.request_id)):
                fill[b] = max(fill.get(b, 0), min(4, r.num_computed_tokens - 4 * i))
        assert kv.live_tokens() == sum(fill.values()), (kv.live_tokens(), fill)
        assert pool.num_refs == sum(held.values())
        assert pool.num_free_blocks == sum(1 for c in pool.ref_cnt if c == 0)
    for r in list(live.values()):
        kv.free(r)
    assert kv.pool.num_free_blocks == 12
