"""pagoda's own CPU kernel (pagoda/engine/quantization/csrc/qgemm.cpp): built on first use, exact
against its own arithmetic, and off (torch's kernels instead) where the CPU or the build cannot
run it."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pagoda.engine.config import cpu_flags
from pagoda.engine.quantization import native, vnni
from pagoda.engine.quantization.linear import make_linear
from pagoda.engine.quantization.vnni import VnniLinear, prompt_rows, rounded_activations
from pagoda.engine.quantization.weights import QuantizedWeight
from tests.unit.test_quantized_linears import _qw

# The kernels' own tests need a CPU that runs them (AVX512-VNNI: native.NEEDED_FLAGS; the GEMM
# and the decode attention also AVX2: native.AVX2_OPS). Machines differ from session to session;
# where one lacks the flags, the defaults run torch's kernels, which the `kernels="torch"` cases
# of the layer and serving tests cover on every CPU.
needs_kernels = pytest.mark.skipif(
    bool(native.missing_flags()), reason=f"this CPU lacks {', '.join(native.missing_flags())}"
)


def needs_op(op: str) -> pytest.MarkDecorator:
    """Skip where this CPU lacks what `op` needs (neither NEEDED_FLAGS nor, for AVX2_OPS, AVX2)."""
    return pytest.mark.skipif(not native.supports(op), reason=f"pagoda_cpu::{op} does not run on this CPU")


needs_gemm = needs_op("qgemm")


def _weight(
    bits: int, out_f: int, in_f: int, group: int, scale_dtype: torch.dtype, offset: bool
) -> QuantizedWeight:
    return _qw(
        out_f, in_f, bits, group, signed=False, offset=offset, seed=bits + out_f, scale_dtype=scale_dtype
    )


@needs_gemm
@pytest.mark.parametrize(
    ("bits", "scale_dtype", "offset", "act_bits"),
    [
        (4, torch.float16, True, 16),
        (8, torch.bfloat16, False, 8),
        (4, torch.float32, False, 8),
        (8, torch.float16, True, 16),
    ],
)
def test_kernel_computes_its_arithmetic_exactly(
    bits: int, scale_dtype: torch.dtype, offset: bool, act_bits: int
) -> None:
    assert native.runs("qgemm")
    qw = _weight(bits, 40, 192, 64, scale_dtype, offset)  # 40 outputs: a padded last tile
    layer = VnniLinear(qw, None, act_bits)
    # scales in the narrowest dtype that holds them exactly (float16 takes these bfloat16 ones too)
    assert layer.scale.element_size() == (4 if scale_dtype == torch.float32 else 2)
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())
    for rows in (1, 7, 16, 19):  # every register block (8, 4, 2, 1) and their mixes
        x = torch.randn(rows, 192)
        want = rounded_activations(x, 64, act_bits) @ qw.dequantize().t()
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        # a row's bits do not depend on its batch (AVX2 puts 8 or more 16-bit rows in the lanes)
        assert torch.equal(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(rows)]))
    assert layer(torch.randn(0, 192)).shape == (0, 40)
    # a wrong offset sign or nibble order is far outside that tolerance
    wrong = QuantizedWeight(qw.codes.flip(1), qw.scale, qw.offset, bits)
    x = torch.randn(4, 192)
    assert (VnniLinear(wrong, None, act_bits)(x) - layer(x)).abs().max() > 0.1 * layer(x).abs().max()


@needs_gemm
def test_sixteen_bit_activations_use_both_digits() -> None:
    """Weight-only layers quantize activations to 16 bits as two int8 digits: ~100x closer to the
    exact product than 8 bits (measured 2e-5 against 5e-3 of the peak); dropping the low digit
    would leave them at 8 bits' error."""
    qw = _weight(4, 64, 256, 32, torch.float16, True)
    x = torch.randn(6, 256)
    exact = x @ qw.dequantize().t()
    err = {b: float((VnniLinear(qw, None, b)(x) - exact).abs().max()) for b in (8, 16)}
    assert err[16] < err[8] / 50 and err[16] < 1e-4 * float(exact.abs().max()), err


def test_activation_bits_follow_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 bits where the checkpoint's runtime uses them (W8A8 per token; GGUF's linears per group in
    generated rows, as llama.cpp and vLLM run them), 16 in other weight-only layers and in GGUF's
    prompt rows; PAGODA_INT8_ACTIVATIONS sets every row of the weight-only layers either way and
    never W8A8's."""
    qw = _weight(4, 16, 64, 32, torch.float16, True)
    gguf, w8a8 = replace(qw, act="int8_group"), replace(qw, act="int8")

    def bits() -> list[tuple[int, int]]:
        return [(vnni.activation_bits(w), vnni.activation_bits(w, prompt=True)) for w in (qw, gguf, w8a8)]

    monkeypatch.delenv("PAGODA_INT8_ACTIVATIONS", raising=False)
    assert bits() == [(16, 16), (8, 16), (8, 8)]
    monkeypatch.setenv("PAGODA_INT8_ACTIVATIONS", "0")
    assert bits() == [(16, 16), (16, 16), (8, 8)]
    monkeypatch.setenv("PAGODA_INT8_ACTIVATIONS", "1")
    assert bits() == [(8, 8), (8, 8), (8, 8)]


