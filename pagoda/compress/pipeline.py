"""`quantize_model`: a checkpoint in, every linear quantized (or pruned) under its Hugging Face
name out, ready for the writer (pagoda/compress/writer.py) and for tests to compare against.

Order of work: the scheme/method pair and every layer's group size are checked first (from the
architecture alone, before a weight is read); then the weights load in float32; then each
decoder layer in turn is calibrated when the method needs it (GPTQ, SparseGPT, SmoothQuant, AWQ;
RTN, FP8 and magnitude pruning need none) on the outputs of the already-quantized layers before
it (pagoda/compress/sequential.py), smoothed (SmoothQuant/AWQ factors folded,
pagoda/compress/smoothing.py), and its seven linears quantized. Embeddings, norms and the LM head
stay unquantized.

Measured on the demo (SmolLM2-135M from its Q4_1 GGUF), perplexity on 2048 held-out tokens of
docs/*.md (float 53.2), 32 x 256 calibration tokens: W4A16 g64 RTN 75.7, GPTQ 63.2, AWQ 68.2;
W8A8 RTN 53.55, SmoothQuant+GPTQ 53.26, SmoothQuant+RTN 53.40; FP8_DYNAMIC 54.2; 2:4 magnitude
1817, SparseGPT 125. `pagoda quantize` W4A16 g64 GPTQ with the default 64 x 256 tokens: 121 s end
to end on the quiet 2-core machine; RTN: 4.5 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from pagoda.compress import algorithms
from pagoda.compress.calibration import (
    FUSED_PARTS,
    InputStats,
    Needs,
    build_float_model,
    calibration_samples,
    calibration_text,
)
from pagoda.compress.options import (
    NEEDS_ABSMAX,
    NEEDS_HESSIAN,
    NEEDS_SAMPLES,
    QuantizeOptions,
    needs_calibration,
    resolve_method,
    resolve_observer,
)
from pagoda.compress.scheme import Scheme, check_group_size, parse_scheme
from pagoda.compress.sequential import LayerRunner
from pagoda.compress.smoothing import fold, layer_smoothings, smoothed_hessian
from pagoda.engine.loader import Checkpoint
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.quantization.weights import QuantizedWeight


@dataclass
class QuantizedModel:
    """Every tensor of the quantized model under its Hugging Face name."""

    arch: ModelArchConfig
    scheme: Scheme
    method: str
    linears: dict[str, QuantizedWeight]  # "model.layers.0.self_attn.q_proj" -> its quantized weight
    tensors: dict[str, torch.Tensor]  # every other tensor, float32 (2:4: the pruned linears too)
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time


def linear_names(arch: ModelArchConfig) -> list[tuple[str, int]]:
    """(HF linear name, in_features) of every decoder linear, layer by layer."""
    q_size = arch.num_heads * arch.head_dim
    inputs = {"self_attn.o_proj": q_size, "mlp.down_proj": arch.intermediate_size}
    return [
        (f"model.layers.{i}.{part}", inputs.get(part, arch.hidden_size))
        for i in range(arch.num_layers)
        for parts in FUSED_PARTS.values()
        for part in parts
    ]


def plan(options: QuantizeOptions, arch: ModelArchConfig) -> tuple[Scheme, str]:
    """(scheme, method) for `options`; ValueError, naming what fits, when the scheme, the method
    or the group size does not suit each other or this model."""
    scheme = parse_scheme(options.scheme, options.group_size)
    method = resolve_method(scheme.name, options.method)
    scheme = replace(scheme, observer=resolve_observer(method, options.observer))
    for name, in_features in linear_names(arch):
        check_group_size(scheme, in_features, name)
    return scheme, method


def quantize_model(ckpt: Checkpoint, options: QuantizeOptions, progress: bool = True) -> QuantizedModel:
    scheme, method = plan(options, ckpt.arch)
    t0 = time.perf_counter()
    weights = {name: _as_float(tensor) for name, tensor in ckpt.weights()}
    seconds = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    runner = (
        start_calibration(ckpt, weights, options, method, progress) if needs_calibration(method) else None
    )
    seconds["embed"] = time.perf_counter() - t0
    linears: dict[str, QuantizedWeight] = {}
    t0 = time.perf_counter()
    for i in tqdm(
        range(ckpt.arch.num_layers), desc=f"{scheme.name} {method}", unit="layer", disable=not progress
    ):
        stats = runner.collect(i) if runner is not None else {}
        if method in NEEDS_ABSMAX or method in NEEDS_SAMPLES:
            smooth_layer(weights, stats, ckpt.arch, i, scheme, method)
        with one_thread():
            quantize_layer(weights, linears, stats, i, scheme, method, options)
        if runner is not None:
            runner.advance(i, layer_tensors(weights, linears, i))
    seconds["layers"] = time.perf_counter() - t0
    return QuantizedModel(ckpt.arch, scheme, method, linears, weights, seconds)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the algorithms on one intra-op thread. GPTQ and SparseGPT sweep a column at a time:
    thousands of small ops, each a parallel region on two threads, which stalls whenever the
    other core is busy. Measured on the 2-core machine under load, W4 g64 GPTQ of a 576x1536
    weight: 1.1 s on one thread, 5-23 s on two (RTN x10: 0.02-0.05 s against 0.2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_float(tensor: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """A source tensor in float32 (a linear of an already-quantized checkpoint dequantized)."""
    return tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor.float()


def quantize_layer(
    weights: dict[str, torch.Tensor],
    linears: dict[str, QuantizedWeight],
    stats: dict[str, InputStats],
    i: int,
    scheme: Scheme,
    method: str,
    options: QuantizeOptions,
) -> None:
    """Layer i's seven linears: a QuantizedWeight moves from `weights` to `linears`; a pruned
    weight (2:4) replaces its float one in `weights`."""
    for site, parts in FUSED_PARTS.items():
        record = stats.get(f"layers.{i}.{site}")
        acc = record.hessian if record is not None else None
        hessian = acc.hessian().float() if acc is not None else None
        for part in parts:
            name = f"model.layers.{i}.{part}"
            result = quantize_linear(weights[name + ".weight"], scheme, method, hessian, options)
            if isinstance(result, QuantizedWeight):
                del weights[name + ".weight"]
                linears[name] = result
            else:
                weights[name + ".weight"] = result


def layer_tensors(
    weights: dict[str, torch.Tensor], linears: dict[str, QuantizedWeight], i: int
) -> dict[str, torch.Tensor]:
    """Layer i's tensors as the quantized model holds them (linears dequantized), HF names."""
    prefix = f"model.layers.{i}."
    out = {name: t for name, t in weights.items() if name.startswith(prefix)}
    out.update({f"{name}.weight": qw.dequantize() for name, qw in linears.items() if name.startswith(prefix)})
    return out


