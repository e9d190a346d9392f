"""The compressor's algorithms in one import (`from pagoda.compress.algorithms import gptq, rtn`),
split by what they hold: rtn.py (round to nearest, int and fp8), hessian.py (calibration
Hessians), gptq.py (GPTQ, SparseGPT 2:4, magnitude 2:4), scaling.py (SmoothQuant, AWQ). All take
float32 weights [out, in] and are device-agnostic (they run where their tensors are)."""

from pagoda.compress.gptq import gptq, magnitude_24, sparsegpt_24
from pagoda.compress.hessian import HessianAccumulator, hessian_from, inverse_cholesky
from pagoda.compress.rtn import fake_quantize, fp8, output_error, qparams, rtn, to_codes
from pagoda.compress.scaling import awq_search, smoothquant_factors

__all__ = [
    "HessianAccumulator",
    "awq_search",
    "fake_quantize",
    "fp8",
    "gptq",
    "hessian_from",
    "inverse_cholesky",
    "magnitude_24",
    "output_error",
    "qparams",
    "rtn",
    "smoothquant_factors",
    "sparsegpt_24",
    "to_codes",
]
