"""The one block-hash function: the worker's block pool and the cluster router both use it.

A block's hash chains its parent's: hash(parent_hash, token_ids, extra_keys). Only full blocks are
hashed. The digest is stable across processes and machines (no Python `hash()`), so a hash a worker
publishes means the same block to every router.

A block computed under a LoRA adapter holds other keys and values than the base model's: its hash
is taken in another domain (blake2b's personalization), keyed by the adapter's name, so prefix
reuse never crosses adapters and no cache salt can collide with an adapter name. Blocks without
an adapter hash as they always did.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes

_ROOT = b"pagoda-kv-v1"
_LORA_DOMAIN = b"pagoda-lora"


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[str] = (),
    lora_name: str | None = None,
) -> BlockHash:
    """`lora_name`: the adapter the block was computed with (None: the base model)."""
    if lora_name is None:
        h = hashlib.blake2b(digest_size=16)
    else:
        h = hashlib.blake2b(digest_size=16, person=_LORA_DOMAIN)
        name = lora_name.encode()
        h.update(len(name).to_bytes(4, "little") + name)
    h.update(parent if parent is not None else _ROOT)
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        h.update(b"\x00")
        h.update(key.encode())
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str] = (),
    *,
    start: int = 0,
    parent: BlockHash | None = None,
    lora_name: str | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from block index `start` on; `parent` is the hash
    of block `start - 1` (None when start is 0). Extra keys (e.g. a cache salt) and the LoRA
    adapter's name (a request's `lora_name`; None: the base model) enter every block."""
    hashes: list[BlockHash] = []
    for first in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[first : first + block_size], extra_keys, lora_name)
        hashes.append(parent)
    return hashes
