"""Random PEFT LoRA adapters for the tiny models (tests/tiny_models.py), and HF + PEFT's greedy
tokens and log-probs with each: the reference multi-LoRA serving must match."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

# rank, alpha, rsLoRA, targets, layers (None: all): different ranks, targets and scalings
ADAPTERS: dict[str, tuple[int, int, bool, list[str], list[int] | None]] = {
    "qv8": (8, 16, False, ["q_proj", "v_proj"], None),
    "all4": (
        4,
        8,
        False,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        None,
    ),
    "mlp16": (16, 32, True, ["o_proj", "gate_proj", "down_proj"], None),
    "ku2": (2, 4, False, ["k_proj", "up_proj"], [1]),
}


def make_adapter(hf: Any, path: Path, name: str, seed: int) -> None:
    """Save adapter `name` of ADAPTERS for `hf` (left unchanged) to `path`, A and B random (PEFT
    starts B at zero, which would hide every mistake)."""
    from peft import LoraConfig, get_peft_model

    rank, alpha, rslora, targets, layers = ADAPTERS[name]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, layers_to_transform=layers
    )
    model = get_peft_model(copy.deepcopy(hf), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(path))


def peft_greedy(hf: Any, adapter: Path | None, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """HF (+ PEFT adapter `adapter`) greedy: the tokens and each one's log-prob, float32."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)) if adapter is not None else hf
    ids, lps = list(prompt), []
    with torch.inference_mode():
        for _ in range(new):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            tok = int(logp.argmax())
            ids.append(tok)
            lps.append(float(logp[tok]))
    return ids[len(prompt) :], lps
