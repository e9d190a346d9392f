"""GGUF quantized tensors -> QuantizedWeight, without going through float weights.

Q4_0, Q4_1 and Q8_0 are decoded from their blocks directly (an fp16 scale, an fp16 minimum for
Q4_1, then the codes). The K-quants pack 6-bit sub-block scales whose layout is easy to get
wrong, so their scales and offsets are read through gguf-py's own dequantizer instead: with every
code set to the value that makes w equal the sub-block's scale (and Q4_K/Q5_K's `dmin` zeroed),
the dequantized block *is* the scale; with every code 0 it is the offset. The codes then follow
from the tensor's dequantized values, (w - offset) / scale rounded, which is exact for values the
format can hold.

| type | group | codes | w |
|---|---|---|---|
| Q4_0 | 32 | 0..15 | d * (q - 8) |
| Q4_1 | 32 | 0..15 | d * q + m |
| Q8_0 | 32 | -128..127 | d * q |
| Q4_K | 32 | 0..15 | d * sc * q - dmin * m |
| Q5_K | 32 | 0..31 | d * sc * q - dmin * m |
| Q6_K | 16 | 0..63 | d * sc * (q - 32) |
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pagoda.engine.quantization.weights import QuantizedWeight

Q = GGMLQuantizationType
# type -> (group, bits of the QuantizedWeight, [(byte slice of a block, fill) giving w == scale],
#          [(byte slice, fill) giving w == offset]); fills outside the listed slices keep the block
_K_PROBES: dict[GGMLQuantizationType, tuple[int, int, list[tuple[slice, int]], list[tuple[slice, int]]]] = {
    # d(2) dmin(2) scales(12) qs(128): codes 1 with dmin 0 -> d*sc; codes 0 -> -dmin*m
    Q.Q4_K: (32, 4, [(slice(2, 4), 0), (slice(16, 144), 0x11)], [(slice(16, 144), 0)]),
    # d(2) dmin(2) scales(12) qh(32) qs(128)
    Q.Q5_K: (32, 8, [(slice(2, 4), 0), (slice(16, 48), 0), (slice(48, 176), 0x11)], [(slice(16, 176), 0)]),
    # ql(128) qh(64) scales(16) d(2): code 33 (low nibble 1, high bits 0b10) -> d*sc; code 0 -> -32*d*sc
    Q.Q6_K: (16, 8, [(slice(0, 128), 0x11), (slice(128, 192), 0xAA)], [(slice(0, 192), 0)]),
}
QUANTIZED_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0, *_K_PROBES})


def gguf_quantized_weight(
    data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]
) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (`data`: [out, bytes per row] uint8) as a QuantizedWeight of
    `shape` [out, in] (torch order)."""
    out_f, in_f = shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(out_f, in_f // block, type_size)
    if qtype in (Q.Q4_0, Q.Q4_1):
        return _q4_legacy(blocks, qtype, shape)
    if qtype == Q.Q8_0:
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        codes = torch.from_numpy(blocks[..., 2:34].copy().view(np.int8)).reshape(out_f, in_f).to(torch.int16)
        return QuantizedWeight(codes, d, None, bits=8)
    if qtype in _K_PROBES:
        return _k_quant(blocks, qtype, shape)
    raise ValueError(f"GGUF type {qtype.name} cannot be kept quantized")


def _q4_legacy(blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> QuantizedWeight:
    """Q4_0 (d, 16 bytes of nibbles) and Q4_1 (d, m, nibbles): element j < 16 is byte j's low
    nibble, element 16 + j its high nibble."""
    out_f, in_f = shape
    head = 2 if qtype == Q.Q4_0 else 4
    halves = blocks[..., 0:head].copy().view(np.float16).astype(np.float32)  # [out, blocks, 1|2]
    d = torch.from_numpy(halves[..., 0])
    qs = blocks[..., head : head + 16]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [out, blocks, 32]
    codes = torch.from_numpy(nibbles.astype(np.int16)).reshape(out_f, in_f)
    offset = -8.0 * d if qtype == Q.Q4_0 else torch.from_numpy(halves[..., 1])
    return QuantizedWeight(codes, d, offset, bits=4)


def _k_quant(blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> QuantizedWeight:
    out_f, in_f = shape
    group, bits, scale_fill, offset_fill = _K_PROBES[qtype]

    def probe(fills: list[tuple[slice, int]]) -> np.ndarray:  # [out, in / group]: one value per group
        probed = blocks.copy()
        for where, byte in fills:
            probed[..., where] = byte
        w = dequantize(probed.reshape(out_f, -1), qtype).reshape(out_f, in_f // group, group)
        return w[..., 0].astype(np.float32)

    scale, offset = probe(scale_fill), probe(offset_fill)
    w = dequantize(blocks.reshape(out_f, -1), qtype).reshape(out_f, in_f // group, group)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    codes = np.where(scale[..., None] == 0, 0, np.rint((w - offset[..., None]) / safe))
    return QuantizedWeight(
        torch.from_numpy(codes.astype(np.int16)).reshape(out_f, in_f),
        torch.from_numpy(scale),
        torch.from_numpy(offset),
        bits=bits,
    )
