"""End-to-end decode throughput of a random-weight Llama-3-8B-shaped model (`pagoda bench kernels
--e2e`): the whole engine (scheduler, runner, kernels, CUDA graphs, sampler) at a fixed batch,
timing only decode-only steps. On the CPU a 2-layer toy of the same shape family stands in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from pagoda.engine.models.arch_config import ModelArchConfig

LLAMA3_8B = ModelArchConfig(
    architecture="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    eos_token_ids=(128001,),
)
TOY = ModelArchConfig(
    architecture="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    eos_token_ids=(1,),
)


class RandomCheckpoint:
    """A checkpoint of N(0, 0.02) weights made on `device`, one tensor at a time, HF-named."""

    quantization: str | None = None  # dense
    pooler: None = None  # a generative model

    def __init__(self, arch: ModelArchConfig, device: torch.device) -> None:
        self.name = f"random-llama-{arch.num_layers}x{arch.hidden_size}"
        self.arch = arch
        self.tokenizer: Any = None  # the engine reads eos ids from arch
        self.device = device

    def _shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        a = self.arch
        h, q, kv = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        yield "model.embed_tokens.weight", (a.vocab_size, h)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            yield from (
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (a.intermediate_size, h)),
                (p + "mlp.up_proj.weight", (a.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, a.intermediate_size)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            )
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (a.vocab_size, h)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        g = torch.Generator(device=self.device).manual_seed(0)
        for name, shape in self._shapes():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, device=self.device)
            else:
                yield name, torch.randn(shape, device=self.device, generator=g) * 0.02


def decode_throughput(
    device: torch.device,
    batch: int,
    prompt_len: int,
    output_len: int,
    backend: str,
    enforce_eager: bool,
    quantization: str = "none",
) -> tuple[str, float, int]:
    """(model name, decode tokens/s over decode-only steps, decode steps timed)."""
    from pagoda.engine.config import BatcherConfig, CacheConfig, EngineConfig
    from pagoda.engine.core.engine_core import EngineCore
    from pagoda.engine.sampling.params import SamplingParams

    arch = LLAMA3_8B if device.type == "cuda" else TOY
    ckpt = RandomCheckpoint(arch, device)
    config = EngineConfig(
        device=device.type,
        attention_backend=backend,
        enforce_eager=enforce_eager,
        quantization=quantization,
        max_model_len=prompt_len + output_len + 16,
        cache=CacheConfig(
            enable_prefix_caching=False, kv_cache_memory=None if device.type == "cuda" else 1 << 26
        ),
        batcher=BatcherConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, prompt_len)),
    )
    core = EngineCore(config, checkpoint=ckpt)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        prompt = torch.randint(2, arch.vocab_size, (prompt_len,), generator=g).tolist()
        core.add_request(f"r{i}", prompt, params)
    tokens, seconds, steps = 0, 0.0, 0
    while core.has_unfinished():
        t0 = time.perf_counter()
        outs = core.step()  # returns sampled token ids: the step has finished on the device
        dt = time.perf_counter() - t0
        stats = core.last_stats
        if stats.num_scheduled_tokens == len(outs) == batch:  # a full decode-only step
            tokens, seconds, steps = tokens + len(outs), seconds + dt, steps + 1
    return ckpt.name, tokens / max(seconds, 1e-9), steps
