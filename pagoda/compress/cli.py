"""`pagoda quantize MODEL --scheme S [--method M] ... --output DIR`: the parser (torch-free, its
defaults read from QuantizeOptions) and the command, which imports torch when it runs."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pagoda.compress.options import ALL_METHODS, METHODS_BY_SCHEME, OBSERVERS, QuantizeOptions
from pagoda.engine import field_default


def _default(name: str) -> Any:
    return field_default(QuantizeOptions, name)


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    pairs = "; ".join(f"{s}: {', '.join(m)}" for s, m in METHODS_BY_SCHEME.items())
    p: argparse.ArgumentParser = sub.add_parser(
        "quantize",
        help="quantize a model into a compressed-tensors Hugging Face directory",
        description="Quantize (or 2:4-prune) a model's linears and write a Hugging Face directory in "
        f"the compressed-tensors format. Methods by scheme, default first: {pairs}.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default="",
        help="a Hugging Face directory, a Hub id or a GGUF file (default: the demo)",
    )
    p.add_argument("--scheme", required=True, help=f"one of {', '.join(METHODS_BY_SCHEME)}")
    p.add_argument("--method", default=None, help=f"one of {', '.join(ALL_METHODS)} (default: the scheme's)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="inputs per scale for W4A16/W4A16_ASYM/W8A16 (default: 128 for W4A16 and W4A16_ASYM, "
        "per channel for W8A16)",
    )
    p.add_argument(
        "--calibration",
        default=_default("calibration"),
        help="a text file, or 'builtin' (half of CPython's pydoc topics, the half `pagoda eval perplexity` "
        "does not score: English, offline)",
    )
    p.add_argument("--num-samples", type=int, default=_default("num_samples"), help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=_default("seq_len"), help="tokens per calibration sequence")
    p.add_argument(
        "--observer",
        default=_default("observer"),
        choices=OBSERVERS,
        help="how scales are chosen: each group's own range (minmax), or the range shrunk by up to 20%% "
        "that quantizes the group with the least squared error (mse); default: mse for gptq and "
        "smoothquant (whose weights GPTQ quantizes), minmax otherwise",
    )
    p.add_argument(
        "--actorder",
        action=argparse.BooleanOptionalAction,
        default=_default("actorder"),
        help="GPTQ: quantize inputs in decreasing activation (Hessian diagonal) order, groups unchanged "
        "(default: on)",
    )
    p.add_argument(
        "--dampening-frac",
        type=float,
        default=_default("dampening_frac"),
        help="GPTQ, SparseGPT: damping added to the Hessian's diagonal, as a fraction of its mean",
    )
    p.add_argument("--output", required=True, help="the directory to write (new or empty)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_quantize(args: argparse.Namespace) -> int:
    from pagoda.compress.writer import quantize_to_dir

    if not args.model:
        from pagoda.engine.loader import demo_model_path

        args.model = demo_model_path()
    options = QuantizeOptions(
        model=args.model,
        scheme=args.scheme,
        output=args.output,
        method=args.method,
        group_size=args.group_size,
        calibration=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        observer=args.observer,
        actorder=args.actorder,
        dampening_frac=args.dampening_frac,
    )
    t0 = time.perf_counter()
    result, written = quantize_to_dir(options, progress=not args.no_progress)
    scheme = result.scheme
    group = f"group {scheme.group_size}" if scheme.group_size else "per channel"
    what = "2:4 pruned" if scheme.sparse_24 else f"{scheme.name} ({group})"
    count = len(result.linears) or sum(1 for n in result.tensors if n.endswith("_proj.weight"))
    print(
        f"wrote {options.output}: {what} by {result.method}, format {written.format}, {count} linears, "
        f"{written.bytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s"
    )
    return 0
