"""`pagoda quantize`'s own compression algorithms (RTN, FP8, GPTQ, SparseGPT, AWQ, SmoothQuant): all
on float32 [out, in] weights, all producing the format-free QuantizedWeight
(pagoda/engine/quantization/weights.py). Nothing here imports beyond torch and pagoda.engine."""
