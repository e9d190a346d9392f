"""Layers shared by every model family: RMSNorm, rotary embedding, gated MLP.

Each layer runs in PyTorch, or as a Triton kernel (kernels/) when `use_triton_layers` switched it
on: the engine does so alongside a Triton attention backend (on a GPU by default)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.models.rope_scaling import rope_parameters


def _native_kernels() -> bool:
    """Whether pagoda's CPU kernels run here (a constant to torch.compile, which would otherwise
    trace the check's read of /proc/cpuinfo)."""
    from pagoda.engine.quantization.linear import native_kernels

    return native_kernels()


# what torch.compiler.assume_constant_result sets, without its import of torch._dynamo (seconds of
# start-up for every process that only runs eagerly: a follower rank, a pipeline stage)
_native_kernels._dynamo_marked_constant = True  # type: ignore[attr-defined]


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialized when built on "meta" (its loader fills it): the random init's
    meta kernel imports torch._dynamo, seconds of start-up for a process that only runs eagerly."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)  # as nn.Embedding does
    return nn.Embedding(num, dim, _weight=weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_triton = False

    def _native(self, x: torch.Tensor) -> bool:
        """bf16 on a CPU with pagoda's kernels: one pass (csrc/norm.cpp), HF's numerics."""
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or self.weight.dtype != torch.bfloat16:
            return False
        return _native_kernels()

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        if self._native(x) and residual.dtype == x.dtype:
            out, res = torch.ops.pagoda_cpu.add_rms_norm(
                x.contiguous(), residual.contiguous(), self.weight, self.eps
            )
            return out, res
        if self.use_triton:
            from pagoda.kernels.rms_norm import rms_norm

            out, res = rms_norm(x, self.weight, self.eps, residual)
            assert res is not None
            return out, res
        s = x + residual
        return self(s), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            return torch.ops.pagoda_cpu.rms_norm(x.contiguous(), self.weight, self.eps)  # type: ignore[no-any-return]
        if self.use_triton:
            from pagoda.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        # HF's numerics (normalize in float32, cast back, then scale), bitwise: torch's rms_norm
        # without a weight is x * rsqrt(mean(x^2) + eps) in one call instead of six
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (HF's rotate_half layout) with a cos/sin table indexed by position. The
    table is built on the device of first use, so the module can be constructed on "meta".

    `rotary_dim` < head_dim (partial rotary, Phi-4-mini): only the first rotary_dim dims of each
    head turn, the rest pass through. YaRN and LongRoPE scale cos and sin by an attention factor,
    folded into the tables."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.inv_freq, self.attention_factor = rope_parameters(self.rotary_dim, base, scaling, max_position)
        self.max_position = max_position
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._use_triton = False
        self._cos_sin_table: torch.Tensor | None = None  # [max_position, head_dim] for the kernel

    @property
    def use_triton(self) -> bool:
        return self._use_triton

    @use_triton.setter
    def use_triton(self, enabled: bool) -> None:
        """The kernel turns whole heads: a partial rotary stays in PyTorch."""
        self._use_triton = enabled and self.rotary_dim == self.head_dim

    def build_tables(self, device: torch.device) -> None:
        """Build the cos/sin tables on `device` now (a compiled graph reads them as constants)."""
        self._cos_sin(device)

    def _cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0].device != device:
            t = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
            freqs = torch.outer(t, self.inv_freq)  # [max_position, head_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)
            # rotate_half(x) * sin == swap_halves(x) * cat(-sin, sin), bitwise (negation is exact)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            cos = emb.cos()
            if self.attention_factor != 1.0:  # as HF: cos(emb) * factor, in float32
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
            self._tables = (cos.to(device), sin.to(device))
        return self._tables

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]
        if self.use_triton:
            return self._forward_triton(positions, q, k)
        _, cos, sin = self._step_cos_sin(positions, q.dtype)
        if self.rotary_dim != self.head_dim:
            return self._partial(q, cos, sin), self._partial(k, cos, sin)
        return q * cos + _swap_halves(q) * sin, k * cos + _swap_halves(k) * sin

    def forward_qk(self, positions: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
        """RoPE on the query and key heads together: qk [tokens, heads + kv_heads, head_dim], a
        view of the fused qkv output. Returns a new tensor of that shape."""
        _, cos, sin = self._step_cos_sin(positions, qk.dtype)
        if self.rotary_dim != self.head_dim:
            return self._partial(qk, cos, sin)
        return qk * cos + _swap_halves(qk) * sin

    def _partial(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rotary_dim dims of x [tokens, heads, head_dim], the rest unchanged."""
        rot = x[..., : self.rotary_dim]
        return torch.cat((rot * cos + _swap_halves(rot) * sin, x[..., self.rotary_dim :]), dim=-1)

    def _step_cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, cos, sign-folded sin), cos/sin [tokens, 1, head_dim] in `dtype`: every layer
        of a step passes the same positions tensor, so they are gathered once per step."""
        last = self._last
        if torch.compiler.is_compiling():  # one graph: the gather is fused, nothing to cache
            cos_t, sin_t = self._cos_sin(positions.device)
            return positions, cos_t[positions].unsqueeze(1).to(dtype), sin_t[positions].unsqueeze(1).to(dtype)
        if last is None or last[0] is not positions or last[1].dtype != dtype:
            cos_t, sin_t = self._cos_sin(positions.device)
            last = (
                positions,
                cos_t[positions].unsqueeze(1).to(dtype),
                sin_t[positions].unsqueeze(1).to(dtype),
            )
            self._last = last
        return last

    def _forward_triton(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pagoda.kernels.rotary import cos_sin_table, rotary_embedding

        table = self._cos_sin_table
        if table is None or table.device != q.device:
            table = cos_sin_table(self.inv_freq, self.max_position, q.device)
            if self.attention_factor != 1.0:
                table = table * self.attention_factor
            self._cos_sin_table = table
        rotary_embedding(positions, q, k, table, neox=True)  # in place
        return q, k


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] -> the two halves of the last dim swapped, in one op (no reshape of the
    strided qkv view, which would make the compiler specialize a batch of one)."""
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():  # roll checks for an empty tensor: no unbacked batch size
        return torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.roll(x, half, dims=-1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up in one matmul. Tensor-parallel: `intermediate`
    is this rank's slice and `reduce` sums down's partial outputs over the ranks."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.reduce = reduce
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.use_triton:
            from pagoda.kernels.activation import silu_and_mul

            return self.reduce(self.down_proj(silu_and_mul(gate_up)))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.reduce(self.down_proj(F.silu(gate) * up))


def use_triton_layers(model: nn.Module, enabled: bool) -> int:
    """Switch the model's RMSNorm, rotary and gated-MLP layers to their Triton kernels (or back);
    returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, RMSNorm | RotaryEmbedding | GatedMLP):
            module.use_triton = enabled
            count += 1
    return count


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> int:
    """Replace each nn.Linear of `model` by `make(its attribute name, it)` where that gives a
    module (quantized or packed twins; None keeps the linear); returns how many were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (new := make(name, child)) is not None:
                setattr(module, name, new)
                count += 1
    return count
