"""Physical KV blocks: refcounts, an LRU free list and the prefix-cache index.

Ownership: the pool owns every block id in [0, num_blocks). A block is either referenced
(ref_cnt > 0, held by one or more requests) or free (ref_cnt == 0, in the free queue). A free
block may still be cached (it keeps its hash) until it is handed out again, at which point it is
evicted from the index. Freed blocks go to the tail of the free queue, allocations take from the
head, so the least recently used cached blocks are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from pagoda.engine.kv.block_hash import BlockHash


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        assert num_blocks > 0, num_blocks
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.num_refs = 0  # sum of ref_cnt: block-table entries over all requests
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # Hashes stored and evicted since the last drain, for the cluster's prefix index.
        self.stored_events: list[BlockHash] = []
        self.evicted_events: list[BlockHash] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue (ref_cnt 1 each)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        ids: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        self.num_refs += n
        return ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (prefix-cache hits)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1
            self.num_refs += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free-queue tail in the
        order given (callers pass a request's blocks tail first, so its last blocks evict first)."""
        for block_id in block_ids:
            assert self.ref_cnt[block_id] > 0, (block_id, self.ref_cnt[block_id])
            self.ref_cnt[block_id] -= 1
            self.num_refs -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that block_id holds the full block with this hash."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:  # same content computed twice: keep the first copy
            return
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self.stored_events.append(block_hash)

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash cached now (a snapshot; safe to take from another thread)."""
        return list(self._cached)

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            self._evict(block_id)

    def drain_events(self) -> tuple[list[BlockHash], list[BlockHash]]:
        stored, evicted = self.stored_events, self.evicted_events
        self.stored_events, self.evicted_events = [], []
        return stored, evicted

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is None:
            return
        self.block_hash[block_id] = None
        if self._cached.get(block_hash) == block_id:
            del self._cached[block_hash]
            self.evicted_events.append(block_hash)
