"""VnniLinear: 4- and 8-bit integer weights on pagoda's own CPU kernel (native.py, csrc/qgemm.cpp;
on CPUs with AVX2 and no AVX-512, csrc/qgemm_avx2.cpp: the same results),
which multiplies them against activations quantized per row and group at call time: one layer for
GGUF Q4_0/Q4_1/Q8_0 and K-quant codes, compressed-tensors W4A16/W8A16 and W8A8, GPTQ and AWQ.

- GGUF layers quantize generated rows to 8 bits in blocks of the weight's groups (32 inputs), as
  llama.cpp, vLLM and SGLang run GGUF blocks against their Q8 activations (QuantizedWeight.act
  "int8_group"), and prompt rows (prompt_rows) to 16: a prompt's keys and values are read by
  every later token, and its last row picks the first token, the answer's least certain one
  (the demo's "What is the capital of France?" starts "L'Étoile" with 8-bit prompts, "The
  capital of France is Paris." with 16).
- Other weight-only layers (compressed-tensors W4A16/W8A16, GPTQ, AWQ), and a GGUF's LM head, take
  16 bits (two int8 digits) in blocks of the weight's groups, capped at MAX_ACT_BLOCK inputs:
  finer than bfloat16 (1/32639 of the block's peak against bfloat16's 1/256 of each value), at
  twice the integer products.
- W8A8 layers quantize them to 8 bits per token, the scheme the checkpoint declares (per-channel
  weights; grouped ones take blocks as above). One integer sum then covers a whole row, which AMX
  CPUs compute in tiles of 16 rows x 16 outputs x 64 inputs.
- PAGODA_INT8_ACTIVATIONS=1 gives every weight-only layer 8 bits, =0 every one 16 (activation_bits).

The weight is packed once into tiles of 16 outputs (the kernel's layout, described in qgemm.cpp):
unsigned codes u (signed ones shifted up by `zero_code`), w = scale * (u - zero_code) + offset.
Scales and offsets are kept in the narrowest dtype that holds them exactly (GGUF's are float16,
compressed-tensors' bfloat16), so resident memory is the file's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

from pagoda.engine.quantization import native
from pagoda.engine.quantization.linear import QuantizedLinear
from pagoda.engine.quantization.weights import QuantizedWeight

TILE = 16  # outputs per tile
MAX_ACT_BLOCK = 128  # the most inputs that share one activation scale


class _PromptRows(threading.local):
    """The step's first prompt row (prompt_rows), per thread: an engine thread's step never
    reaches another thread's layers. None: no prompt rows."""

    start: int | None = None


_prompt = _PromptRows()


@contextlib.contextmanager
def prompt_rows(start: int | None) -> Iterator[None]:
    """Within this context the model's rows from `start` on are prompt tokens (the runner orders
    generated tokens first). On CPUs with AVX512-BF16, in a bf16 model, weight-only layers compute
    those rows as a dense bf16 model would, each weight tile dequantized to bf16 once
    (csrc/wgemm.cpp): prompts of tens to thousands of rows run at dense bf16's speed (AMX's where
    the CPU has it), and a row's arithmetic still depends only on the row (whether it is a prompt
    token). Elsewhere a GGUF's prompt rows take 16-bit integer activations (activation_bits)."""
    previous, _prompt.start = _prompt.start, start
    try:
        yield
    finally:
        _prompt.start = previous


def current_prompt_start() -> int | None:
    """The `start` of the innermost `prompt_rows` context (None outside one)."""
    return _prompt.start


def act_block(qw: QuantizedWeight) -> int | None:
    """The block the kernel runs `qw` in: the largest divisor of its group that is at most
    MAX_ACT_BLOCK and a multiple of the inputs one 64-byte chunk holds (8 at 4 bits, 4 at 8),
    or None when none is."""
    chunk = 8 if qw.bits <= 4 else 4
    g = qw.group_size
    return next((b for b in range(min(g, MAX_ACT_BLOCK), 0, -1) if g % b == 0 and b % chunk == 0), None)


def activation_bits(qw: QuantizedWeight, prompt: bool = False) -> int:
    """The bits the kernel rounds `qw`'s activations to, in generated rows or in `prompt` rows: 8
    where the checkpoint's runtime uses them (W8A8 per token; GGUF per group in generated rows, as
    llama.cpp runs them, its prompt rows 16), else 16. PAGODA_INT8_ACTIVATIONS=1 (=0) sets every
    weight-only layer's to 8 (16) in every row."""
    if qw.act == "int8":  # W8A8: as the checkpoint declares, whatever the setting
        return 8
    forced = os.environ.get("PAGODA_INT8_ACTIVATIONS", "")
    if forced in ("0", "1"):
        return 8 if forced == "1" else 16
    return 8 if qw.act == "int8_group" and not prompt else 16


