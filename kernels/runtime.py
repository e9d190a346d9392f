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


def dot_upcast() -> bool:
    """The interpreter computes bf16 `tl.dot` wrongly (Triton 3.x): kernels upcast their dot
    operands to float32 there. On a GPU they feed the tensor cores in the input dtype."""
    return interpreting()