def start_calibration(
    ckpt: Checkpoint, weights: dict[str, torch.Tensor], options: QuantizeOptions, method: str, progress: bool
) -> LayerRunner:
    """The float32 engine model built from `weights`, the calibration sequences embedded."""
    samples = calibration_samples(
        ckpt.tokenizer, calibration_text(options.calibration), options.num_samples, options.seq_len
    )
    total = options.num_samples * options.seq_len
    needs = Needs(
        hessian=method in NEEDS_HESSIAN,
        absmax=method in NEEDS_ABSMAX,
        sample_stride=-(-total // options.sample_rows) if method in NEEDS_SAMPLES else 0,
    )
    model = build_float_model(ckpt.arch, weights.items(), options.seq_len)
    return LayerRunner(model, samples, needs, progress)


def smooth_layer(
    weights: dict[str, torch.Tensor],
    stats: dict[str, InputStats],
    arch: ModelArchConfig,
    i: int,
    scheme: Scheme,
    method: str,
) -> None:
    """SmoothQuant or AWQ on layer i: each factor found from the calibration stats, folded into
    the weights, and the site's Hessian (if any) moved to the smoothed input."""
    for smoothing in layer_smoothings(arch, i, with_v_to_o=method in NEEDS_SAMPLES):
        record = stats[smoothing.site]
        ws = [weights[name + ".weight"] for name in smoothing.linears]
        if method in NEEDS_SAMPLES:
            s = algorithms.awq_search(record.sample_matrix(), ws, scheme)
        else:
            assert record.absmax is not None, smoothing.site
            s = algorithms.smoothquant_factors(record.absmax, ws)
        fold(weights, smoothing, s)
        if record.hessian is not None:  # the sum of x^T x moves with x like the Hessian
            record.hessian.sum = smoothed_hessian(record.hessian.sum, s)


def quantize_linear(
    w: torch.Tensor, scheme: Scheme, method: str, hessian: torch.Tensor | None, options: QuantizeOptions
) -> QuantizedWeight | torch.Tensor:
    """One linear's weight [out, in] float32 -> its QuantizedWeight, or the pruned weight (2:4)."""
    damp = options.dampening_frac
    if scheme.sparse_24:
        if method == "sparsegpt":
            assert hessian is not None, "sparsegpt needs the calibration Hessian"
            return algorithms.sparsegpt_24(w, hessian, damp=damp)
        return algorithms.magnitude_24(w)
    if scheme.float_codes:
        return algorithms.fp8(w, scheme)
    if method in NEEDS_HESSIAN:  # gptq, smoothquant (+gptq)
        assert hessian is not None, f"{method} needs the calibration Hessian"
        return algorithms.gptq(w, hessian, scheme, damp=damp, actorder=options.actorder)
    return algorithms.rtn(w, scheme)  # rtn, awq (on the scaled weight), smoothquant+rtn
