"""`pagoda bench kernels`: each Triton kernel against PyTorch on the same inputs: time, achieved
memory bandwidth and FLOP rate, and the speedup over torch (SDPA, F.linear, eager ops).

On a GPU the shapes are Llama-3-8B's (32 query / 8 KV heads of 128, hidden 4096, MLP 14336),
decode attention at batch 64 x 4k context, and the device's copy bandwidth is measured first so
decode attention can be read as a fraction of it. Without a GPU the kernels run under Triton's
interpreter at toy shapes: the table shows the harness works, its times are not performance.
"""

from __future__ import annotations

import argparse
import os

import torch

from pagoda.load.kernel_cases import all_cases, copy_bandwidth, time_ms


def run_kernels(args: argparse.Namespace) -> int:
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bw = _print_device(device, args.dtype)
    if args.sweep:
        if not on_gpu:
            raise ValueError("--sweep tunes GPU launches; it needs a CUDA device")
        from pagoda.load.kernel_sweep import sweep

        sweep(device, dtype, what=args.sweep)
    _print_table(device, dtype, bw, args.only)
    if args.e2e:
        _print_e2e(args, device)
    return 0


def _device(asked: str) -> torch.device:
    """The device `--device` names (auto: a GPU when there is one); on the CPU, Triton's
    interpreter. Raises ValueError naming the fix when the device or Triton is missing."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    device = torch.device(asked if asked != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from pagoda.kernels.runtime import triton_installed

    if not triton_installed():
        raise ValueError("pagoda bench kernels needs triton: pip install 'pagoda[triton]'")
    return device


def _print_device(device: torch.device, dtype_name: str) -> float:
    """Prints what runs where; the GPU's copy bandwidth in bytes/s (0 on the CPU)."""
    if device.type != "cuda":
        print(
            "device: cpu (no GPU): Triton kernels run under TRITON_INTERPRET=1 at toy shapes; "
            "the times below test the harness and are NOT performance figures"
        )
        return 0.0
    bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}, copy bandwidth {bw / 1e9:.0f} GB/s, {dtype_name}")
    return bw


def _print_table(device: torch.device, dtype: torch.dtype, bw: float, only: str | None) -> None:
    """One line per case (those whose name contains `only`, when given)."""
    on_gpu = device.type == "cuda"
    cols = ("ms", "GB/s", "TFLOP/s", "torch ms", "vs torch", "rel err")
    if on_gpu:
        print("times: medians of CUDA-graph replays (no CPU launch overhead), kernel and peer alike")
    header = f"{'kernel':<28} {'shape':<34} " + " ".join(f"{c:>9}" for c in cols) + "  peer"
    print(header)
    print("-" * len(header))
    for case in all_cases(device, dtype, big=on_gpu):
        if only and only not in case.name:
            continue
        err = case.check() if case.check is not None else float("nan")
        ms = time_ms(case.run, device)
        tms = time_ms(case.torch_run, device) if case.torch_run is not None else float("nan")
        gbs = case.bytes / (ms / 1e3) / 1e9
        tflops = case.flops / (ms / 1e3) / 1e12
        figures = f"{ms:>9.3f} {gbs:>9.1f} {tflops:>9.2f} {tms:>9.3f} {tms / ms:>8.2f}x {err:>9.1e}"
        line = f"{case.name:<28} {case.shape:<34} {figures}  {case.torch_name}"
        if on_gpu and case.name == "paged_decode":
            line += f"  ({gbs * 1e9 / bw:.0%} of copy bandwidth)"
        print(line, flush=True)


def _print_e2e(args: argparse.Namespace, device: torch.device) -> None:
    """--e2e: decode tokens/s of a random-weight Llama-3-8B-shaped model (a toy one on the CPU)."""
    from pagoda.load.bench_decode import decode_throughput

    on_gpu = device.type == "cuda"
    quantization = args.e2e_quantization if on_gpu else "none"
    backend = "auto" if on_gpu else "torch"
    name, tok_s, steps = decode_throughput(
        device, args.e2e_batch, 128, args.e2e_output_len, backend, args.enforce_eager, quantization
    )
    note = "" if on_gpu else " (toy model on CPU: not a performance figure)"
    graphs = "eager" if args.enforce_eager or not on_gpu else "CUDA graphs"
    quant = f", {args.e2e_quantization} weights" if on_gpu and args.e2e_quantization != "none" else ""
    print(
        f"e2e decode: {name}{quant}, batch {args.e2e_batch}, prompt 128, {graphs}: "
        f"{tok_s:.0f} tok/s over {steps} decode steps{note}"
    )
