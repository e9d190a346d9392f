"""Token embeddings held quantized (GGUF keeps them at 8 bits, Q8_0 or Q6_K), and the LM head
of a model whose head is tied to them."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.quantization.linear import QuantizedLinear, _unsigned, make_linear, native_linear
from pagoda.engine.quantization.vnni import VnniLinear
from pagoda.engine.quantization.weights import QuantizedWeight


class QuantizedEmbedding(nn.Module):
    """Rows of codes (uint8) with per-group scales and offsets; a lookup dequantizes only the rows
    it gathers."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qw.out_features, qw.in_features
        self.group = qw.group_size
        signed = int(qw.codes.min()) < 0
        if signed and int(qw.codes.min()) >= -128 and int(qw.codes.max()) <= 127:  # Q8_0: no offset
            codes, offset = qw.codes.to(torch.int8), qw.offset
        else:
            codes, offset = _unsigned(qw, 8)
            codes = codes.to(torch.uint8)
        self.codes = codes.contiguous()
        # float32 scales (GGUF's fp16 ones exactly) and float32 math, then the run dtype: each
        # row comes out as the dense embedding's row would (bf16(d * q), not bf16(bf16(d) * q):
        # that double rounding flipped the demo's greedy answer to its first chat question)
        self.scale = qw.scale.float().contiguous()
        self.offset = None if offset is None else offset.float().contiguous()
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids].float().view(*ids.shape, -1, self.group)
        w = rows * self.scale[ids][..., None]
        if self.offset is not None:
            w = w + self.offset[ids][..., None]
        return w.view(*ids.shape, self.embedding_dim).to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:  # [vocab, hidden] float32
        return self(torch.arange(self.num_embeddings)).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, 8-bit g{self.group}"


def tied_head(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The LM head of a model whose head is its quantized embedding matrix. On pagoda's CPU kernel
    (native_linear) the embedding's own codes, which the embedding then reads (TiedEmbedding);
    else on a CPU with fbgemm:
    int8 per channel against int8 activations per row (the demo's 576 -> 49,152 head in 0.5 ms at
    one row, where 8-bit weights against bf16 activations took 1.8-2.4 ms: the head is a tenth of
    a quantized decode step), re-quantized from the embedding's values; elsewhere the embedding's
    own codes through make_linear."""
    from pagoda.engine.models.quantization import Int8DynamicLinear, int8_supported

    native = native_linear(qw, None, device)
    if native is not None:
        return native
    if int8_supported(device):
        return Int8DynamicLinear.from_weight(qw.dequantize(), None, digits=2)
    head: QuantizedLinear = make_linear(qw, None, device, dtype)
    return head


class TiedEmbedding(nn.Module):
    """The embedding of a model whose LM head is a VnniLinear over the same matrix: it looks its
    rows up in the head's packed codes, so the matrix is held once (the demo: 28 MiB, not 56)."""

    def __init__(self, head: VnniLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a list: the head is the model's module, not this one's
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(ids).to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:  # [vocab, hidden] float32
        return self.head[0].dequantized_weight()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, the LM head's codes"