def act_levels(act_bits: int) -> int:
    """Codes on each side of zero for activations of `act_bits` (8: 127; 16: two int8 digits,
    256 * high + low, with high within +-127)."""
    return 127 if act_bits == 8 else 127 * 256 + 127


def rounded_activations(x: torch.Tensor, block: int, act_bits: int = 8) -> torch.Tensor:
    """What the kernel multiplies `x` [..., in] by, in float32: each block of `block` inputs of a
    row rounded to the levels of `act_bits` over its peak (the reference its results are tested
    against). As the kernel does, it multiplies by levels / peak: dividing by the step instead
    rounds a value near a half level the other way now and then."""
    v = x.float().reshape(*x.shape[:-1], -1, block)
    peak = v.abs().amax(-1, keepdim=True)
    levels = float(act_levels(act_bits))
    # a tensor divided, not a Python number: torch turns `number / tensor` into a reciprocal
    # times the number, which is not the kernel's division
    inv = torch.where(peak > 0, torch.full_like(peak, levels) / peak, torch.zeros_like(peak))
    return (torch.round(v * inv) * (peak / levels)).reshape(x.shape)


def _exact_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float16 or bfloat16 where every value survives the round trip, else float32."""
    for dtype in (torch.float16, torch.bfloat16):
        if all(torch.equal(t.to(dtype).float(), t.float()) for t in tensors):
            return dtype
    return torch.float32


def tile_rows(out_features: int) -> int:
    """`out_features` rounded up to whole tiles of 16 outputs."""
    return -(-out_features // TILE) * TILE


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` [out, ...] with its rows padded with zeros to `rows`."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [out, in] (out a multiple of 16) -> uint8 [out / 16, in / chunk, 64]."""
    out_f, in_f = codes.shape
    u = codes.to(torch.uint8)
    if bits <= 4:
        eights = u.view(out_f // TILE, TILE, in_f // 8, 8)
        u = eights[..., :4] | (eights[..., 4:] << 4)  # [tiles, 16, in / 8, 4]
    else:
        u = u.view(out_f // TILE, TILE, in_f // 4, 4)
    return u.permute(0, 2, 1, 3).reshape(out_f // TILE, -1, TILE * 4).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, rows: torch.Tensor) -> torch.Tensor:
    """The unsigned codes of output rows `rows` [n] from `packed`: uint8 [n, in]."""
    tiles = packed[rows // TILE].view(rows.shape[0], packed.shape[1], TILE, 4)  # [n, chunks, 16, 4]
    lane = (rows % TILE)[:, None, None, None].expand(-1, packed.shape[1], 1, 4)
    mine = tiles.gather(2, lane).squeeze(2)  # [n, chunks, 4]
    if bits <= 4:
        mine = torch.cat([mine & 15, mine >> 4], -1)  # [n, chunks, 8]
    return mine.reshape(rows.shape[0], -1)


def _per_tile(t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Scales or offsets [out, groups] -> [tiles, groups, 16] in `dtype`."""
    padded = pad_rows(t.float(), rows)
    return padded.view(rows // TILE, TILE, -1).transpose(1, 2).contiguous().to(dtype)


class VnniLinear(QuantizedLinear):
    """y = x @ W^T through `torch.ops.pagoda_cpu.qgemm`; x float32 or bfloat16."""

    kind = "vnni"
    # float32 x gives float32 y at no cost (the kernel quantizes bf16 and float32 rows alike), so a
    # head's logits need not be rounded to bf16 (LlamaForCausalLM.compute_logits)
    float_logits = True

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, act_bits: int | None = None) -> None:
        super().__init__(qw, bias)
        # generated and prompt rows' activation bits (prompt_rows); one width if given
        self.prompt_bits = activation_bits(qw, prompt=True) if act_bits is None else act_bits
        act_bits = activation_bits(qw) if act_bits is None else act_bits
        if act_bits not in (8, 16):
            raise ValueError(f"activations of 8 or 16 bits, not {act_bits}")
        self.act_bits = act_bits
        per_token = act_bits == 8 and qw.act == "int8" and qw.group_size == qw.in_features
        per_token = per_token and qw.in_features % 4 == 0
        block = qw.in_features if per_token else act_block(qw)
        if block is None or qw.is_float or qw.bits > 8:
            raise ValueError(f"the CPU kernel does not take {qw.bits}-bit groups of {qw.group_size}")
        self.bits = 4 if qw.bits <= 4 else 8
        qw = qw.regroup(block)
        lo, hi = int(qw.codes.min()), int(qw.codes.max())
        self.zero_code = float(1 << (self.bits - 1)) if lo < 0 else 0.0
        if not (0 <= lo + self.zero_code and hi + self.zero_code < 1 << self.bits):
            raise ValueError(f"codes {lo}..{hi} do not fit {self.bits} bits")
        rows = tile_rows(qw.out_features)
        codes = pad_rows((qw.codes.to(torch.int32) + int(self.zero_code)), rows)
        self.packed = pack_codes(codes, self.bits)
        parts = (qw.scale,) if qw.offset is None else (qw.scale, qw.offset)
        dtype = _exact_dtype(*parts)
        self.scale = _per_tile(qw.scale, rows, dtype)
        self.offset = None if qw.offset is None else _per_tile(qw.offset, rows, dtype)
        self.group = block
        # weight-only layers on CPUs with AVX512-BF16: a bf16 model's prompt rows in bf16 (wgemm.cpp:
        # on AMX tiles where the CPU has them), as a dense bf16 model would, where they would take
        # 16 bits (prompt_rows)
        self.prompt_kernel = self.prompt_bits == 16 and bool(torch.ops.pagoda_cpu.wgemm_runs())
        isa = native.isa()
        if per_token:
            isa += ", AMX" if self.bits == 8 and torch.ops.pagoda_cpu.amx() else ""
            self.kind = f"int{self.bits} per channel (pagoda {isa}, int8 activations per token)"
        else:
            prompts = f", prompts int{self.prompt_bits}" if self.prompt_bits != act_bits else ""
            if self.prompt_kernel:
                prompts = ", prompts bf16" + (" on AMX" if torch.ops.pagoda_cpu.amx() else "")
            self.kind = f"int{self.bits} g{block} (pagoda {isa}, int{act_bits} activations{prompts})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype not in (torch.float32, torch.bfloat16):
            rows = rows.float()
        rows = rows.contiguous()
        # prompt rows in bf16 where the model runs in bf16 (float32 asks for integer
        # activations), else at prompt_bits; compiled graphs are decode steps, which have none
        if self.prompt_kernel and rows.dtype == torch.bfloat16:
            prompts: Callable[[torch.Tensor], torch.Tensor] | None = self._wgemm
        else:
            prompts = None if self.prompt_bits == self.act_bits else self._qgemm_prompts
        start = None if torch.compiler.is_compiling() or prompts is None else _prompt.start
        if prompts is None or start is None or start >= rows.shape[0]:
            y = self._qgemm(rows)
        elif start == 0:
            y = prompts(rows)
        else:
            y = torch.cat([self._qgemm(rows[:start]), prompts(rows[start:])])
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return self._finish(y, x)

    def _qgemm(self, rows: torch.Tensor) -> torch.Tensor:
        return self._qgemm_bits(rows, self.act_bits)

    def _qgemm_prompts(self, rows: torch.Tensor) -> torch.Tensor:
        return self._qgemm_bits(rows, self.prompt_bits)

    def _qgemm_bits(self, rows: torch.Tensor, act_bits: int) -> torch.Tensor:
        args = (self.packed, self.scale, self.offset, self.bits, self.group, self.zero_code)
        return torch.ops.pagoda_cpu.qgemm(rows, *args, act_bits)

    def _wgemm(self, rows: torch.Tensor) -> torch.Tensor:
        args = (self.packed, self.scale, self.offset, self.bits, self.group, self.zero_code)
        return torch.ops.pagoda_cpu.wgemm(rows, *args)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Output rows `ids` [n] of the weight, float32 [n, in]: what an embedding tied to this
        layer looks up."""
        flat = ids.reshape(-1)
        u = unpack_rows(self.packed, self.bits, flat).float().view(flat.shape[0], -1, self.group)
        tile, lane = flat // TILE, flat % TILE
        scale = self.scale[tile, :, lane].float()  # [n, groups]
        w = (u - self.zero_code) * scale[..., None]
        if self.offset is not None:
            w = w + self.offset[tile, :, lane].float()[..., None]
        return w.view(*ids.shape, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))
