"""A checkpoint's model on a device: built on "meta", loaded (a tensor-parallel rank's shard
only), quantized or packed for oneDNN as configured. What an engine and each of its
tensor-parallel followers do alike."""

from __future__ import annotations

import torch

from pagoda.engine.distributed.pipeline import PipelineStage
from pagoda.engine.distributed.tensor_parallel import SINGLE, TensorParallel
from pagoda.engine.loader import Checkpoint
from pagoda.engine.models import Model, build_model
from pagoda.engine.models.quantization import quantize_linears
from pagoda.engine.models.weight_loading import LoadReport
from pagoda.engine.runner.onednn_linear import onednn_bf16_available, pack_linears


def load_model(
    ckpt: Checkpoint,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str,
    tp: TensorParallel = SINGLE,
    stage: PipelineStage | None = None,
) -> tuple[Model, LoadReport, int]:
    """(model, what loaded quantized, linears packed for oneDNN); with `stage`, that pipeline
    stage's part only."""
    with torch.device("meta"):
        if stage is None:
            model = build_model(ckpt.arch, max_model_len, tp)
        else:
            from pagoda.engine.distributed.pipeline_model import LlamaStage  # (it imports the models)

            model = LlamaStage(ckpt.arch, max_model_len, tp, stage)
    keep = quantization == ckpt.quantization  # the checkpoint's own, served packed
    report = model.load_weights(ckpt.weights(), device, dtype, keep_quantized=keep)
    model.eval()
    packed = 0
    if quantization in ("int8", "int4"):
        quantize_linears(model, quantization)
    if device.type == "cpu" and dtype == torch.bfloat16 and onednn_bf16_available():
        packed = pack_linears(model)  # the linears still dense, if any
    return model, report, packed