@needs_gemm
def test_gguf_layers_take_16_bits_in_prompt_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF linear rounds a step's generated rows to 8 bits and its prompt rows (prompt_rows) to
    16, each row as it would alone; compiled decode graphs have no prompt rows."""
    monkeypatch.delenv("PAGODA_INT8_ACTIVATIONS", raising=False)
    qw = replace(_weight(4, 40, 192, 32, torch.float16, True), act="int8_group")
    layer, eight, sixteen = VnniLinear(qw, None), VnniLinear(qw, None, 8), VnniLinear(qw, None, 16)
    x = torch.randn(21, 192)  # float32: integer activations for prompts on AMX CPUs too
    assert (layer.act_bits, layer.prompt_bits) == (8, 16)
    assert torch.equal(layer(x), eight(x))  # outside a step with prompt rows: all generated
    with prompt_rows(5):
        y = layer(x)
    assert torch.equal(y[:5], eight(x[:5])) and torch.equal(y[5:], sixteen(x[5:]))
    assert not torch.equal(y[5:], eight(x[5:]))
    with prompt_rows(0):
        assert torch.equal(layer(x), sixteen(x))


def test_fp8_kernel_decodes_every_code(kernels: str) -> None:
    """Every float8_e4m3fn byte but NaN (normals, subnormals, both zeros, both signs) decodes as
    torch's cast does, a tile at a time on either path, into the product x @ W^T."""
    bytes_ = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    codes = bytes_[torch.randperm(len(bytes_))].repeat(2)[:504].view(21, 24).view(torch.float8_e4m3fn)
    scale = torch.rand(21, 1) + 0.5
    layer = make_linear(QuantizedWeight(codes, scale, None, 8), None, torch.device("cpu"), torch.float32)
    w = codes.float() * scale
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(9, 24)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-5 * float((x @ w.t()).abs().max()))


@needs_gemm
def test_w8a8_takes_one_scale_per_token() -> None:
    """A W8A8 layer (per-channel int8 weights) quantizes each row of activations with one scale, as
    its checkpoint declares. On AMX CPUs 4 rows or more run on AMX tiles and fewer on VNNI: both
    give the same bits for a row, since the integer sums are exact."""
    assert torch.ops.pagoda_cpu.amx() == ("amx_int8" in cpu_flags() and "amx_tile" in cpu_flags())
    base = _qw(40, 192, 8, 192, signed=True, offset=False, seed=5)
    qw = QuantizedWeight(base.codes, base.scale, None, 8, act="int8")
    layer = make_linear(qw, None, torch.device("cpu"), torch.float32)
    assert isinstance(layer, VnniLinear) and layer.group == 192 and "per token" in layer.kind
    x = torch.randn(21, 192)
    y = layer(x)
    want = rounded_activations(x, 192) @ qw.dequantize().t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for rows in (1, 3, 5, 16):  # VNNI, then AMX where the CPU has it
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
        assert torch.equal(layer(x[:rows]), alone)
        assert torch.equal(layer(x[:rows]), y[:rows])


@needs_kernels
def test_prompt_rows_run_in_bf16_where_the_cpu_has_it() -> None:
    """In a bf16 model on a CPU with AVX512-BF16, a weight-only layer computes the step's prompt
    rows as a dense bf16 model would (the tile dequantized to bf16: csrc/wgemm.cpp, on AMX tiles
    where the CPU has them) and the generated rows with integer activations; elsewhere every row
    takes integer activations."""
    qw = _weight(4, 40, 192, 32, torch.float16, True)
    layer = VnniLinear(qw, None, 16)
    bf16 = bool(torch.ops.pagoda_cpu.wgemm_runs())
    assert bf16 == ("avx512_bf16" in cpu_flags())
    assert layer.prompt_kernel == bf16
    amx = " on AMX" if torch.ops.pagoda_cpu.amx() else ""
    assert layer.kind.endswith(f", prompts bf16{amx})" if bf16 else "activations)")
    x = torch.randn(21, 192).bfloat16()
    with prompt_rows(5):
        y = layer(x)
    assert torch.equal(y[:5], layer(x[:5]))  # generated rows: 16-bit activations, as outside
    if not bf16:
        assert torch.equal(y, layer(x))
        return
    dense = (x.float() @ qw.dequantize().bfloat16().float().t()).bfloat16()
    torch.testing.assert_close(y[5:], dense[5:], rtol=0.01, atol=0.01 * float(dense.abs().max()))
    assert not torch.equal(y[5:], layer(x)[5:])  # another kernel than the generated rows'
    with prompt_rows(0):  # row by row, the same bits: batch-invariant
        assert torch.equal(torch.cat([layer(x[i : i + 1]) for i in range(5, 21)]), y[5:])
    with prompt_rows(0):  # a float32 model keeps 16-bit activations for its prompts
        in_float = layer(x.float())
    assert torch.equal(in_float, layer(x.float()))


