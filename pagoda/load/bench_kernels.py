"""`pagoda bench kernels`: each Triton kernel against PyTorch on the same inputs: time, achieved
memory bandwidth and FLOP rate, and the speedup over torch (SDPA, F.linear, eager ops).

On a GPU the shapes are Llama-3-8B's (32 query / 8 KV heads of 128, hidden 4096, MLP 14336),
decode attention at batch 64 x 4k context, and the device's copy bandwidth is measured first so
decode attention can be read as a fraction of it. Without a GPU the kernels run under Triton's
interpreter at toy shapes: the table shows the harness works, its times are not performance.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pagoda.kernels.quant_gemm import QuantizedWeight


@dataclass
class Case:
    name: str
    shape: str
    bytes: float  # minimum memory traffic of the operation
    flops: float
    run: Callable[[], object]
    torch_run: Callable[[], object] | None
    torch_name: str = "torch"
    check: Callable[[], float] | None = None  # relative error against a reference, run once


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN when got holds a NaN)."""
    g, w = got.double(), want.double()
    return float((g - w).norm() / w.norm().clamp(min=1e-30))


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of `fn`. On a GPU, replays of a CUDA graph of it (how the engine runs decode
    steps): a launch-timed loop would measure Triton's Python launch overhead (tens of us) for the
    small decode kernels rather than the kernels; `fn`s that cannot be captured fall back to it."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        try:
            return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except Exception:  # not capturable (host syncs): launch-timed
            torch.cuda.synchronize()
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # compile / warm up
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write), launch-timed (one launch of a
    0.5 ms copy: its overhead does not count)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"))
    return 2 * src.numel() * 4 / (ms / 1e3)


def _rotating(copies: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """A function that runs the next of `copies` each call: GEMM weights smaller than the L2
    cache (int4 4096 x 14336 is 29 MB; an H200 has 60 MB) would otherwise be read from L2 in
    repeated runs, which a decode step (every layer's weights in turn) never does."""
    it = itertools.cycle(copies)
    return lambda: next(it)()


def _paged_decode_inputs(
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    ctx: int,
    heads: int,
    kv_heads: int,
    hd: int,
    bs: int,
) -> tuple[torch.Tensor, ...]:
    """(k_cache, v_cache, block tables, seq_lens, q) for decode attention over a paged cache of
    `batch` sequences of `ctx` keys, their blocks shuffled."""
    nblk = batch * ctx // bs
    kc = torch.randn(nblk, bs, kv_heads, hd, device=device).to(dtype)
    vc = torch.randn(nblk, bs, kv_heads, hd, device=device).to(dtype)
    tables = torch.randperm(nblk, device=device).view(batch, -1).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, hd, device=device).to(dtype)
    return kc, vc, tables, seq_lens, q


def _gemm_weights(
    device: torch.device, dtype: torch.dtype, n_out: int, k_in: int, big: bool
) -> list[torch.Tensor]:
    """Half weights [n_out, k_in] for the GEMM rows: 2 (235 MB at 4096 x 14336) on a GPU, so that
    they and `_quantized_copies` of them together exceed an H200's L2 several times."""
    return [torch.randn(n_out, k_in, device=device).to(dtype) for _ in range(2 if big else 1)]


def _quantized_copies(
    weights: list[torch.Tensor], bits: int, dtype: torch.dtype, big: bool
) -> list[QuantizedWeight]:
    """Symmetric group-128 quantizations of `weights`, in turn: 8 of them at int4 (235 MB), 4 at
    int8, on a GPU."""
    from pagoda.kernels.quant_gemm import quantize_weight

    n = (8 if bits == 4 else 4) if big else 1
    return [quantize_weight(weights[i % len(weights)], bits, 128, True, dtype) for i in range(n)]


