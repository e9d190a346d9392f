"""Adapters on one engine: which names may be requested, their tensors in CPU memory, and the
`max_loras` slots the model's projections compute with.

- The registry: name -> LoRARequest, what `add_lora` loaded and `remove_lora` has not removed.
- The CPU cache: up to `max_cpu_loras` adapters' tensors (float32, B scaled), least recently used
  evicted first; an adapter evicted from it is read from its directory again when a step needs it.
- The slots: an adapter is copied into a slot (in the run dtype) when a step first needs it, into
  a free slot or over the least recently used adapter that no running sequence holds. The batcher
  runs at most `max_loras` distinct adapters at once, so a slot is always found.

Unloading is deferred, as in vLLM (whose requests carry their adapter's path, so a worker
reloads it for a running request): `remove` unregisters the name at once (new requests naming it
are refused), while requests that hold it run to the end with it; its tensors are dropped when the
last of them finishes. Everything here runs on the engine's step thread.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch

from pagoda.engine.config import LoRAConfig
from pagoda.engine.lora.layers import TARGET_SLICES, LoRAStep, add_lora_layers
from pagoda.engine.lora.peft_adapter import AdapterWeights, load_adapter, projection_shapes
from pagoda.engine.lora.request import LoRARequest
from pagoda.engine.models import DecoderModel, Model

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: Model, config: LoRAConfig, dtype: torch.dtype, device: torch.device) -> None:
        """Wraps `model`'s projections (after any quantization or packing of its linears)."""
        if not isinstance(model, DecoderModel):
            raise ValueError(f"LoRA adapters are served on decoders, not on {type(model).__name__}")
        cfg = model.cfg
        self.config = config
        self.device = device
        self.dtype = dtype
        self.num_layers: int = cfg.num_layers
        self.shapes = projection_shapes(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        )
        self.ctx, self.layers = add_lora_layers(
            cfg, model.layers, config.max_loras, config.max_lora_rank, dtype, device
        )
        self.registry: dict[str, LoRARequest] = {}
        self._keys: dict[int, str] = {}  # lora_int_id -> its prefix-cache key
        self._registrations: Counter[str] = Counter()  # name -> times registered
        self._users: Counter[int] = Counter()  # lora_int_id -> live requests holding it
        self._cpu: OrderedDict[int, AdapterWeights] = OrderedDict()  # LRU first
        self._retired: dict[int, LoRARequest] = {}  # removed while requests still held them
        self._slots: list[int | None] = [None] * config.max_loras  # lora_int_id per slot
        self._slot_used = [0] * config.max_loras  # the step that last used each slot
        self._steps = 0
        self._last_id = 0
        self.num_slot_loads = 0  # adapters copied into a slot (metrics, tests)

    # -- registration (add_lora / remove_lora) ---------------------------------------------------
    def add(self, lora: LoRARequest) -> bool:
        """Load and check `lora` (ValueError naming what is wrong) and register its name; False
        when that very adapter is registered already."""
        held = self.registry.get(lora.lora_name)
        if held == lora:
            return False
        if held is not None:
            raise ValueError(
                f"a LoRA adapter named {lora.lora_name!r} is loaded already (from {held.lora_path}); "
                "unload it first"
            )
        if lora.lora_int_id in self._keys:
            raise ValueError(f"lora_int_id {lora.lora_int_id} is in use by another adapter; pick another id")
        self._cache(lora.lora_int_id, self._read(lora))
        self._last_id = max(self._last_id, lora.lora_int_id)
        self._registrations[lora.lora_name] += 1
        n = self._registrations[lora.lora_name]
        # a name loaded again may bring other weights: its blocks must not meet the old ones'
        self._keys[lora.lora_int_id] = lora.lora_name if n == 1 else f"{lora.lora_name}#{n}"
        self.registry[lora.lora_name] = lora
        logger.info(
            "LoRA adapter %r loaded from %s (id %d)", lora.lora_name, lora.lora_path, lora.lora_int_id
        )
        return True

    def remove(self, name: str) -> bool:
        """Unregister `name` (False if unknown); requests holding it finish with it."""
        lora = self.registry.pop(name, None)
        if lora is None:
            return False
        if self._users[lora.lora_int_id]:
            self._retired[lora.lora_int_id] = lora
        else:
            self._forget(lora.lora_int_id)
        logger.info("LoRA adapter %r unloaded", name)
        return True

    def next_id(self) -> int:
        """An id no adapter of this engine has had."""
        return self._last_id + 1

    def resolve(self, lora: str | LoRARequest) -> LoRARequest:
        """The registered adapter a request names (a LoRARequest not yet registered is added)."""
        if isinstance(lora, LoRARequest):
            self.add(lora)
            return lora
        held = self.registry.get(lora)
        if held is None:
            loaded = ", ".join(sorted(self.registry)) or "none"
            raise ValueError(f"unknown LoRA adapter {lora!r} (loaded: {loaded}); load it first")
        return held

    def cache_key(self, lora: LoRARequest) -> str:
        """The prefix-cache key of its blocks: the name (what the cluster router hashes with), with
        a registration count after it when the name was loaded before."""
        return self._keys[lora.lora_int_id]

    # -- requests holding adapters ----------------------------------------------------------------
    def acquire(self, lora: LoRARequest) -> None:
        self._users[lora.lora_int_id] += 1

    def release(self, lora: LoRARequest) -> None:
        lid = lora.lora_int_id
        self._users[lid] -= 1
        assert self._users[lid] >= 0, (lora, self._users[lid])
        if not self._users[lid]:
            del self._users[lid]
            if lid in self._retired:
                del self._retired[lid]
                self._forget(lid)

    # -- the step ----------------------------------------------------------------------------------
    def prepare_step(
        self, loras: Sequence[LoRARequest | None], query_lens: Sequence[int], running: set[int]
    ) -> LoRAStep | None:
        """Slot every adapter of this step's sequences (in row order, `query_lens` rows each) and
        set the step's rows on the model; `running`: the adapter ids of every running sequence
        (their slots are not taken). Returns the step (None: no row has an adapter)."""
        self._steps += 1
        segments: list[tuple[int, int, int]] = []
        row = 0
        protected = running | {lo.lora_int_id for lo in loras if lo is not None}
        for lora, n in zip(loras, query_lens, strict=True):
            if lora is not None:
                slot = self._activate(lora, protected)
                if segments and segments[-1][2] == slot and sum(segments[-1][:2]) == row:
                    first, m, _ = segments.pop()
                    segments.append((first, m + n, slot))
                else:
                    segments.append((row, n, slot))
            row += n
        step = (
            LoRAStep.build(segments, row, self.config.max_lora_rank, self.device, self.dtype)
            if segments
            else None
        )
        self.ctx.step = step
        return step

    def _activate(self, lora: LoRARequest, protected: set[int]) -> int:
        lid = lora.lora_int_id
        if lid in self._slots:
            slot = self._slots.index(lid)
        else:
            free = [i for i, held in enumerate(self._slots) if held is None or held not in protected]
            assert free, (lid, self._slots, protected)  # the batcher runs at most max_loras adapters
            slot = min(free, key=lambda i: (self._slots[i] is not None, self._slot_used[i]))
            self._load_slot(slot, lora)
        self._slot_used[slot] = self._steps
        return slot

    def _load_slot(self, slot: int, lora: LoRARequest) -> None:
        weights = self._cpu.get(lora.lora_int_id)
        if weights is None:  # evicted from the CPU cache (or unloaded while running): read again
            weights = self._read(lora)
            self._cache(lora.lora_int_id, weights)
        self._cpu.move_to_end(lora.lora_int_id)
        for layer, mods in enumerate(self.layers):
            for target, (proj, sub) in TARGET_SLICES.items():
                if proj in mods:
                    a_b = weights.modules.get((layer, target))
                    mods[proj].set_slot(slot, sub, *(a_b if a_b is not None else (None, None)))
        self._slots[slot] = lora.lora_int_id
        self.num_slot_loads += 1

    # -- internals ---------------------------------------------------------------------------------
    def _read(self, lora: LoRARequest) -> AdapterWeights:
        return load_adapter(lora.lora_path, self.shapes, self.num_layers, self.config.max_lora_rank)

    def _cache(self, lid: int, weights: AdapterWeights) -> None:
        self._cpu[lid] = weights
        self._cpu.move_to_end(lid)
        while len(self._cpu) > self.config.cpu_loras:
            self._cpu.popitem(last=False)

    def _forget(self, lid: int) -> None:
        self._cpu.pop(lid, None)
        self._keys.pop(lid, None)
        if lid in self._slots:
            self._slots[self._slots.index(lid)] = None

    def loaded(self) -> list[str]:
        """The registered adapters' names (what a worker announces)."""
        return sorted(self.registry)
