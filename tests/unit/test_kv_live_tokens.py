"""The KV pool's live-token figures: tokens stored / slots of the blocks in use, a shared prefix
block counted once, exact on a small known workload; and their Prometheus gauges."""

from __future__ import annotations

from pagoda.engine.config import BatcherConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher
from pagoda.engine.scheduling.request import Request
from pagoda.services.ops.metrics import Metrics


def _req(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4))


def test_live_tokens_count_a_shared_block_once() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert (kv.live_tokens(), kv.live_token_ratio()) == (0, 0.0)
    a = _req("a", [1, 2, 3, 4, 5, 6])
    assert kv.allocate_slots(a, 6) is not None  # 2 blocks: 4 + 2 tokens
    assert (kv.live_tokens(), kv.pool.num_used_blocks, kv.live_token_ratio()) == (6, 2, 0.75)

    b = _req("b", [1, 2, 3, 4, 9, 9, 9])
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 1  # a's first block
    assert kv.allocate_slots(b, 3, cached_blocks=hits) is not None  # one new block of 3 tokens
    # blocks in use: shared [1..4], a's [5, 6], b's [9, 9, 9]
    assert (kv.live_tokens(), kv.pool.num_used_blocks, kv.live_token_ratio()) == (9, 3, 0.75)

    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 1) == []  # a decodes one token into its half-full block
    assert (kv.live_tokens(), kv.pool.num_used_blocks) == (10, 3)

    kv.free(a)  # the shared block stays with b
    assert (kv.live_tokens(), kv.pool.num_used_blocks, kv.live_token_ratio()) == (7, 2, 7 / 8)
    kv.free(b)
    assert (kv.live_tokens(), kv.pool.num_used_blocks, kv.pool.num_refs) == (0, 0, 0)


def test_live_tokens_through_the_scheduler_and_metrics() -> None:
    core = EngineCore.__new__(EngineCore)  # no model: scheduler + cache are enough for counters()
    core.model_name = "tiny"
    core.kv = KVCacheManager(16, block_size=4)
    core.batcher = Batcher(BatcherConfig(max_num_batched_tokens=64), core.kv, 64, [0])
    for i, n in enumerate((5, 8, 3)):
        core.batcher.add_request(_req(f"r{i}", list(range(100 * i + 1, 100 * i + 1 + n))))
    core.batcher.schedule()  # 16 tokens in 2 + 2 + 1 blocks of 4
    c = core.counters()
    assert (c.kv_live_tokens, c.kv_used_slots) == (16, 20)
    assert c.kv_live_token_ratio == 0.8

    metrics = Metrics()
    metrics.engines().add("w0", core)
    text = metrics.render().decode()
    assert 'pagoda:kv_cache_live_token_ratio{engine="w0",model_name="tiny"} 0.8' in text
    assert 'pagoda:kv_cache_live_tokens{engine="w0",model_name="tiny"} 16.0' in text
    assert 'pagoda:kv_cache_used_slots{engine="w0",model_name="tiny"} 20.0' in text
