"""`pagoda bench kernels --sweep`: times paged_decode and the int4 GEMM over their launch
configurations on a GPU (tuning), printing the fastest against the defaults."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pagoda.load.kernel_cases import (
    copy_bandwidth,
    gemm_weights,
    paged_decode_inputs,
    quantized_copies,
    rotating,
    time_ms,
)


def sweep(device: torch.device, dtype: torch.dtype, big: bool = True, what: str = "all") -> None:
    """Time paged_decode (batch 64 x 4k, Llama-3-8B heads) and/or int4 GEMM (4096 -> 14336 at
    batch 1/16/64) over launch configurations; print the fastest, and the defaults' time.
    `big=False`: toy shapes and a few configurations (the CPU test of this code)."""
    if what in ("all", "decode"):
        _sweep_decode(device, dtype, big)
    if what in ("all", "int4"):
        _sweep_int4(device, dtype, big)


def _best(label: str, rows: list[tuple[float, str]], base_ms: float, base_name: str, top: int) -> None:
    rows.sort()
    for ms, cfg in rows[:top]:
        print(f"sweep {label} {cfg}: {ms:.4f} ms, {base_ms / ms:.2f}x {base_name}")


def _sweep_decode(device: torch.device, dtype: torch.dtype, big: bool) -> None:
    from pagoda.kernels.paged_attention import paged_decode

    heads, kv_heads, hd, bs, batch, ctx = (32, 8, 128, 16, 64, 4096) if big else (4, 1, 64, 16, 2, 64)
    split_opts, tile_opts = ((1, 2, 4), (64, 128)) if big else ((1, 2), (32,))
    warp_stage_opts = ((4, 3), (4, 4), (8, 4)) if big else ((4, 2),)
    kc, vc, tables, seq_lens, q = paged_decode_inputs(device, dtype, batch, ctx, heads, kv_heads, hd, bs)
    out = torch.empty_like(q)
    rows: list[tuple[float, str]] = []
    for splits in split_opts:
        for tile_n in tile_opts:
            for warps, stages in warp_stage_opts:
                cfg = f"splits {splits} tile_n {tile_n} warps {warps} stages {stages}"
                try:
                    ms = time_ms(
                        lambda s=splits, t=tile_n, w=warps, st=stages: paged_decode(  # type: ignore[misc]
                            out, q, kc, vc, tables, seq_lens, ctx, hd**-0.5, s, t, w, st
                        ),
                        device,
                    )
                except Exception as e:  # out of shared memory etc.: report, keep sweeping
                    print(f"sweep paged_decode {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                rows.append((ms, cfg))
    bw = copy_bandwidth(device) if device.type == "cuda" else float("inf")
    copy_ms = 2 * batch * ctx * kv_heads * hd * kc.element_size() / bw * 1e3
    _best("paged_decode", rows, copy_ms, "copy time of its bytes", 12)


def _sweep_int4(device: torch.device, dtype: torch.dtype, big: bool) -> None:
    from pagoda.kernels.quant_gemm import quant_matmul

    n_out, k_in = (14336, 4096) if big else (64, 256)
    # kernels: the conversion kernel at BLOCK_K 64 / 128, the bit-trick ones (BLOCK_K 128)
    kernel_opts = (("convert", 64), ("convert", 128), ("magic", 128), ("gemv", 128))
    split_opts, n_opts = ((1, 4, 8, 16), (32, 64, 128)) if big else ((1, 2), (32,))
    weights = gemm_weights(device, dtype, n_out, k_in, big)
    qws = quantized_copies(weights, 4, dtype, big)
    for m in (1, 16, 64) if big else (1, 16):
        xa = torch.randn(m, k_in, device=device).to(dtype)
        base = time_ms(rotating([functools.partial(F.linear, xa, w) for w in weights]), device)
        rows: list[tuple[float, str]] = []
        for kernel, block_k in kernel_opts:
            if kernel == "gemv" and m > 1:
                continue
            for split_k in split_opts:
                for block_n in n_opts:
                    cfg = f"{kernel} block_k {block_k} split_k {split_k} block_n {block_n}"
                    try:
                        runs = [
                            functools.partial(quant_matmul, xa, qw, block_n, block_k, 4, 3, split_k, kernel)
                            for qw in qws
                        ]
                        ms = time_ms(rotating(runs), device)
                    except Exception as e:
                        print(f"sweep int4 m{m} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    rows.append((ms, cfg))
        default = time_ms(rotating([functools.partial(quant_matmul, xa, qw) for qw in qws]), device)
        print(f"sweep int4 m{m}: F.linear {base:.4f} ms, default config {default:.4f} ms")
        _best(f"int4 m{m}", rows, base, "F.linear", 8)
