"""Which quantized layer kinds a test expects: torch's kernels name theirs by kernel ("int4 g32",
"int8 per channel", "w8a8 int8 (fbgemm)"); pagoda's own CPU kernel runs every integer weight as a
VnniLinear of the same width ("int4 g32 (pagoda VNNI, int16 activations)"; W8A8 as "int8 per
channel (pagoda VNNI[, AMX], int8 activations per token)"; AVX2 for VNNI on a CPU without
AVX-512)."""

from __future__ import annotations

from collections.abc import Iterable

from pagoda.engine.quantization.linear import QuantizedLinear, native_kernels


def weight_only_acts(gguf: bool = False) -> str:
    """How pagoda's kernel names the activations of a weight-only layer here (the kind's end): 16
    bits, or in a GGUF's linears 8 in generated rows and 16 in prompt rows (bf16 on CPUs with
    AVX512-BF16)."""
    import torch

    prompts = ", prompts int16" if gguf else ""
    if torch.ops.pagoda_cpu.wgemm_runs():  # AVX512-BF16: a bf16 model's prompt rows in bf16
        prompts = ", prompts bf16" + (" on AMX" if torch.ops.pagoda_cpu.amx() else "")
    return f"int{8 if gguf else 16} activations{prompts})"


def assert_kinds(layers: Iterable[QuantizedLinear], torch_kinds: set[str]) -> None:
    kinds = {m.kind for m in layers}
    if torch_kinds == {"fp8"}:  # fp8 is dequantized per tile on either kernel
        assert len(kinds) == 1 and kinds <= {"fp8", "fp8 (pagoda, dequantized per tile)"}, kinds
    elif native_kernels("qgemm"):
        width = {"int4" if k.startswith("int4") else "int8" for k in torch_kinds}
        acts = "int8 activations per token)" if torch_kinds == {"w8a8 int8 (fbgemm)"} else weight_only_acts()
        assert {k.split()[0] for k in kinds} == width, kinds
        assert all(k.startswith(f"{w} ") and k.endswith(acts) for k in kinds for w in width), kinds
    else:
        assert kinds == torch_kinds
