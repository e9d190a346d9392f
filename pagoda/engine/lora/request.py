"""What names a LoRA adapter: `LoRARequest` (vLLM's shape). No torch: the services import it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter directory served under `lora_name` (what clients put in `model`).

    `lora_int_id` (>= 1) tells registrations apart inside one engine: it keys the adapter's slot
    and its CPU copy. The prefix cache is keyed by the name instead (the cluster router knows
    names, not ids): see `LoRARegistry.cache_key`."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("a LoRA adapter needs a name")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1, got {self.lora_int_id}")
