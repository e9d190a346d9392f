"""Multi-LoRA serving: many PEFT adapters over one base model, batched in one step.

- request.py: `LoRARequest` (name, id, path), what a request names its adapter with (no torch)
- peft_adapter.py: reading and checking PEFT adapter directories
- layers.py: the projections' wrapper that adds each token's adapter (shrink, then expand)
- manager.py: the registry, the CPU cache (LRU) and the `max_loras` slots
- engine_api.py: EngineCore's add/load/remove/list adapter methods
"""
