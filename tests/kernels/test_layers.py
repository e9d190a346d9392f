"""RMSNorm (+ fused residual), rotary embedding (neox/gptj, Llama-3 scaling) and SiLU-and-mul
kernels against their references."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.models.rope_scaling import rope_inv_freq
from pagoda.kernels.activation import silu_and_mul
from pagoda.kernels.reference import rms_norm_ref, rotary_ref, silu_and_mul_ref
from pagoda.kernels.rms_norm import rms_norm
from pagoda.kernels.rotary import cos_sin_table, rotary_embedding
from tests.kernels import DEV

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, fused: bool) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    res = torch.randn(5, hidden, generator=g).to(dtype).to(DEV) if fused else None
    out, new_res = rms_norm(x, w, 1e-5, res)
    want, want_res = rms_norm_ref(x, w, 1e-5, res)
    _close(out, want, dtype)
    if fused:
        assert new_res is not None and want_res is not None
        # exact where the interpreter rounds like torch (it truncates float32 -> bfloat16)
        if dtype == torch.bfloat16:
            _close(new_res, want_res, dtype)
        else:
            assert torch.equal(new_res, want_res)


def test_rms_norm_one_row_and_per_head() -> None:
    """One token; and Qwen3's per-head norm over a strided view of the qkv output."""
    x = torch.randn(1, 64, device=DEV)
    w = torch.randn(64, device=DEV)
    torch.testing.assert_close(rms_norm(x, w, 1e-6)[0], rms_norm_ref(x, w, 1e-6)[0])
    q = torch.randn(3, 4 * 32 + 64, device=DEV)[:, :128].view(3, 4, 32)
    w = torch.randn(32, device=DEV)
    torch.testing.assert_close(rms_norm(q, w, 1e-6)[0], rms_norm_ref(q, w, 1e-6)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 1, 64), (8, 2, 80), (3, 3, 16)])
def test_rotary(dtype: torch.dtype, neox: bool, heads: int, kv_heads: int, head_dim: int) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}
    table = cos_sin_table(rope_inv_freq(head_dim, 500000.0, scaling), 300, DEV)
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEV)
    q = qkv[:, : heads * head_dim].view(6, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 63, 64, 65, 299], device=DEV)
    want_q, want_k = rotary_ref(positions, q, table, neox), rotary_ref(positions, k, table, neox)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    rotary_embedding(positions, q, k, table, neox)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


def test_rotary_matches_the_model_layer() -> None:
    """The table + neox kernel reproduce engine.models.layers.RotaryEmbedding (HF's layout)."""
    from pagoda.engine.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(32, 128, 10000.0, {"rope_type": "linear", "factor": 2.0})
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    pos = torch.tensor([0, 5, 17, 127])
    want_q, want_k = rope(pos, q, k)  # on the CPU
    q, k, pos = q.to(DEV), k.to(DEV), pos.to(DEV)
    rotary_embedding(pos, q, k, cos_sin_table(rope.inv_freq, 128, DEV))
    torch.testing.assert_close(q.cpu(), want_q)
    torch.testing.assert_close(k.cpu(), want_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 96), (3, 1500)])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = torch.randn(tokens, 2 * inter).to(dtype).to(DEV)
    _close(silu_and_mul(x), silu_and_mul_ref(x), dtype)
