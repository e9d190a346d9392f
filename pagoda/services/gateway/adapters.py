"""LoRA adapters a deployment serves: names clients put in `model`, each over a base model.

The directory lives in the store (hash `loras`: adapter name -> JSON `{"path", "parent"}`), so
every gateway of a deployment answers for one set of adapters, and workers drop the adapters that
left it. `--lora-modules` registers adapters when a gateway starts; `POST /v1/load_lora_adapter`
and `/v1/unload_lora_adapter` change the set at run time. A gateway keeps a copy, refreshed every
`refresh_s` and at once after its own changes: the request path reads only the copy. A request
for an adapter carries its name and path to the worker, which loads it on first use (the path
must be readable there: a shared volume or the same host).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pagoda.services.scheduler.registry import ADAPTERS as KEY
from pagoda.services.scheduler.registry import Refreshed
from pagoda.services.transport.store import Store

logger = logging.getLogger("pagoda.gateway")


@dataclass(frozen=True)
class Adapter:
    name: str  # what clients put in `model`
    path: str  # the PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    parent: str  # the base model's served name


class AdapterDirectory(Refreshed):
    """The deployment's adapters (see the module docstring). `get` never awaits."""

    def __init__(
        self, store: Store, max_lora_rank: int, refresh_s: float = 1.0, initial: tuple[Adapter, ...] = ()
    ) -> None:
        self.store = store
        self.initial = initial  # --lora-modules: registered when the gateway starts
        self.max_lora_rank = max_lora_rank  # --max-lora-rank: adapters of a higher rank are refused
        self.refresh_s = refresh_s
        self._adapters: dict[str, Adapter] = {}

    @property
    def refresh_interval_s(self) -> float:
        return self.refresh_s

    def get(self, name: str | None) -> Adapter | None:
        return self._adapters.get(name or "")

    def of(self, parent: str) -> list[Adapter]:
        """The adapters over model `parent`, by name."""
        return sorted((a for a in self._adapters.values() if a.parent == parent), key=lambda a: a.name)

    async def register(self, adapter: Adapter) -> None:
        await self.store.hset(
            KEY, {adapter.name: json.dumps({"path": adapter.path, "parent": adapter.parent})}
        )
        self._adapters[adapter.name] = adapter

    async def remove(self, name: str) -> bool:
        """False when no adapter of that name is registered."""
        removed = await self.store.hdel(KEY, name) > 0
        self._adapters.pop(name, None)
        return removed

    async def refresh(self) -> None:
        try:
            fields = await self.store.hgetall(KEY)
        except Exception as exc:  # the store is down: keep serving the adapters we knew
            logger.debug("adapters: cannot read the directory: %s", exc)
            return
        self._adapters = dict(_decoded(fields))

    async def start(self) -> None:
        for adapter in self.initial:
            await self.register(adapter)
        await super().start()


def _decoded(fields: dict[str, str]) -> list[tuple[str, Adapter]]:
    """The store's entries as adapters; an entry that does not decode is logged and skipped."""
    result = []
    for name, raw in fields.items():
        try:
            entry = json.loads(raw)
            result.append((name, Adapter(name, str(entry["path"]), str(entry["parent"]))))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("adapters: skipped the malformed entry %r: %s", name, exc)
    return result


def checked_modules(
    modules: tuple[tuple[str, str, str | None], ...], models: list[str], max_lora_rank: int
) -> tuple[Adapter, ...]:
    """--lora-modules (name, path, base model or None: the first of `models`) as adapters, each
    checked; ValueError names the module that cannot be served."""
    from pagoda.engine import read_adapter_config

    adapters = []
    for name, path, base in modules:
        if base is not None and base not in models:
            raise ValueError(f"--lora-modules {name}: base_model_name {base!r} is not served here")
        try:
            read_adapter_config(path, max_lora_rank)
        except (ValueError, OSError) as exc:
            raise ValueError(f"--lora-modules {name}={path}: {exc}") from None
        adapters.append(Adapter(name, path, base or models[0]))
    return tuple(adapters)