def test_prompt_rows_belong_to_their_thread() -> None:
    """An engine thread's step marks prompt rows for its own layers only. A step entering before
    another thread's and leaving first once left the other thread's start behind for good (CI ran
    a layer's generated rows on the prompt kernel after a test's engine thread had stepped)."""
    entered, leave, left = threading.Event(), threading.Event(), threading.Event()
    seen: list[int | None] = []

    def other_step() -> None:
        with prompt_rows(3):
            entered.set()
            leave.wait(5)
            seen.append(vnni._prompt.start)
        left.set()

    thread = threading.Thread(target=other_step)
    thread.start()
    assert entered.wait(5)
    with prompt_rows(5):
        assert vnni._prompt.start == 5
        leave.set()
        assert left.wait(5)
        assert vnni._prompt.start == 5
    thread.join(5)
    assert seen == [3] and vnni._prompt.start is None


@needs_gemm
def test_rows_look_up_the_packed_codes() -> None:
    qw = _weight(8, 50, 64, 32, torch.float16, False)
    layer = VnniLinear(qw, None)
    ids = torch.tensor([[0, 49], [17, 16]])
    assert torch.equal(layer.rows(ids), qw.dequantize()[ids])


def test_kernels_are_off_without_vnni_or_a_compiler(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without AVX-512 only the AVX2 ops run, and only where the CPU has AVX2, FMA and F16C; without
    a compiler nothing does."""
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert native.missing_flags() == ["avx512f", "avx512bw", "avx512_vnni"]
    native.cache_clear()
    try:
        assert not native.available() and not native.runs("qgemm")
        monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
        monkeypatch.setattr(native, "_load", lambda: None)  # a build that succeeds
        native.cache_clear()
        assert not native.available() and native.isa() == "AVX2"
        assert native.runs("qgemm") and native.runs("decode_attention") and not native.runs("rms_norm")
        monkeypatch.undo()

        monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.NEEDED_FLAGS))

        def no_compiler() -> None:
            raise RuntimeError("g++ not found")

        monkeypatch.setattr(native, "_load", no_compiler)
        native.cache_clear()
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.available() and not native.runs("qgemm")
        assert "g++ not found" in caplog.text
    finally:
        monkeypatch.undo()
        native.cache_clear()
    assert native.available() == (not native.missing_flags())  # this machine's own answer again
    assert native.runs("qgemm") == native.supports("qgemm")


@needs_kernels
def test_rms_norm_in_one_pass_keeps_hf_numerics() -> None:
    """A bf16 RMSNorm on a CPU runs pagoda's one-pass kernel (csrc/norm.cpp): the residual sum is
    bf16's own, and the output is HF's (normalize in float32, round, scale) but where the float32
    sum of squares rounds the other way (measured 3 of 172,800 values, by one bf16 step)."""
    import torch.nn.functional as F

    from pagoda.engine.models.layers import RMSNorm

    norm = RMSNorm(200, 1e-5)  # 200: a masked tail after 12 vectors of 16
    norm.weight.data = (torch.rand(200) + 0.5).bfloat16()
    x, residual = torch.randn(37, 200).bfloat16(), torch.randn(37, 200).bfloat16()
    assert norm._native(x) and not norm._native(x.float())

    def hf(v: torch.Tensor) -> torch.Tensor:
        return norm.weight * F.rms_norm(v.float(), norm.weight.shape, eps=norm.eps).to(v.dtype)

    with torch.no_grad():
        assert torch.equal(norm(x), torch.ops.pagoda_cpu.rms_norm(x, norm.weight, norm.eps))
        out, summed = norm.add_forward(x, residual)
        assert torch.equal(summed, x + residual)
        for got, want in ((norm(x), hf(x)), (out, hf(x + residual))):
            assert (got != want).float().mean() < 1e-3
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)


def test_a_killed_build_s_lock_is_cleared_and_a_live_one_kept(tmp_path: Path) -> None:
    """torch waits forever on the lock a killed build left: an old one goes, a fresh one stays."""
    lock = tmp_path / "lock"
    lock.touch()
    native._clear_stale_lock(lock)
    assert lock.exists()  # a build may hold it now
    old = time.time() - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    native._clear_stale_lock(lock)
    assert not lock.exists()
    native._clear_stale_lock(lock)  # none: nothing to do


def test_sources_are_copied_once_into_the_build_directory(tmp_path: Path) -> None:
    """Every checkout builds from the same paths (the build directory's copies), and an unchanged
    copy is not rewritten (its time would make ninja rebuild)."""
    directory = tmp_path
    first = native._copied_sources(directory)
    assert [p.name for p in first] == [p.name for p in native.SOURCES]
    assert all(p.read_bytes() == (native.CSRC / p.name).read_bytes() for p in first)
    assert (directory / "src" / "common.h").exists()  # the headers the sources include
    times = [p.stat().st_mtime_ns for p in first]
    first[0].write_bytes(b"// stale")
    again = native._copied_sources(directory)
    assert again == first and again[0].read_bytes() == native.SOURCES[0].read_bytes()
    assert [p.stat().st_mtime_ns for p in again[1:]] == times[1:]
