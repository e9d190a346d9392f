"""The engine's LoRA adapter API (`EngineCore` inherits it): load, unload and list adapters, and
resolve the adapter a request names. Everything here runs on the engine's step thread; the
AsyncEngine posts these calls to it (pagoda/engine/core/async_engine.py)."""

from __future__ import annotations

from pagoda.engine.lora.manager import LoRAManager
from pagoda.engine.lora.request import LoRARequest


class LoRAEngineMixin:
    lora: LoRAManager | None  # None: the engine was started without --enable-lora

    def _lora_of(self, lora: str | LoRARequest | None) -> LoRARequest | None:
        if lora is None:
            return None
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters; start it with --enable-lora")
        return self.lora.resolve(lora)

    def add_lora(self, lora: LoRARequest) -> bool:
        """Load adapter `lora` (read and checked now: ValueError says what is wrong); False when it
        is loaded already."""
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters; start it with --enable-lora")
        return self.lora.add(lora)

    def load_lora(self, name: str, path: str) -> LoRARequest:
        """Load the PEFT adapter directory `path` as `name`, with an id of the engine's choosing."""
        lora = LoRARequest(name, self.lora.next_id() if self.lora is not None else 1, path)
        self.add_lora(lora)
        return lora

    def remove_lora(self, name: str) -> bool:
        """Unload adapter `name` (False: none is loaded): new requests cannot name it; those that
        hold it run to their end with it."""
        return self.lora is not None and self.lora.remove(name)

    def list_loras(self) -> list[str]:
        """The names of the loaded adapters (what a worker announces)."""
        return self.lora.loaded() if self.lora is not None else []
