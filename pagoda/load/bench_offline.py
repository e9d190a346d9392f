"""`pagoda bench offline`: offline generation throughput of pagoda's engine, and of HF
transformers' batched `generate` on the same prompts in the same run (`--peer hf`)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pagoda.load.prompts import chat_prompts


@dataclass
class OfflineResult:
    system: str
    num_prompts: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    dtype: str  # float32 | bfloat16 | float16

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def bench_pagoda(args: argparse.Namespace, prompts: list[list[int]]) -> OfflineResult:
    from pagoda.engine.engine_args import engine_config_from_args
    from pagoda.engine.llm import LLM
    from pagoda.engine.sampling.params import SamplingParams

    llm = LLM(config=engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=not args.json)
    seconds = time.perf_counter() - t0
    out_tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
    if args.profile:
        profile_decode(llm, prompts)
    core = llm.engine
    dtype = str(core.dtype).removeprefix("torch.")
    label = f"pagoda-{dtype}" + (f"-{core.quantization}" if core.quantization != "none" else "")
    return OfflineResult(label, len(prompts), sum(map(len, prompts)), out_tokens, seconds, dtype)


def profile_decode(llm: Any, prompts: list[list[int]], steps: int = 5) -> None:
    """Where a decode step's time goes: all prompts prefilled, a few warm-up steps, then
    `steps` profiled steps of pure decode."""
    from torch.profiler import ProfilerActivity, profile

    from pagoda.engine.sampling.params import SamplingParams

    core = llm.engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"profile-{i}", p, params)
    for _ in range(4):  # prefill (maybe in chunks) and warm-up decodes
        core.step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            core.step()
    per_step = (time.perf_counter() - t0) / steps
    while core.has_unfinished():
        core.step()
    print(f"\ndecode step with {len(prompts)} sequences: {per_step * 1e3:.1f} ms (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def bench_hf(args: argparse.Namespace, prompts: list[list[int]], gguf_path: str, ours: str) -> OfflineResult:
    """HF's static `generate` in --hf-dtype (auto: `ours`, the dtype pagoda ran in)."""
    from pagoda.load.hf_peer import load_hf_model, run_static

    dtype = ours if args.hf_dtype == "auto" else args.hf_dtype
    model = load_hf_model(gguf_path, dtype)
    run = run_static(model, prompts, [args.output_len] * len(prompts), args.hf_batch_size or len(prompts))
    return OfflineResult(
        f"hf-generate-{dtype}", len(prompts), run.prompt_tokens, run.output_tokens, run.seconds, dtype
    )


def run_offline(args: argparse.Namespace) -> int:
    from pagoda.engine.loader.model_info import read_model_info

    info = read_model_info(args.model)
    tok = info.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
        for m in chat_prompts(args.num_prompts)
    ]
    if args.lora_adapters or args.lora_paths:
        from pagoda.load.bench_lora import bench_lora, print_lora

        print_lora(bench_lora(args, prompts), args.json)
        return 0
    results = [bench_pagoda(args, prompts)]
    if args.peer == "hf":
        results.append(bench_hf(args, prompts, info.path, results[0].dtype))
    system = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if args.json:
        print(json.dumps([asdict(r) | {"output_tok_s": r.output_tok_s} for r in results], indent=2))
        return 0
    print(f"\nmachine: {system}")
    print(
        f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, "
        f"{args.output_len} output tokens each\n"
    )
    print(f"{'system':<22} {'seconds':>8} {'out tok/s':>10} {'total tok/s':>12}")
    for r in results:
        print(f"{r.system:<22} {r.seconds:>8.2f} {r.output_tok_s:>10.1f} {r.total_tok_s:>12.1f}")
    if len(results) > 1:
        print(
            f"\npagoda / {results[1].system}: "
            f"{results[0].output_tok_s / results[1].output_tok_s:.2f}x output throughput"
        )
    return 0
