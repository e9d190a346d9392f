"""The quantization schemes `pagoda quantize` offers, named as compressed-tensors / llmcompressor
name their presets, so a user who knows one knows the other."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pagoda.compress.options import OBSERVERS
from pagoda.engine.quantization.weights import ActQuant

DEFAULT_GROUP_SIZE = 128  # W4A16's default, as in llmcompressor's preset
GROUP_MULTIPLE = 32  # the group sizes suggested in errors: multiples of this (kernel tiles)


@dataclass(frozen=True)
class Scheme:
    name: str  # "W4A16" | "W4A16_ASYM" | "W8A16" | "W8A8" | "FP8_DYNAMIC" | "2:4"
    bits: int  # 4 or 8 (8 for FP8 too)
    group_size: int | None  # None: one scale per output channel
    symmetric: bool  # False: an integer zero point per scale (W4A16_ASYM)
    act: ActQuant  # None | "int8" | "fp8": activations quantized per token at run time
    float_codes: bool  # FP8: codes are torch.float8_e4m3fn
    sparse_24: bool  # 2:4 pruning (the "2:4" scheme is sparsity only: weights stay float)
    observer: str = "minmax"  # one of OBSERVERS

    @property
    def quantizes_weights(self) -> bool:
        """False for the sparsity-only "2:4" scheme."""
        return self.name != "2:4"

    @property
    def qmax(self) -> int:
        """The largest symmetric integer code (7 at 4 bits, 127 at 8)."""
        return 2 ** (self.bits - 1) - 1


SCHEMES: dict[str, Scheme] = {
    "W4A16": Scheme("W4A16", 4, DEFAULT_GROUP_SIZE, True, None, False, False),
    "W4A16_ASYM": Scheme("W4A16_ASYM", 4, DEFAULT_GROUP_SIZE, False, None, False, False),
    "W8A16": Scheme("W8A16", 8, None, True, None, False, False),
    "W8A8": Scheme("W8A8", 8, None, True, "int8", False, False),
    "FP8_DYNAMIC": Scheme("FP8_DYNAMIC", 8, None, True, "fp8", True, False),
    "2:4": Scheme("2:4", 8, None, True, None, False, True),  # bits unused: weights stay float
}


def parse_scheme(name: str, group_size: int | None = None, observer: str = "minmax") -> Scheme:
    """The scheme called `name` (case-insensitive), with `group_size` replacing its default when
    given and `observer` choosing its scales. The weight-only integer schemes (W4A16, W4A16_ASYM,
    W8A16) take groups; W8A8 and FP8_DYNAMIC pair per-channel weights with per-token activations,
    so their scale is one per row, and 2:4 does not quantize: they reject a group size."""
    scheme = SCHEMES.get(name.upper())
    if scheme is None:
        raise ValueError(f"unknown quantization scheme {name!r}; valid schemes: {', '.join(SCHEMES)}")
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; use one of {', '.join(OBSERVERS)}")
    scheme = replace(scheme, observer=observer)
    if group_size is None:
        return scheme
    if group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    if scheme.act is not None or not scheme.quantizes_weights:
        raise ValueError(
            f"scheme {scheme.name} takes no group size (got {group_size}); only W4A16, W4A16_ASYM and "
            "W8A16 have groups"
        )
    return replace(scheme, group_size=group_size)


def suggested_group_sizes(in_features: int, wanted: int, count: int = 4) -> list[int]:
    """Up to `count` divisors of `in_features` closest to `wanted`, ascending: multiples of
    GROUP_MULTIPLE when there are any, else any divisor of at least 8."""
    divisors = [d for d in range(1, in_features) if in_features % d == 0]
    pick = [d for d in divisors if d % GROUP_MULTIPLE == 0] or [d for d in divisors if d >= 8]
    return sorted(sorted(pick, key=lambda d: (abs(d - wanted), d))[:count])


def check_group_size(scheme: Scheme, in_features: int, layer: str) -> None:
    """Raise ValueError when `scheme`'s groups do not tile `layer`'s inputs, naming sizes that do."""
    g = scheme.group_size
    if g is None or in_features % g == 0:
        return
    options = suggested_group_sizes(in_features, g)
    hint = f"use one of {', '.join(map(str, options))}" if options else "use no group size"
    raise ValueError(f"group size {g} does not divide layer {layer}'s {in_features} inputs; {hint}")
