"""Calibration for `pagoda quantize`: text -> token sequences -> the float32 engine model, and
the forward hook that records at a decoder linear's input what the methods need (the sequential
pass that drives them is pagoda/compress/sequential.py). The engine fuses q/k/v into `qkv_proj`
and gate/up into `gate_up_proj`; their parts read the same input, so one record serves all.

The built-in text is the calibration half of the English help CPython ships in
`pydoc_data/topics.py` (40 topics, "id-classes" .. "yield", less the paragraphs the other half
holds: 211k characters, 51k tokens with the demo model's tokenizer): offline, deterministic,
always there, and disjoint from the half `pagoda eval perplexity` scores
(pagoda/compress/corpus.py). Each sample starts one of `num_samples` equal shares of the text (so
they spread over all of it), without a BOS token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pagoda.compress import corpus
from pagoda.compress.algorithms import HessianAccumulator
from pagoda.engine.models import build_model
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.tokenization.tokenizer import Tokenizer

# engine linear (under `layers.{i}.`) -> the Hugging Face linears (under `model.layers.{i}.`) it fuses
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def calibration_text(source: str) -> str:
    """The calibration text: for "builtin" the calibration half of CPython's pydoc topics (never
    the text `pagoda eval perplexity` scores), else a file."""
    if source == "builtin":
        return corpus.calibration_text()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"calibration file {source!r} does not exist; pass a text file or 'builtin'")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration file {source!r} is empty; pass a text file with text in it")
    return text


def calibration_samples(tokenizer: Tokenizer, text: str, num_samples: int, seq_len: int) -> list[list[int]]:
    """`num_samples` sequences of `seq_len` tokens, one from the start of each of `num_samples`
    equal shares of the text. Only what each needs is tokenized (a prefix of 8 characters per
    token, doubled until it gives more than `seq_len` tokens): the whole pydoc text takes 0.7 s
    to tokenize on a busy 2-core machine, the 64 x 256 default reads 28% of it."""
    share = len(text) // num_samples
    samples = []
    for i in range(num_samples):
        piece = text[i * share : (i + 1) * share]
        chars = 8 * seq_len
        ids = tokenizer.encode(piece[:chars], add_special_tokens=False)
        while len(ids) <= seq_len and chars < len(piece):  # the window must not end at the cut
            chars *= 2
            ids = tokenizer.encode(piece[:chars], add_special_tokens=False)
        if len(ids) < seq_len:
            raise ValueError(
                f"the calibration text ({len(text)} characters) is too short for --num-samples "
                f"{num_samples} x --seq-len {seq_len}: a 1/{num_samples} share gives {len(ids)} tokens; "
                "pass a longer text or fewer or shorter samples"
            )
        samples.append(ids[:seq_len])
    return samples


def build_float_model(
    arch: ModelArchConfig, weights: Iterable[tuple[str, torch.Tensor]], max_position: int
) -> LlamaForCausalLM:
    """The engine's model in float32 on the CPU, unquantized (as EngineCore._load_model builds it)."""
    with torch.device("meta"):
        model = build_model(arch, max_position)
    assert isinstance(model, LlamaForCausalLM), "pagoda quantize takes decoders"
    model = model.to_empty(device="cpu")
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights((name, tensor.float()) for name, tensor in weights)
    return model.float().eval()


@dataclass
class InputStats:
    """What calibration saw at one linear input: the streamed Hessian (GPTQ, SparseGPT), the
    per-channel absolute maximum (SmoothQuant) and a strided sample of rows (AWQ)."""

    in_features: int
    hessian: HessianAccumulator | None = None  # float64 sums: 16k tokens of 1536 inputs
    absmax: torch.Tensor | None = None  # [in] float32
    samples: list[torch.Tensor] = field(default_factory=list)  # [k, in] float32 each

    def sample_matrix(self) -> torch.Tensor:  # [n, in]
        assert self.samples, "no activation samples were collected for this input"
        return torch.cat(self.samples)


@dataclass(frozen=True)
class Needs:
    hessian: bool = False
    absmax: bool = False
    sample_stride: int = 0  # keep every k-th row (0: keep none)


_Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]


def recorder(record: InputStats, needs: Needs) -> _Hook:
    """A forward hook adding a linear's inputs to `record`."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].reshape(-1, record.in_features).float()  # [tokens, in]
        if record.hessian is not None:
            record.hessian.add(x)
        if needs.absmax:
            peak = x.abs().amax(dim=0)
            record.absmax = peak if record.absmax is None else torch.maximum(record.absmax, peak)
        if needs.sample_stride:
            record.samples.append(x[:: needs.sample_stride].clone())

    return hook
