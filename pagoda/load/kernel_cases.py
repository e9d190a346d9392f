"""The cases of `pagoda bench kernels`: each Triton kernel, its PyTorch peer and a correctness
check on the same inputs, and how they are timed (bench_kernels.py prints the table; the GPU
tuning sweep is kernel_sweep.py). One builder per kernel family, all at the sizes of `Shapes`.
"""

from __future__ import annotations

import functools
import itertools
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


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
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


def rotating(copies: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """A function that runs the next of `copies` each call: GEMM weights smaller than the L2
    cache (int4 4096 x 14336 is 29 MB; an H200 has 60 MB) would otherwise be read from L2 in
    repeated runs, which a decode step (every layer's weights in turn) never does."""
    it = itertools.cycle(copies)
    return lambda: next(it)()


def paged_decode_inputs(
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


def gemm_weights(
    device: torch.device, dtype: torch.dtype, n_out: int, k_in: int, big: bool
) -> list[torch.Tensor]:
    """Half weights [n_out, k_in] for the GEMM rows: 2 (235 MB at 4096 x 14336) on a GPU, so that
    they and `quantized_copies` of them together exceed an H200's L2 several times."""
    return [torch.randn(n_out, k_in, device=device).to(dtype) for _ in range(2 if big else 1)]


def quantized_copies(
    weights: list[torch.Tensor], bits: int, dtype: torch.dtype, big: bool
) -> list[QuantizedWeight]:
    """Symmetric group-128 quantizations of `weights`, in turn: 8 of them at int4 (235 MB), 4 at
    int8, on a GPU."""
    from pagoda.kernels.quant_gemm import quantize_weight

    n = (8 if bits == 4 else 4) if big else 1
    return [quantize_weight(weights[i % len(weights)], bits, 128, True, dtype) for i in range(n)]


@dataclass(frozen=True)
class Shapes:
    """The sizes the cases run at: Llama-3-8B's on a GPU (`big`), toy ones under the interpreter."""

    device: torch.device
    dtype: torch.dtype
    big: bool

    @property
    def heads(self) -> tuple[int, int, int, int]:
        """(query heads, KV heads, head dim, block size)."""
        return (32, 8, 128, 16) if self.big else (4, 1, 64, 16)

    @property
    def batch_ctx(self) -> tuple[int, int]:
        """Decode attention: (sequences, context length)."""
        return (64, 4096) if self.big else (2, 48)

    @property
    def mlp(self) -> tuple[int, int, int]:
        """(hidden size, MLP size, tokens) of the pointwise kernels."""
        return (4096, 14336, 4096) if self.big else (128, 256, 8)

    @property
    def el(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def rnd(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(self.dtype)


def all_cases(device: torch.device, dtype: torch.dtype, big: bool) -> list[Case]:
    from pagoda.load.kernel_cases_moe import moe_cases

    s = Shapes(device, dtype, big)
    heads, kv_heads, hd, bs = s.heads
    batch, ctx = s.batch_ctx
    kv = paged_decode_inputs(device, dtype, batch, ctx, heads, kv_heads, hd, bs)
    return [
        _decode_case(s, kv),
        _decode_case(s, kv, window=s.batch_ctx[1] // 4),
        _prefill_case(s, kv[0], kv[1]),
        _kv_write_case(s, kv[0], kv[1]),
        *_pointwise_cases(s),
        *_gemm_cases(s),
        *moe_cases(s),
    ]


def _decode_case(s: Shapes, kv: tuple[torch.Tensor, ...], window: int | None = None) -> Case:
    """Decode attention; with a sliding `window` only the last `window` keys are read (and
    counted), the peer attends to just those."""
    from pagoda.kernels.paged_attention import decode_num_splits, paged_decode

    kc, vc, tables, seq_lens, q = kv
    heads, kv_heads, hd, _ = s.heads
    batch, ctx = s.batch_ctx
    keys = ctx if window is None else window
    out = torch.empty_like(q)
    device = s.device
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = decode_num_splits(batch, kv_heads, keys, sms)
    # the peer reads K/V gathered in block-table order (contiguous; the gather is not timed)
    kd = kc[tables.long()].view(batch, ctx, kv_heads, hd)[:, ctx - keys :].transpose(1, 2).contiguous()
    vd = vc[tables.long()].view(batch, ctx, kv_heads, hd)[:, ctx - keys :].transpose(1, 2).contiguous()
    qd = q.view(batch, kv_heads, heads // kv_heads, hd)  # kd, vd: [b, kv, keys, hd]

    def run() -> None:
        paged_decode(out, q, kc, vc, tables, seq_lens, ctx, hd**-0.5, splits, sliding_window=window)

    def check_decode() -> float:
        run()
        want = F.scaled_dot_product_attention(qd.float(), kd.float(), vd.float(), scale=hd**-0.5)
        return rel_err(out, want.reshape(batch, heads, hd))

    return Case(
        "paged_decode" if window is None else "paged_decode (window)",
        f"b{batch} ctx{ctx}{'' if window is None else f' window{window}'} h{heads}/{kv_heads}x{hd} "
        f"splits{splits}",
        2 * batch * keys * kv_heads * hd * s.el,
        4 * batch * heads * keys * hd,
        run,
        lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=hd**-0.5),
        "SDPA (contiguous K/V)",
        check_decode,
    )


def _prefill_case(s: Shapes, kc: torch.Tensor, vc: torch.Tensor) -> Case:
    """4 prompts attending causally, through the unified kernel."""
    from pagoda.kernels.paged_attention import unified_attention

    heads, kv_heads, hd, bs = s.heads
    device = s.device
    n_pf, qlen = (4, 1024) if s.big else (2, 32)
    qp = s.rnd(n_pf * qlen, heads, hd)
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

    return Case(
        "unified_attention (prefill)",
        f"{n_pf}x{qlen} causal h{heads}/{kv_heads}x{hd}",
        (2 * n_pf * qlen * heads * hd + 2 * n_pf * qlen * kv_heads * hd) * s.el,
        2 * n_pf * heads * qlen * qlen * hd,  # causal: half of 4 * L^2 * D
        lambda: unified_attention(outp, qp, kc, vc, tables_pf, lens_pf, qsl, qlen, hd**-0.5),
        lambda: F.scaled_dot_product_attention(qps, kp, vp, is_causal=True, enable_gqa=True),
        "SDPA causal",
        check_prefill,
    )


def _kv_write_case(s: Shapes, kc: torch.Tensor, vc: torch.Tensor) -> Case:
    """KV write by slot mapping."""
    from pagoda.kernels.kv_cache import reshape_and_cache

    _, kv_heads, hd, bs = s.heads
    batch, _ = s.batch_ctx
    kn, vn = s.rnd(batch, kv_heads, hd), s.rnd(batch, kv_heads, hd)
    slots = torch.randperm(kc.shape[0] * bs, device=s.device)[:batch]
    kflat, vflat = kc.view(-1, kv_heads, hd), vc.view(-1, kv_heads, hd)

    def check_write() -> float:
        reshape_and_cache(kn, vn, kc, vc, slots)
        return rel_err(torch.cat((kflat[slots], vflat[slots])), torch.cat((kn, vn)))

    return Case(
        "reshape_and_cache",
        f"{batch} tokens x {kv_heads}x{hd}",
        4 * batch * kv_heads * hd * s.el,
        0,
        lambda: reshape_and_cache(kn, vn, kc, vc, slots),
        lambda: (kflat.index_copy_(0, slots, kn), vflat.index_copy_(0, slots, vn)),
        "index_copy_",
        check_write,
    )


def _pointwise_cases(s: Shapes) -> list[Case]:
    """rms_norm + residual, rotary embedding, silu_and_mul."""
    from pagoda.engine.models.rope_scaling import rope_inv_freq
    from pagoda.kernels.activation import silu_and_mul
    from pagoda.kernels.reference import rms_norm_ref, rotary_ref, silu_and_mul_ref
    from pagoda.kernels.rms_norm import rms_norm
    from pagoda.kernels.rotary import cos_sin_table, rotary_embedding

    heads, kv_heads, hd, _ = s.heads
    hidden, inter, tokens = s.mlp
    el = s.el
    x, res, w = s.rnd(tokens, hidden), s.rnd(tokens, hidden), s.rnd(hidden)
    norm = Case(
        "rms_norm + residual",
        f"{tokens}x{hidden}",
        4 * tokens * hidden * el,
        4 * tokens * hidden,
        lambda: rms_norm(x, w, 1e-5, res),
        lambda: rms_norm_ref(x, w, 1e-5, res),
        check=lambda: rel_err(rms_norm(x, w, 1e-5, res)[0], rms_norm_ref(x.float(), w, 1e-5, res.float())[0]),
    )
    table = cos_sin_table(rope_inv_freq(hd, 500000.0, None), 8192, s.device)
    pos = torch.randint(0, 8192, (tokens,), device=s.device)
    qr, kr = s.rnd(tokens, heads, hd), s.rnd(tokens, kv_heads, hd)

    def check_rotary() -> float:
        q1, k1 = qr.clone(), kr.clone()
        rotary_embedding(pos, q1, k1, table)
        want_q, want_k = rotary_ref(pos, qr.float(), table, True), rotary_ref(pos, kr.float(), table, True)
        want = torch.cat((want_q, want_k), 1)
        return rel_err(torch.cat((q1, k1), 1), want)

    rotary = Case(
        "rotary (neox)",
        f"{tokens} tokens h{heads}+{kv_heads}x{hd}",
        2 * tokens * (heads + kv_heads) * hd * el,
        3 * tokens * (heads + kv_heads) * hd,
        lambda: rotary_embedding(pos, qr, kr, table),
        lambda: (rotary_ref(pos, qr, table, True), rotary_ref(pos, kr, table, True)),
        check=check_rotary,
    )
    gu = s.rnd(tokens, 2 * inter)
    silu = Case(
        "silu_and_mul",
        f"{tokens}x{inter}",
        3 * tokens * inter * el,
        5 * tokens * inter,
        lambda: silu_and_mul(gu),
        lambda: silu_and_mul_ref(gu),
        check=lambda: rel_err(silu_and_mul(gu), silu_and_mul_ref(gu.float())),
    )
    return [norm, rotary, silu]


def _gemm_cases(s: Shapes) -> list[Case]:
    """Weight-only int4 and int8 GEMMs (group 128) against F.linear in half precision."""
    from pagoda.kernels.quant_gemm import quant_matmul
    from pagoda.kernels.reference import quant_matmul_ref

    device, big = s.device, s.big
    gemm_dtype = s.dtype if s.dtype != torch.float32 else torch.float16
    n_out, k_in = (14336, 4096) if big else (256, 256)
    weights = gemm_weights(device, gemm_dtype, n_out, k_in, big)
    cases = []
    for bits in (4, 8):
        qws = quantized_copies(weights, bits, gemm_dtype, big)
        wbytes = qws[0].qweight.numel() * 4 + qws[0].scales.numel() * qws[0].scales.element_size()
        for m in (1, 4, 16) if big else (1,):
            xa = torch.randn(m, k_in, device=device).to(gemm_dtype)
            cases.append(
                Case(
                    f"int{bits} gemm g128",
                    f"m{m} k{k_in} n{n_out}",
                    wbytes + 2 * m * (k_in + n_out),
                    2 * m * k_in * n_out,
                    rotating([functools.partial(quant_matmul, xa, qw) for qw in qws]),
                    rotating([functools.partial(F.linear, xa, w) for w in weights]),
                    f"F.linear {str(gemm_dtype).removeprefix('torch.')}",
                    lambda xa=xa, qw=qws[0], bits=bits: rel_err(  # type: ignore[misc]
                        quant_matmul(xa, qw),
                        quant_matmul_ref(xa.float(), qw.qweight, qw.scales.float(), qw.zeros, bits, 128),
                    ),
                )
            )
    return cases
