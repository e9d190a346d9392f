"""What `pagoda quantize` is asked to do: one frozen record built from the command line, and which
methods each scheme takes. Torch-free: the CLI parser reads its defaults from here.

Methods per scheme (the first is the default), as LLM Compressor pairs them:
    W4A16, W4A16_ASYM, W8A16
                   gptq | rtn | awq        weight-only integers (W4A16_ASYM: with zero points)
    W8A8           smoothquant | smoothquant+rtn | gptq | rtn
                   (smoothquant moves activation outliers into the weights, then gptq or rtn
                   quantizes the weights)
    FP8_DYNAMIC    rtn                     float8 e4m3 per channel: no calibration
    2:4            sparsegpt | magnitude   pruning only
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS_BY_SCHEME: dict[str, tuple[str, ...]] = {
    "W4A16": ("gptq", "rtn", "awq"),
    "W4A16_ASYM": ("gptq", "rtn", "awq"),
    "W8A16": ("gptq", "rtn", "awq"),
    "W8A8": ("smoothquant", "smoothquant+rtn", "gptq", "rtn"),
    "FP8_DYNAMIC": ("rtn",),
    "2:4": ("sparsegpt", "magnitude"),
}
OBSERVERS = ("minmax", "mse")  # how a scale's range is chosen (pagoda/compress/rtn.py)
RUNS_GPTQ = frozenset({"gptq", "smoothquant"})  # the methods whose weights GPTQ quantizes
ALL_METHODS = tuple(dict.fromkeys(m for methods in METHODS_BY_SCHEME.values() for m in methods))

# what each method needs the calibration pass to collect at every linear's input
NEEDS_HESSIAN = frozenset({"gptq", "smoothquant", "sparsegpt"})
NEEDS_ABSMAX = frozenset({"smoothquant", "smoothquant+rtn"})
NEEDS_SAMPLES = frozenset({"awq"})


def resolve_method(scheme: str, method: str | None) -> str:
    """The method to run for `scheme` (its default when `method` is None); a ValueError naming
    the valid ones when the pair does not go together."""
    if scheme not in METHODS_BY_SCHEME:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(METHODS_BY_SCHEME)}")
    valid = METHODS_BY_SCHEME[scheme]
    if method is None:
        return valid[0]
    if method not in valid:
        known = "" if method in ALL_METHODS else f" (methods: {', '.join(ALL_METHODS)})"
        raise ValueError(
            f"method {method!r} does not apply to scheme {scheme}{known}; {scheme} takes {', '.join(valid)}"
        )
    return method


def resolve_observer(method: str, observer: str | None) -> str:
    """`observer`, or when None the method's default: "mse" where GPTQ quantizes, "minmax" (each
    group's own range) elsewhere. On the demo (W4A16 g64, docs/perf.md) mse scales with actorder
    took GPTQ from 1.16x to 1.07x the dense perplexity, while RTN gained nothing (1.474 -> 1.470,
    and 1.335 -> 1.408 asymmetric): GPTQ moves a clipped weight's error onto the inputs after it,
    RTN leaves it where it falls."""
    if observer is None:
        return "mse" if method in RUNS_GPTQ else "minmax"
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; use one of {', '.join(OBSERVERS)}")
    return observer


def needs_calibration(method: str) -> bool:
    return method in NEEDS_HESSIAN | NEEDS_ABSMAX | NEEDS_SAMPLES


@dataclass(frozen=True)
class QuantizeOptions:
    model: str  # an HF directory, a Hub id or a GGUF file
    scheme: str  # W4A16 | W8A16 | W8A8 | FP8_DYNAMIC | 2:4
    output: str  # the directory to write
    method: str | None = None  # None: the scheme's default (METHODS_BY_SCHEME)
    group_size: int | None = None  # None: the scheme's default
    calibration: str = "builtin"  # "builtin" (half of the pydoc topics, see corpus.py) or a text file
    num_samples: int = 64  # calibration sequences
    seq_len: int = 256  # tokens per calibration sequence
    sample_rows: int = 4096  # AWQ: activation rows kept per linear input for the scale search
    observer: str | None = None  # "minmax" or "mse" (rtn.py); None: resolve_observer's default
    actorder: bool = True  # GPTQ: sweep inputs in decreasing Hessian diagonal, static groups
    dampening_frac: float = 0.01  # GPTQ, SparseGPT: damping added to the Hessian, x its mean diagonal

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"--group-size must be positive, got {self.group_size}")
        if not self.dampening_frac > 0:
            raise ValueError(f"--dampening-frac must be positive, got {self.dampening_frac}")
