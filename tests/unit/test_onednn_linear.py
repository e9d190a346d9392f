"""bf16 linears with oneDNN-packed weights: F.linear's results, eager and compiled, and the engine
packs them exactly where oneDNN multiplies bf16 natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.core import model_loading
from pagoda.engine.llm import LLM
from pagoda.engine.runner.onednn_linear import (
    OneDnnLinear,
    onednn_bf16_available,
    onednn_bf16_supported,
    pack_linears,
)
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import make_tiny_model

PACKS = onednn_bf16_available()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96, bias=True)
        self.down = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 10, bias=False).float()  # stays float32: not packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(F.silu(self.up(x))).float())


def _block() -> tuple[_Block, _Block]:
    torch.manual_seed(0)
    plain = _Block()
    plain.up.bfloat16()
    plain.down.bfloat16()
    packed = _Block()
    packed.load_state_dict(plain.state_dict())
    packed.up.bfloat16()
    packed.down.bfloat16()
    return plain, packed


@pytest.mark.skipif(not onednn_bf16_supported(), reason="oneDNN reports no bf16 matmul on this CPU")
def test_packed_linears_give_f_linear_results_eager_and_compiled() -> None:
    plain, packed = _block()
    assert pack_linears(packed) == 2  # the bf16 ones
    assert isinstance(packed.up, OneDnnLinear) and isinstance(packed.down, OneDnnLinear)
    assert type(packed.head) is nn.Linear and "onednn-packed" in repr(packed.up)
    with torch.inference_mode():
        # bit-identical on an AVX512-BF16 EPYC; bf16 rounding apart where oneDNN picks another
        # kernel for the plain matrix (AMX)
        for rows in (1, 7, 33):
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            torch.testing.assert_close(packed(x), plain(x), rtol=2e-2, atol=1e-3)
        x3 = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # leading dims and a strided input
        torch.testing.assert_close(packed(x3), plain(x3), rtol=2e-2, atol=1e-3)
        xt = torch.randn(64, 9, dtype=torch.bfloat16).t()
        torch.testing.assert_close(packed(xt), plain(xt), rtol=2e-2, atol=1e-3)
        compiled = torch.compile(packed, fullgraph=True)
        for rows in (3, 16):  # one graph, the batch dimension dynamic
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), plain(x), rtol=1e-2, atol=1e-2)


def test_engine_packs_where_onednn_has_bf16_with_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_model("llama", tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    prompts = [[256, 5, 9, 200, 17], [256, *range(40, 70)]]

    def run() -> tuple[LLM, list[list[int]], list[dict[int, float]]]:
        llm = LLM(str(tmp_path), dtype="bfloat16", kv_cache_memory=1 << 22, max_model_len=128)
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert all(o.logprobs for o in outs)
        return llm, [o.token_ids for o in outs], [o.logprobs[0].top for o in outs if o.logprobs]

    llm, packed_tokens, packed_first = run()
    kinds = {type(m) for m in llm.engine.model.modules()}
    assert (OneDnnLinear in kinds) == PACKS and (nn.Linear in kinds) != PACKS, kinds
    monkeypatch.setattr(model_loading, "onednn_bf16_available", lambda: False)
    plain_llm, plain_tokens, plain_first = run()
    assert not any(isinstance(m, OneDnnLinear) for m in plain_llm.engine.model.modules())
    # the same first distributions (bf16 rounding apart), the same first tokens; the rest of the
    # greedy tokens were identical on an AVX512-BF16 EPYC
    assert [t[0] for t in packed_tokens] == [t[0] for t in plain_tokens]
    for got, ref in zip(packed_first, plain_first, strict=True):
        assert got.keys() == ref.keys()
        assert all(got[t] == pytest.approx(ref[t], abs=0.05) for t in ref), (got, ref)
