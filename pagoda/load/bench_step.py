"""Decode-step cost of the demo model (`pagoda bench step`): ms per decode-only step and aten
calls per step, at a fixed batch, with the time split by the engine function that issued each op.

Runs the whole engine step (scheduler, runner, model, sampler), after prefill and a few warm-up
steps. Aten calls are counted from the torch profiler (top-level calls: ops not nested in another
aten op, and all calls including nested ones); the split by part uses the profiler's Python stacks.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.core.engine_core import EngineCore

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# engine function (qualified name, prefix match) -> part of the step
_PARTS = (
    ("layers.py", "RMSNorm", "norm"),
    ("layers.py", "RotaryEmbedding", "rope"),
    ("layers.py", "_rotate_half", "rope"),
    ("layers.py", "GatedMLP", "mlp (gate_up, silu*mul, down)"),
    ("llama.py", "Attention.forward", "attention module (qkv, o_proj, split/views)"),
    ("llama.py", "DecoderLayer", "decoder layer (residual bookkeeping)"),
    ("llama.py", "LlamaForCausalLM.compute_logits", "LM head"),
    ("llama.py", "LlamaForCausalLM", "model (embed, final norm)"),
    ("attention.py", "", "attention backend (KV write, gather, mask, SDPA)"),
    ("quantization.py", "", "linears (quantized)"),
    ("vnni.py", "VnniLinear._", "linears (quantized)"),
    ("vnni.py", "VnniLinear.forward", "linears (quantized)"),
    ("w8a8.py", "", "linears (quantized)"),
    ("quantization/linear.py", "", "linears (quantized)"),
    ("onednn_linear.py", "", "linears (oneDNN-packed)"),
    ("sampling_metadata.py", "", "sampler metadata"),
    ("sampler.py", "", "sampler"),
    ("model_runner.py", "", "runner bookkeeping"),
    ("compiled_decode.py", "", "compiled forward"),
)
# the namespaces of the ops counted (custom ops and oneDNN's linear are not under aten::)
_OPS = ("aten::", "mkldnn::", "quantized::", "pagoda::", "pagoda_cpu::")
_FRAME = re.compile(r"^(.*\.py)\((\d+)\): (\S+)$")


@functools.cache
def _qualnames(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a source file."""
    out: list[tuple[int, int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if isinstance(child, ast.FunctionDef):
                    out.append((child.lineno, child.end_lineno or child.lineno, name))
                walk(child, name + ".")

    try:
        with open(path) as f:
            walk(ast.parse(f.read()), "")
    except OSError:
        pass
    return out


def _part(event: Any) -> str:
    """The step part an op belongs to: from the innermost engine function above it."""
    p = event.cpu_parent
    while p is not None:
        m = _FRAME.match(p.name)
        if m and ("engine/" in m[1] or "engine\\" in m[1]):
            line = int(m[2])
            path = m[1] if os.path.isabs(m[1]) else os.path.join(_ROOT, m[1][m[1].index("engine") :])
            funcs = [q for a, b, q in _qualnames(path) if a <= line <= b]
            qual = max(funcs, key=len) if funcs else m[3]
            for file, prefix, name in _PARTS:
                if path.endswith(file) and qual.startswith(prefix):
                    return name
            return f"other engine ({qual})"
        p = p.cpu_parent
    return "other"


def _clocks(core: Any) -> dict[str, Any]:
    """Rank 0's collective clocks by the name the report gives them: its engine's tensor or
    pipeline ranks' ("collective") and, with data-parallel engines, theirs at the MoE layers
    ("collective" without tensor parallelism, "data_parallel_collective" beside it)."""
    clocks = {}
    if core.parallel is not None:
        clocks["collective"] = core.parallel.tp.clock
    if core.config.parallel.data_parallel_size > 1:
        clocks["data_parallel_collective" if clocks else "collective"] = core.clock
    return clocks


def run_step_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the model (the demo by default), starts `args.batch` random prompts, times
    `args.steps` decode steps and profiles `args.profile_steps` more; prints and returns the
    figures, with the bytes the loaded weights hold."""
    from pagoda.engine.core.engine_core import EngineCore
    from pagoda.engine.quantization.memory import weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = _engine_config(args)
    if config.parallel.data_parallel_size > 1:  # the engines stepped together (data_parallel.py)
        from pagoda.engine.distributed.data_parallel import DataParallelEngines

        core = cast(EngineCore, DataParallelEngines(config))
    else:
        core = EngineCore(config)
    load_s = time.perf_counter() - t0
    warm_s = _start_decoding(core, args)
    clocks = _clocks(core)
    before = {name: (c.seconds, c.calls) for name, c in clocks.items()}
    times, cpu = _time_steps(core, args.steps)
    result = {
        "dtype": str(core.dtype),
        "quantization": core.quantization,
        "threads": torch.get_num_threads(),
        "tensor_parallel_size": core.config.parallel.tensor_parallel_size,
        "pipeline_parallel_size": core.config.parallel.pipeline_parallel_size,
        "data_parallel_size": core.config.parallel.data_parallel_size,
        "expert_parallel": core.config.parallel.enable_expert_parallel,
        "batch": args.batch,
        "sequences_per_step": _per_step(core, args),  # a pipeline's steps: micro-batches of the batch
        "weights_mib": round(weight_bytes(core.model) / 2**20, 1),
        "load_s": round(load_s, 2),
        "prefill_and_warmup_s": round(warm_s, 2),
        "step_ms_p50": round(statistics.median(times) * 1e3, 2),
        "step_ms_mean": round(statistics.fmean(times) * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "cpu_ms_per_step_p50": round(statistics.median(cpu) * 1e3, 2),
    }
    for name, c in clocks.items():  # rank 0's time in them (waits for the others included)
        result[f"{name}_ms_per_step"] = round((c.seconds - before[name][0]) / args.steps * 1e3, 2)
        result[f"{name}s_per_step"] = (c.calls - before[name][1]) / args.steps
    result.update(_profiled_ops(core, args.profile_steps))
    core.close()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return result


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    from pagoda.engine.config import CacheConfig, EngineConfig, ParallelConfig

    tp = getattr(args, "tensor_parallel_size", 1)
    pp = getattr(args, "pipeline_parallel_size", 1)
    dp, ep = getattr(args, "data_parallel_size", 1), getattr(args, "enable_expert_parallel", False)
    return EngineConfig(
        parallel=ParallelConfig(
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            data_parallel_size=dp,
            enable_expert_parallel=ep,
        ),
        model=getattr(args, "model", ""),
        dtype=args.dtype,
        quantization=args.quantization,
        cache=CacheConfig(enable_prefix_caching=False, kv_cache_memory=1 << 28),
        # as pagoda serve runs once its graphs are ready: compiled where they run (auto: an
        # in-process engine loads or compiles them before its first step)
        compile="auto" if args.compile == "on" and tp == dp == pp == 1 else "off",
        # the model's own limit may not fit the KV budget (float32 under int8)
        max_model_len=args.input_len + args.steps + args.profile_steps + 64,
    )


def _start_decoding(core: EngineCore, args: argparse.Namespace) -> float:
    """Adds the batch's random prompts and steps through their prefill and a few decodes; seconds."""
    from pagoda.engine.sampling.params import SamplingParams

    total = args.steps + args.profile_steps + 8
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        prompt = torch.randint(10, 40000, (args.input_len,), generator=g).tolist()
        core.add_request(f"s{i}", prompt, params)
    t0 = time.perf_counter()
    while core.last_stats.num_scheduled_tokens != _per_step(core, args):  # prefill, then the first decode
        core.step()
    for _ in range(3):
        core.step()
    return time.perf_counter() - t0


def _per_step(core: EngineCore, args: argparse.Namespace) -> int:
    """Sequences a decode step holds: the batch, or its share in a pipeline's micro-batches."""
    return -(-args.batch // core.config.parallel.pipeline_parallel_size)


def _time_steps(core: EngineCore, steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of `steps` steps."""
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        core.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def _profiled_ops(core: EngineCore, n: int) -> dict[str, Any]:
    """`n` steps under the torch profiler: ops per step, and where their time goes, by engine
    part (the innermost engine function above each top-level op) and by op; nothing for n = 0."""
    from torch.profiler import ProfilerActivity, profile

    if n <= 0:
        return {}

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(n):
            core.step()
    events = [e for e in prof.events() if e.name.startswith(_OPS)]
    top = [e for e in events if not _has_op_parent(e)]
    by_part: Counter[str] = Counter()
    ops_by_part: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    op_time: Counter[str] = Counter()
    for e in top:
        part = _part(e)
        by_part[part] += e.cpu_time_total
        ops_by_part[part] += 1
        ops[e.name] += 1
        op_time[e.name] += e.cpu_time_total
    return {
        "ops_top_level_per_step": len(top) / n,
        "ops_all_per_step": len(events) / n,
        "profiled_ms_per_step_by_part": {k: round(v / n / 1e3, 2) for k, v in by_part.most_common()},
        "top_level_ops_per_step_by_part": {k: v / n for k, v in ops_by_part.most_common()},
        "top_ops_per_step": {k: v / n for k, v in ops.most_common(15)},
        "profiled_ms_per_step_by_op": {k: round(v / n / 1e3, 2) for k, v in op_time.most_common(8)},
    }


def _has_op_parent(e: Any) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(_OPS):
            return True
        p = p.cpu_parent
    return False


if __name__ == "__main__":
    from pagoda.load.cli import add_step_args

    ap = argparse.ArgumentParser(description=__doc__)
    add_step_args(ap)
    run_step_bench(ap.parse_args())
