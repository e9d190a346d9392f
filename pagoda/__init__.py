"""pagoda: an LLM inference server (paged KV cache, continuous batching, OpenAI API).

Subpackages: `engine` (token ids in, token ids out, on one machine), `kernels` (Triton kernels
beside their PyTorch references), `services` (gateway, tokenizer, scheduler, worker and their
shared parts), `load` (`pagoda bench`).
"""

__version__ = "0.1.0"
