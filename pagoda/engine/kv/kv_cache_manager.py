"""Per-request block tables on top of the BlockPool, with automatic prefix caching.

Invariants: every block id in a request's table has ref_cnt >= 1; a request holds exactly
ceil(num_computed_tokens_after_step / block_size) blocks after allocate_slots; full blocks whose
tokens are known are hashed (chained) and entered in the pool's cache index.

Live tokens: the KV slots that hold a token, each shared block counted once. Only full blocks are
shared, so live = (tokens over all block tables) - block_size * (table entries - blocks in use);
the figures are kept as counters, so reading them costs nothing per step.
"""

from __future__ import annotations

from pagoda.engine.kv.block_hash import hash_full_blocks
from pagoda.engine.kv.block_pool import BlockPool
from pagoda.engine.scheduling.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already entered in the index
        self._req_tokens: dict[str, int] = {}  # tokens each request's blocks hold after its step
        self.num_table_tokens = 0  # sum of _req_tokens
        # prefix-cache counters (queries/hits in tokens), for metrics
        self.query_tokens = 0
        self.hit_tokens = 0

    def usage(self) -> float:
        return self.pool.usage()

    def live_tokens(self) -> int:
        """Tokens stored in the blocks in use (a block shared by k requests counts once)."""
        pool = self.pool
        return self.num_table_tokens - self.block_size * (pool.num_refs - pool.num_used_blocks)

    def live_token_ratio(self) -> float:
        """Live tokens / slots of the blocks in use (0.0 when no block is in use)."""
        used = self.pool.num_used_blocks
        return self.live_tokens() / (used * self.block_size) if used else 0.0

    def blocks_of(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix of the request's tokens (full blocks only, and never
        all tokens: the last token is always recomputed so there are logits to sample from)."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.query_tokens += request.num_tokens
        self.hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make room for num_new_tokens more tokens after the request's computed (or cached)
        ones. Returns the newly allocated block ids, or None (and changes nothing) when the pool
        has too few free blocks."""
        cached_blocks = cached_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        assert not (cached_blocks and blocks), "cached prefix given for a request holding blocks"
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        need = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(cached_blocks)
        # cached blocks sitting in the free queue are taken from it by touch()
        evictable_hits = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)
        if need + evictable_hits > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(cached_blocks)
        blocks.extend(cached_blocks)
        new_blocks = self.pool.allocate(max(need, 0))
        blocks.extend(new_blocks)
        held = num_computed + num_new_tokens
        self.num_table_tokens += held - self._req_tokens.get(request.request_id, 0)
        self._req_tokens[request.request_id] = held
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def trim(self, request: Request) -> None:
        """Shrink the request's table to its computed tokens after a speculative step: the blocks
        only rejected drafts reached go back to the pool (the rejected KV in the blocks kept is
        overwritten by the next step). They were never cached: hashes cover verified tokens only."""
        rid = request.request_id
        blocks = self.req_blocks[rid]
        keep = cdiv(request.num_computed_tokens, self.block_size)
        assert keep >= self._num_cached_blocks.get(rid, 0), (request, keep, self._num_cached_blocks.get(rid))
        if len(blocks) > keep:
            self.pool.free(reversed(blocks[keep:]))
            del blocks[keep:]
        held = request.num_computed_tokens
        self.num_table_tokens += held - self._req_tokens.get(rid, 0)
        self._req_tokens[rid] = held

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.num_table_tokens -= self._req_tokens.pop(request.request_id, 0)
        self.pool.free(reversed(blocks))

    def _update_hashes(self, request: Request) -> None:
        have = len(request.block_hashes)
        if request.num_tokens >= (have + 1) * self.block_size:
            parent = request.block_hashes[-1] if have else None
            request.block_hashes.extend(
                hash_full_blocks(
                    request.all_token_ids,
                    self.block_size,
                    request.extra_keys,
                    start=have,
                    parent=parent,
                    lora_name=request.lora_key,
                )
            )

    def _cache_full_blocks(self, request: Request, num_tokens_after_step: int) -> None:
        if not self.enable_prefix_caching:
            return
        self._update_hashes(request)
        blocks = self.req_blocks[request.request_id]
        num_full = min(num_tokens_after_step // self.block_size, len(request.block_hashes))
        done = self._num_cached_blocks.get(request.request_id, 0)
        for i in range(done, num_full):
            self.pool.cache(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = max(done, num_full)
