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
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    shape: str
    bytes: float  # minimum memory traffic of the operation
    flops: float
    run: Callable[[], object]
    torch_run: Callable[[], object] | None
    torch_name: str = "torch"


def add_kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--only", default=None, help="run only the kernels whose name contains this")
    p.add_argument(
        "--e2e",
        action="store_true",
        help="also: decode tokens/s of a random-weight Llama-3-8B-shaped model (toy model on CPU)",
    )
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-output-len", type=int, default=128)
    p.add_argument("--enforce-eager", action="store_true", help="e2e: no CUDA graphs")


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    fn()  # compile / warm up
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms / 1e3)


def _cases(device: torch.device, dtype: torch.dtype, big: bool) -> list[Case]:
    from engine.models.layers import rope_inv_freq
    from kernels.activation import silu_and_mul
    from kernels.kv_cache import reshape_and_cache
    from kernels.paged_attention import decode_num_splits, paged_decode, unified_attention
    from kernels.quant_gemm import quant_matmul, quantize_weight
    from kernels.reference import rms_norm_ref, rotary_ref, silu_and_mul_ref
    from kernels.rms_norm import rms_norm
    from kernels.rotary import cos_sin_table, rotary_embedding

    el = torch.empty((), dtype=dtype).element_size()
    heads, kv_heads, hd, bs = (32, 8, 128, 16) if big else (4, 1, 64, 16)
    batch, ctx = (64, 4096) if big else (2, 48)
    hidden, inter, tokens = (4096, 14336, 4096) if big else (128, 256, 8)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    cases: list[Case] = []
    # decode attention over a paged cache, blocks shuffled
    nblk = batch * ctx // bs
    kc, vc = rnd(nblk, bs, kv_heads, hd), rnd(nblk, bs, kv_heads, hd)
    tables = torch.randperm(nblk, device=device).view(batch, -1).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = rnd(batch, heads, hd)
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = decode_num_splits(batch, kv_heads, ctx, sms)
    kd = kc.view(batch, -1, kv_heads, hd).transpose(1, 2).contiguous()  # [batch, kv, ctx, hd]
    vd = vc.view(batch, -1, kv_heads, hd).transpose(1, 2).contiguous()
    qd = q.view(batch, kv_heads, heads // kv_heads, hd)
    cases.append(
        Case(
            "paged_decode",
            f"b{batch} ctx{ctx} h{heads}/{kv_heads}x{hd} splits{splits}",
            2 * batch * ctx * kv_heads * hd * el,
            4 * batch * heads * ctx * hd,
            lambda: paged_decode(out, q, kc, vc, tables, seq_lens, ctx, hd**-0.5, splits),
            lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=hd**-0.5),
            "SDPA (contiguous K/V)",
        )
    )
    # prefill: 4 prompts attending causally, through the unified kernel
    n_pf, qlen = (4, 1024) if big else (2, 32)
    qp = rnd(n_pf * qlen, heads, hd)
    outp = torch.empty_like(qp)
    qsl = torch.arange(0, n_pf * qlen + 1, qlen, dtype=torch.int32, device=device)
    lens_pf = torch.full((n_pf,), qlen, dtype=torch.int32, device=device)
    kp = kc.view(-1, kv_heads, hd)[: n_pf * qlen].view(n_pf, qlen, kv_heads, hd).transpose(1, 2)
    vp = vc.view(-1, kv_heads, hd)[: n_pf * qlen].view(n_pf, qlen, kv_heads, hd).transpose(1, 2)
    qps = qp.view(n_pf, qlen, heads, hd).transpose(1, 2)
    tables_pf = torch.arange(n_pf * qlen // bs, device=device, dtype=torch.int32).view(n_pf, -1)
    cases.append(
        Case(
            "unified_attention (prefill)",
            f"{n_pf}x{qlen} causal h{heads}/{kv_heads}x{hd}",
            (2 * n_pf * qlen * heads * hd + 2 * n_pf * qlen * kv_heads * hd) * el,
            2 * n_pf * heads * qlen * qlen * hd,  # causal: half of 4 * L^2 * D
            lambda: unified_attention(outp, qp, kc, vc, tables_pf, lens_pf, qsl, qlen, hd**-0.5),
            lambda: F.scaled_dot_product_attention(qps, kp, vp, is_causal=True, enable_gqa=True),
            "SDPA causal",
        )
    )
    # KV write by slot mapping
    kn, vn = rnd(batch, kv_heads, hd), rnd(batch, kv_heads, hd)
    slots = torch.randperm(nblk * bs, device=device)[:batch]
    kflat, vflat = kc.view(-1, kv_heads, hd), vc.view(-1, kv_heads, hd)
    cases.append(
        Case(
            "reshape_and_cache",
            f"{batch} tokens x {kv_heads}x{hd}",
            4 * batch * kv_heads * hd * el,
            0,
            lambda: reshape_and_cache(kn, vn, kc, vc, slots),
            lambda: (kflat.index_copy_(0, slots, kn), vflat.index_copy_(0, slots, vn)),
            "index_copy_",
        )
    )
    x, res, w = rnd(tokens, hidden), rnd(tokens, hidden), rnd(hidden)
    cases.append(
        Case(
            "rms_norm + residual",
            f"{tokens}x{hidden}",
            4 * tokens * hidden * el,
            4 * tokens * hidden,
            lambda: rms_norm(x, w, 1e-5, res),
            lambda: rms_norm_ref(x, w, 1e-5, res),
        )
    )
    table = cos_sin_table(rope_inv_freq(hd, 500000.0, None), 8192, device)
    pos = torch.randint(0, 8192, (tokens,), device=device)
    qr, kr = rnd(tokens, heads, hd), rnd(tokens, kv_heads, hd)
    cases.append(
        Case(
            "rotary (neox)",
            f"{tokens} tokens h{heads}+{kv_heads}x{hd}",
            2 * tokens * (heads + kv_heads) * hd * el,
            3 * tokens * (heads + kv_heads) * hd,
            lambda: rotary_embedding(pos, qr, kr, table),
            lambda: (rotary_ref(pos, qr, table, True), rotary_ref(pos, kr, table, True)),
        )
    )
    gu = rnd(tokens, 2 * inter)
    cases.append(
        Case(
            "silu_and_mul",
            f"{tokens}x{inter}",
            3 * tokens * inter * el,
            5 * tokens * inter,
            lambda: silu_and_mul(gu),
            lambda: silu_and_mul_ref(gu),
        )
    )
    gemm_dtype = dtype if dtype != torch.float32 else torch.float16
    n_out, k_in = (14336, 4096) if big else (256, 256)
    weight = torch.randn(n_out, k_in, device=device).to(gemm_dtype)
    for bits in (4, 8):
        qw = quantize_weight(weight, bits, 128, symmetric=True, scale_dtype=gemm_dtype)
        wbytes = qw.qweight.numel() * 4 + qw.scales.numel() * qw.scales.element_size()
        for m in (1, 16) if big else (1,):
            xa = torch.randn(m, k_in, device=device).to(gemm_dtype)
            cases.append(
                Case(
                    f"int{bits} gemm g128",
                    f"m{m} k{k_in} n{n_out}",
                    wbytes + 2 * m * (k_in + n_out),
                    2 * m * k_in * n_out,
                    lambda xa=xa, qw=qw: quant_matmul(xa, qw),  # type: ignore[misc]
                    lambda xa=xa: F.linear(xa, weight),  # type: ignore[misc]
                    f"F.linear {str(gemm_dtype).removeprefix('torch.')}",
                )
            )
    return cases


def run_kernels(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from kernels.runtime import triton_installed

    if not triton_installed():
        raise ValueError("pagoda bench kernels needs triton: pip install 'pagoda[triton]'")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if on_gpu:
        bw = copy_bandwidth(device)
        print(
            f"device: {torch.cuda.get_device_name(device)}, copy bandwidth {bw / 1e9:.0f} GB/s, {args.dtype}"
        )
    else:
        bw = 0.0
        print(
            "device: cpu (no GPU): Triton kernels run under TRITON_INTERPRET=1 at toy shapes; "
            "the times below test the harness and are NOT performance figures"
        )
    cols = ("ms", "GB/s", "TFLOP/s", "torch ms", "vs torch")
    header = f"{'kernel':<28} {'shape':<34} " + " ".join(f"{c:>9}" for c in cols) + "  peer"
    print(header)
    print("-" * len(header))
    for case in _cases(device, dtype, big=on_gpu):
        if args.only and args.only not in case.name:
            continue
        ms = _time_ms(case.run, device)
        tms = _time_ms(case.torch_run, device) if case.torch_run is not None else float("nan")
        gbs = case.bytes / (ms / 1e3) / 1e9
        tflops = case.flops / (ms / 1e3) / 1e12
        figures = f"{ms:>9.3f} {gbs:>9.1f} {tflops:>9.2f} {tms:>9.3f} {tms / ms:>8.2f}x"
        line = f"{case.name:<28} {case.shape:<34} {figures}  {case.torch_name}"
        if on_gpu and case.name == "paged_decode":
            line += f"  ({gbs * 1e9 / bw:.0%} of copy bandwidth)"
        print(line, flush=True)
    if args.e2e:
        from load.bench_decode import decode_throughput

        backend = "auto" if on_gpu else "torch"
        name, tok_s, steps = decode_throughput(
            device, args.e2e_batch, 128, args.e2e_output_len, backend, args.enforce_eager
        )
        note = "" if on_gpu else " (toy model on CPU: not a performance figure)"
        graphs = "eager" if args.enforce_eager or not on_gpu else "CUDA graphs"
        print(
            f"e2e decode: {name}, batch {args.e2e_batch}, prompt 128, {graphs}: "
            f"{tok_s:.0f} tok/s over {steps} decode steps{note}"
        )
    return 0
