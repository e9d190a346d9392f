"""Where Triton kernels can run, and the launch-time facts every launcher needs.

Triton compiles for CUDA and ROCm GPUs. On a machine without one, kernels run only under Triton's
interpreter (`TRITON_INTERPRET=1`, numpy on the CPU), which must be set before the kernel modules
are imported: `triton.jit` picks interpreter or compiler when it decorates a function.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """True where Triton kernels can run on tensors of `device`: a GPU, or the CPU under the
    interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def check_triton(device: torch.device) -> None:
    """Raise a ValueError that names the fix when Triton kernels cannot run on `device`."""
    if not triton_installed():
        raise ValueError(
            "the triton attention backend needs the triton package; install pagoda[triton] "
            "or use --attention-backend torch"
        )
    if not triton_usable(device):
        raise ValueError(
            f"Triton kernels need a CUDA or ROCm GPU (device is {device.type}); use "
            "--attention-backend torch, or set TRITON_INTERPRET=1 to run them (slowly) on the CPU"
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels compute their `tl.dot`s in float32 (IEEE, not tf32): always under the
    interpreter, which computes bf16 `tl.dot` wrongly (Triton 3.x), and for float32 inputs on a
    GPU, where Triton's default would round them to tf32 (~1e-3 relative error). On a GPU, half
    inputs feed the tensor cores as they are."""
    return interpreting() or dtype == torch.float32


def launch_options(num_warps: int | None, num_stages: int | None) -> dict[str, int]:
    """The Triton launch options a launcher was given (None: Triton's default)."""
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return {name: val for name, val in opts.items() if val is not None}