def _cases(device: torch.device, dtype: torch.dtype, big: bool) -> list[Case]:
    from pagoda.engine.models.layers import rope_inv_freq
    from pagoda.kernels.activation import silu_and_mul
    from pagoda.kernels.kv_cache import reshape_and_cache
    from pagoda.kernels.paged_attention import decode_num_splits, paged_decode, unified_attention
    from pagoda.kernels.quant_gemm import quant_matmul
    from pagoda.kernels.reference import quant_matmul_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref
    from pagoda.kernels.rms_norm import rms_norm
    from pagoda.kernels.rotary import cos_sin_table, rotary_embedding

    el = torch.empty((), dtype=dtype).element_size()
    heads, kv_heads, hd, bs = (32, 8, 128, 16) if big else (4, 1, 64, 16)
    batch, ctx = (64, 4096) if big else (2, 48)
    hidden, inter, tokens = (4096, 14336, 4096) if big else (128, 256, 8)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    cases: list[Case] = []
    kc, vc, tables, seq_lens, q = _paged_decode_inputs(device, dtype, batch, ctx, heads, kv_heads, hd, bs)
    nblk = kc.shape[0]
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = decode_num_splits(batch, kv_heads, ctx, sms)
    # the peer reads K/V gathered in block-table order (contiguous; the gather is not timed)
    kd = kc[tables.long()].view(batch, ctx, kv_heads, hd).transpose(1, 2).contiguous()  # [b, kv, ctx, hd]
    vd = vc[tables.long()].view(batch, ctx, kv_heads, hd).transpose(1, 2).contiguous()
    qd = q.view(batch, kv_heads, heads // kv_heads, hd)

    def check_decode() -> float:
        paged_decode(out, q, kc, vc, tables, seq_lens, ctx, hd**-0.5, splits)
        want = F.scaled_dot_product_attention(qd.float(), kd.float(), vd.float(), scale=hd**-0.5)
        return rel_err(out, want.reshape(batch, heads, hd))

    cases.append(
        Case(
            "paged_decode",
            f"b{batch} ctx{ctx} h{heads}/{kv_heads}x{hd} splits{splits}",
            2 * batch * ctx * kv_heads * hd * el,
            4 * batch * heads * ctx * hd,
            lambda: paged_decode(out, q, kc, vc, tables, seq_lens, ctx, hd**-0.5, splits),
            lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=hd**-0.5),
            "SDPA (contiguous K/V)",
            check_decode,
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

    def check_prefill() -> float:
        unified_attention(outp, qp, kc, vc, tables_pf, lens_pf, qsl, qlen, hd**-0.5)
        want = F.scaled_dot_product_attention(
            qps.float(), kp.float(), vp.float(), is_causal=True, enable_gqa=True, scale=hd**-0.5
        )
        return rel_err(outp, want.transpose(1, 2).reshape(n_pf * qlen, heads, hd))

    cases.append(
        Case(
            "unified_attention (prefill)",
            f"{n_pf}x{qlen} causal h{heads}/{kv_heads}x{hd}",
            (2 * n_pf * qlen * heads * hd + 2 * n_pf * qlen * kv_heads * hd) * el,
            2 * n_pf * heads * qlen * qlen * hd,  # causal: half of 4 * L^2 * D
            lambda: unified_attention(outp, qp, kc, vc, tables_pf, lens_pf, qsl, qlen, hd**-0.5),
            lambda: F.scaled_dot_product_attention(qps, kp, vp, is_causal=True, enable_gqa=True),
            "SDPA causal",
            check_prefill,
        )
    )
    # KV write by slot mapping
    kn, vn = rnd(batch, kv_heads, hd), rnd(batch, kv_heads, hd)
    slots = torch.randperm(nblk * bs, device=device)[:batch]
    kflat, vflat = kc.view(-1, kv_heads, hd), vc.view(-1, kv_heads, hd)

    def check_write() -> float:
        reshape_and_cache(kn, vn, kc, vc, slots)
        return rel_err(torch.cat((kflat[slots], vflat[slots])), torch.cat((kn, vn)))

    cases.append(
        Case(
            "reshape_and_cache",
            f"{batch} tokens x {kv_heads}x{hd}",
            4 * batch * kv_heads * hd * el,
            0,
            lambda: reshape_and_cache(kn, vn, kc, vc, slots),
            lambda: (kflat.index_copy_(0, slots, kn), vflat.index_copy_(0, slots, vn)),
            "index_copy_",
            check_write,
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
            check=lambda: rel_err(
                rms_norm(x, w, 1e-5, res)[0], rms_norm_ref(x.float(), w, 1e-5, res.float())[0]
            ),
        )
    )
    table = cos_sin_table(rope_inv_freq(hd, 500000.0, None), 8192, device)
    pos = torch.randint(0, 8192, (tokens,), device=device)
    qr, kr = rnd(tokens, heads, hd), rnd(tokens, kv_heads, hd)

    def check_rotary() -> float:
        q1, k1 = qr.clone(), kr.clone()
        rotary_embedding(pos, q1, k1, table)
        want_q, want_k = rotary_ref(pos, qr.float(), table, True), rotary_ref(pos, kr.float(), table, True)
        want = torch.cat((want_q, want_k), 1)
        return rel_err(torch.cat((q1, k1), 1), want)

    cases.append(
        Case(
            "rotary (neox)",
            f"{tokens} tokens h{heads}+{kv_heads}x{hd}",
            2 * tokens * (heads + kv_heads) * hd * el,
            3 * tokens * (heads + kv_heads) * hd,
            lambda: rotary_embedding(pos, qr, kr, table),
            lambda: (rotary_ref(pos, qr, table, True), rotary_ref(pos, kr, table, True)),
            check=check_rotary,
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
            check=lambda: rel_err(silu_and_mul(gu), silu_and_mul_ref(gu.float())),
        )
    )
    gemm_dtype = dtype if dtype != torch.float32 else torch.float16
    n_out, k_in = (14336, 4096) if big else (256, 256)
    weights = _gemm_weights(device, gemm_dtype, n_out, k_in, big)
    for bits in (4, 8):
        qws = _quantized_copies(weights, bits, gemm_dtype, big)
        wbytes = qws[0].qweight.numel() * 4 + qws[0].scales.numel() * qws[0].scales.element_size()
        for m in (1, 4, 16) if big else (1,):
            xa = torch.randn(m, k_in, device=device).to(gemm_dtype)
            cases.append(
                Case(
                    f"int{bits} gemm g128",
                    f"m{m} k{k_in} n{n_out}",
                    wbytes + 2 * m * (k_in + n_out),
                    2 * m * k_in * n_out,
                    _rotating([functools.partial(quant_matmul, xa, qw) for qw in qws]),
                    _rotating([functools.partial(F.linear, xa, w) for w in weights]),
                    f"F.linear {str(gemm_dtype).removeprefix('torch.')}",
                    lambda xa=xa, qw=qws[0], bits=bits: rel_err(  # type: ignore[misc]
                        quant_matmul(xa, qw),
                        quant_matmul_ref(xa.float(), qw.qweight, qw.scales.float(), qw.zeros, bits, 128),
                    ),
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
    from pagoda.kernels.runtime import triton_installed

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
    if args.sweep:
        if not on_gpu:
            raise ValueError("--sweep tunes GPU launches; it needs a CUDA device")
        sweep(device, dtype, what=args.sweep)
    cols = ("ms", "GB/s", "TFLOP/s", "torch ms", "vs torch", "rel err")
    if on_gpu:
        print("times: medians of CUDA-graph replays (no CPU launch overhead), kernel and peer alike")
    header = f"{'kernel':<28} {'shape':<34} " + " ".join(f"{c:>9}" for c in cols) + "  peer"
    print(header)
    print("-" * len(header))
    for case in _cases(device, dtype, big=on_gpu):
        if args.only and args.only not in case.name:
            continue
        err = case.check() if case.check is not None else float("nan")
        ms = _time_ms(case.run, device)
        tms = _time_ms(case.torch_run, device) if case.torch_run is not None else float("nan")
        gbs = case.bytes / (ms / 1e3) / 1e9
        tflops = case.flops / (ms / 1e3) / 1e12
        figures = f"{ms:>9.3f} {gbs:>9.1f} {tflops:>9.2f} {tms:>9.3f} {tms / ms:>8.2f}x {err:>9.1e}"
        line = f"{case.name:<28} {case.shape:<34} {figures}  {case.torch_name}"
        if on_gpu and case.name == "paged_decode":
            line += f"  ({gbs * 1e9 / bw:.0%} of copy bandwidth)"
        print(line, flush=True)
    if args.e2e:
        from pagoda.load.bench_decode import decode_throughput

        backend = "auto" if on_gpu else "torch"
        name, tok_s, steps = decode_throughput(
            device,
            args.e2e_batch,
            128,
            args.e2e_output_len,
            backend,
            args.enforce_eager,
            "none" if not on_gpu else args.e2e_quantization,
        )
        note = "" if on_gpu else " (toy model on CPU: not a performance figure)"
        graphs = "eager" if args.enforce_eager or not on_gpu else "CUDA graphs"
        quant = f", {args.e2e_quantization} weights" if on_gpu and args.e2e_quantization != "none" else ""
        print(
            f"e2e decode: {name}{quant}, batch {args.e2e_batch}, prompt 128, {graphs}: "
            f"{tok_s:.0f} tok/s over {steps} decode steps{note}"
        )
    return 0


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
    kc, vc, tables, seq_lens, q = _paged_decode_inputs(device, dtype, batch, ctx, heads, kv_heads, hd, bs)
    out = torch.empty_like(q)
    rows: list[tuple[float, str]] = []
    for splits in split_opts:
        for tile_n in tile_opts:
            for warps, stages in warp_stage_opts:
                cfg = f"splits {splits} tile_n {tile_n} warps {warps} stages {stages}"
                try:
                    ms = _time_ms(
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
    weights = _gemm_weights(device, dtype, n_out, k_in, big)
    qws = _quantized_copies(weights, 4, dtype, big)
    for m in (1, 16, 64) if big else (1, 16):
        xa = torch.randn(m, k_in, device=device).to(dtype)
        base = _time_ms(_rotating([functools.partial(F.linear, xa, w) for w in weights]), device)
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
                        ms = _time_ms(_rotating(runs), device)
                    except Exception as e:
                        print(f"sweep int4 m{m} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    rows.append((ms, cfg))
        default = _time_ms(_rotating([functools.partial(quant_matmul, xa, qw) for qw in qws]), device)
        print(f"sweep int4 m{m}: F.linear {base:.4f} ms, default config {default:.4f} ms")
        _best(f"int4 m{m}", rows, base, "F.linear", 8)
