"""Triton kernels for the operations that decide speed on a GPU, each beside its PyTorch
reference (pagoda/kernels/reference.py) and tested against it (tests/kernels/, under the interpreter on
CPU-only machines):

- paged_attention.py: unified varlen attention over the paged KV cache (prefill chunks and
  decodes in one launch), split-K paged decode (flash-decoding)
- kv_cache.py: the KV-cache write by slot mapping (reshape_and_cache)
- rms_norm.py, rotary.py, activation.py: RMSNorm (+ residual), RoPE (neox/gptj), SiLU-and-mul
- quant_gemm.py: weight-only int4/int8 GEMM with the dequantization in the K loop
- fused_moe.py: the experts of a mixture-of-experts layer, a grouped GEMM over rows sorted by expert
- lora.py: multi-LoRA shrink and expand as segmented GEMMs (SGMV)

Importing a kernel module imports triton; import them lazily from code that must run without it
(kernels.runtime does not).
"""
