"""`pagoda bench offline --lora-adapters K`: throughput of the prompts spread over K LoRA adapters
against the base model alone, in one engine, in alternating rounds (base, adapters, base, ...), so
that both see the same machine state; the median and the spread of each.

The adapters are random PEFT directories (rank `--lora-rank` on the `--lora-targets` projections)
written for the model, or the given `--lora-paths`. Both systems run in the one engine with the
engine flags given (by default compiled decode steps, which run the adapters too where pagoda's
CPU kernel runs)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapters(
    cfg: Any, count: int, rank: int, root: Path, targets: tuple[str, ...] = TARGETS
) -> list[Path]:
    """`count` random PEFT LoRA adapters on `targets` for a model of ModelArchConfig `cfg`."""
    from safetensors.torch import save_file

    from pagoda.engine.lora.peft_adapter import projection_shapes

    shapes = projection_shapes(
        cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    )
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        path = root / f"adapter-{i}"
        path.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
        (path / "adapter_config.json").write_text(json.dumps(config))
        tensors = {}
        for layer in range(cfg.num_layers):
            for module in targets:
                fan_in, fan_out = shapes[module]
                parent = "self_attn" if module in TARGETS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_"
                tensors[key + "A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
                tensors[key + "B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
        save_file(tensors, str(path / "adapter_model.safetensors"))
        paths.append(path)
    return paths


def bench_lora(args: argparse.Namespace, prompts: list[list[int]]) -> list[dict[str, Any]]:
    """Alternating rounds of the prompts on the base model in an engine without LoRA, on the base
    model in the LoRA engine, and spread over the adapters; one summary per system: output tok/s
    of each round, their median and spread."""
    import dataclasses

    from pagoda.engine.engine_args import engine_config_from_args
    from pagoda.engine.llm import LLM
    from pagoda.engine.sampling.params import SamplingParams

    config = engine_config_from_args(args)
    count = len(args.lora_paths) if args.lora_paths else args.lora_adapters
    lora = dataclasses.replace(
        config.lora,
        enable_lora=True,
        max_loras=max(config.lora.max_loras, count),
        max_cpu_loras=max(config.lora.max_cpu_loras or 0, count),
        max_lora_rank=max(config.lora.max_lora_rank, args.lora_rank),
    )
    llm = LLM(config=dataclasses.replace(config, lora=lora))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, targets = llm.engine.model.cfg, tuple(args.lora_targets)
        paths = args.lora_paths or write_random_adapters(cfg, count, args.lora_rank, Path(tmp), targets)
        loras = [llm.engine.load_lora(f"adapter-{i}", str(p)) for i, p in enumerate(paths)]
    spread = [loras[i % count] for i in range(len(prompts))]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0.0)
    llm.generate(prompts[: 2 * count], warm, use_tqdm=False, lora_request=spread[: 2 * count])
    plain = LLM(config=config)  # the base model served as it would be without --enable-lora
    plain.generate(prompts[:2], warm, use_tqdm=False)
    systems = {"base": (plain, None), "base, LoRA engine": (llm, None), f"{count} adapters": (llm, spread)}
    rates: dict[str, list[float]] = {name: [] for name in systems}
    cpu: dict[str, list[float]] = {name: [] for name in systems}  # output tokens per CPU second
    for _ in range(args.rounds):
        for name, (engine, adapters) in systems.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results = engine.generate(prompts, params, use_tqdm=False, lora_request=adapters)
            tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
            rates[name].append(tokens / (time.perf_counter() - t0))
            cpu[name].append(tokens / (time.process_time() - c0))
    return [
        {
            "system": name,
            "output_tok_s": r,
            "median": statistics.median(r),
            "spread": [min(r), max(r)],
            "output_tok_per_cpu_s": cpu[name],
        }
        for name, r in rates.items()
    ]


def print_lora(summaries: list[dict[str, Any]], as_json: bool) -> None:
    """Each system's rounds, and the adapters' throughput over the base's: the ratio of the
    medians, and the median [range] of the ratios of rounds run back to back (steadier where
    other processes share the machine), by wall time and by the process's CPU time."""
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    print(f"{'system':<18} {'median out tok/s':>17} {'range':>16}   rounds")
    for s in summaries:
        rounds = ", ".join(f"{r:.1f}" for r in s["output_tok_s"])
        lo, hi = s["spread"]
        print(f"{s['system']:<18} {s['median']:>17.1f} {f'[{lo:.1f}-{hi:.1f}]':>16}   {rounds}")
    base = summaries[0]
    for other in summaries[1:]:
        print(
            f"\n{other['system']} / base: {other['median'] / base['median']:.2f}x output throughput (medians)"
        )
        for key, what in (("output_tok_s", "wall time"), ("output_tok_per_cpu_s", "CPU time")):
            ratios = [b / a for a, b in zip(base[key], other[key], strict=True)]
            print(
                f"  per round ({what}): {statistics.median(ratios):.2f}x "
                f"[{min(ratios):.2f}-{max(ratios):.2f}]: " + ", ".join(f"{r:.2f}" for r in ratios)
            )
