"""Sliding-window and soft-capped attention (Gemma 2/3, Phi-3) in the backends that have them
(torch; the compiled CPU decode's; Triton's, tested in tests/kernels), beside a dense reference
written from the definition; and `get_backend` handing such a model only to a backend with them."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.models.arch_config import SLIDING_WINDOW, SOFTCAP, ModelArchConfig
from pagoda.engine.runner.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchAttention,
    TritonAttention,
    get_backend,
)
from pagoda.engine.runner.compiled_decode import _GraphDecodeAttention

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


def _reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int, window: int | None, cap: float | None
) -> torch.Tensor:
    """q [n, heads, d] at positions ctx..ctx+n-1 over keys/values [ctx + n, kv_heads, d]."""
    rep = HEADS // KV_HEADS
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        pos = ctx + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(HEADS):
            s = keys[lo : pos + 1, h // rep] @ q[i, h] * DIM**-0.5
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            out[i, h] = torch.softmax(s, 0) @ values[lo : pos + 1, h // rep]
    return out


def _meta(
    decode_lens: list[int], chunk: tuple[int, int] | None, tables: list[list[int]]
) -> AttentionMetadata:
    """Decodes of the given context lengths, then one prefill chunk (context, length)."""
    slots = [tables[i][(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for i, n in enumerate(decode_lens)]
    starts, lens, ctxs, pf_tables = [], [], [], []
    if chunk is not None:
        ctx, n = chunk
        table = tables[len(decode_lens)]
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx, ctx + n)]
        starts, lens, ctxs, pf_tables = [len(decode_lens)], [n], [ctx], [torch.tensor(table)]
    width = max(len(t) for t in tables[: len(decode_lens)]) if decode_lens else 0
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(decode_lens),
        decode_seq_lens=torch.tensor(decode_lens),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables[: len(decode_lens)]]),
        decode_max_seq_len=max(decode_lens, default=0),
        prefill_query_starts=starts,
        prefill_query_lens=lens,
        prefill_context_lens=ctxs,
        prefill_block_tables=pf_tables,
    )


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("cap", [None, 0.5])
def test_torch_backend_matches_the_definition(window: int | None, cap: float | None) -> None:
    """Two decodes (7 and 13 keys, ragged block tables) and a prefill chunk of 5 after 9 cached
    tokens, in one step; the window cuts into every one of them."""
    torch.manual_seed(0)
    tables = [[3, 1], [0, 5, 2, 7], [4, 6, 8, 9]]
    lens = [7, 13, 9 + 5]
    keys = [torch.randn(n, KV_HEADS, DIM) for n in lens]
    values = [torch.randn(n, KV_HEADS, DIM) for n in lens]
    k_cache, v_cache = torch.zeros(10, BLOCK, KV_HEADS, DIM), torch.zeros(10, BLOCK, KV_HEADS, DIM)
    for table, k, v in zip(tables, keys, values, strict=True):  # what earlier steps wrote
        for p in range(k.shape[0]):
            k_cache[table[p // BLOCK], p % BLOCK], v_cache[table[p // BLOCK], p % BLOCK] = k[p], v[p]
    q = torch.randn(2 + 5, HEADS, DIM)
    new_k = torch.cat((keys[0][-1:], keys[1][-1:], keys[2][9:]))
    new_v = torch.cat((values[0][-1:], values[1][-1:], values[2][9:]))
    meta = _meta([7, 13], (9, 5), tables)
    got = TorchAttention(torch.device("cpu")).forward(
        q, new_k, new_v, k_cache, v_cache, meta, DIM**-0.5, window, cap
    )
    want = torch.cat(
        (
            _reference(q[:1], keys[0], values[0], 6, window, cap),
            _reference(q[1:2], keys[1], values[1], 12, window, cap),
            _reference(q[2:], keys[2], values[2], 9, window, cap),
        )
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if window is None:  # a chunk with no cached context (is_causal SDPA, or the eager path)
        fresh = TorchAttention(torch.device("cpu")).forward(
            q[2:],
            keys[2][:5],
            values[2][:5],
            k_cache,
            v_cache,
            _meta([], (0, 5), [tables[2]]),
            DIM**-0.5,
            None,
            cap,
        )
        torch.testing.assert_close(
            fresh, _reference(q[2:], keys[2], values[2], 0, None, cap), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(("window", "cap"), [(None, None), (3, None), (5, 0.5)])
def test_compiled_decode_attention_matches_torch(window: int | None, cap: float | None) -> None:
    """The compiled decode's attention (run eagerly here) masks and caps as the torch backend."""
    torch.manual_seed(1)
    tables = [[3, 1, 0], [0, 5, 2]]
    k_cache, v_cache = torch.randn(6, BLOCK, KV_HEADS, DIM), torch.randn(6, BLOCK, KV_HEADS, DIM)
    q, k, v = torch.randn(2, HEADS, DIM), torch.randn(2, KV_HEADS, DIM), torch.randn(2, KV_HEADS, DIM)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    want = TorchAttention(torch.device("cpu")).forward(
        q, k, v, k_cache, v_cache, _meta([6, 11], None, tables), DIM**-0.5, window, cap
    )
    got = _GraphDecodeAttention(BLOCK).forward(
        q, k, v, kc2, vc2, _meta([6, 11], None, tables), DIM**-0.5, window, cap
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _arch(**kw: object) -> ModelArchConfig:
    base: dict[str, object] = dict(
        architecture="gemma2", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=4,
        num_heads=2, num_kv_heads=1, head_dim=4,
    )  # fmt: skip
    return ModelArchConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_windows_and_needs() -> None:
    types = ("sliding_attention", "full_attention") * 2
    arch = _arch(sliding_window=16, layer_types=types, attn_logit_softcap=50.0)
    assert [arch.layer_window(i, 4096) for i in range(4)] == [16, None, 16, None]
    assert arch.attention_needs(4096) == {SLIDING_WINDOW, SOFTCAP}
    # a window no sequence outgrows is no window: nothing asked of the backend for it
    assert [arch.layer_window(i, 16) for i in range(4)] == [None] * 4
    assert arch.attention_needs(16) == {SOFTCAP}
    assert _arch(sliding_window=16).layer_window(3, 100) == 16  # no layer_types: every layer
    assert _arch().attention_needs(100) == frozenset()
    with pytest.raises(ValueError, match="layer_types names 2 layers, the model has 4"):
        _arch(sliding_window=16, layer_types=types[:2])


def test_backends_with_windows_and_softcaps(monkeypatch: pytest.MonkeyPatch) -> None:
    both = {SLIDING_WINDOW, SOFTCAP}
    assert TorchAttention.features == TritonAttention.features == _GraphDecodeAttention.features == both
    # auto: Triton on a GPU for a model that needs both (built here without a GPU)
    monkeypatch.setattr(TritonAttention, "__init__", AttentionBackend.__init__)
    assert isinstance(get_backend("auto", torch.device("cuda"), frozenset(both)), TritonAttention)
    # a backend without a feature: refused by name, passed over by auto
    monkeypatch.setattr(TritonAttention, "features", frozenset({SOFTCAP}))
    with pytest.raises(
        ValueError, match=r"'triton' has no sliding_window attention.*--attention-backend torch"
    ):
        get_backend("triton", torch.device("cpu"), frozenset({SLIDING_WINDOW}))
    assert isinstance(get_backend("auto", torch.device("cuda"), frozenset(both)), TorchAttention)
