"""HF transformers as a peer, in-process: the same prompts through its continuous-batching
`generate_batch` and its static batched `generate`, timed for output tokens/s.

Used by `pagoda bench offline --peer hf` (static `generate`) and `pagoda bench serve --peer hf`
(both). The model is the demo GGUF (or --peer-model) loaded through transformers' GGUF support;
EOS is off (pagoda runs with ignore_eos), sampling is greedy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagoda.load.datasets import BenchTurn

HF_FIX = "pip install transformers"


@dataclass(frozen=True)
class HfRun:
    system: str  # hf-generate_batch | hf-generate
    requests: int
    prompt_tokens: int
    output_tokens: int  # the tokens each request asked for, not the padding a static batch runs on
    seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def pagoda_dtype(serve_args: Sequence[str] = ()) -> str:
    """The dtype pagoda serves in with these `pagoda serve` arguments on this machine, as the
    engine picks it (`engine_dtype`: bfloat16 where the CPU has native bf16, else float32; float32
    under CPU int8)."""
    from pagoda.engine.config import engine_dtype
    from pagoda.engine.engine_args import engine_config_from_args
    from pagoda.services.cli.parser import build_parser

    config = engine_config_from_args(build_parser().parse_args(["serve", *serve_args]))
    return str(engine_dtype(config.dtype, config.quantization, config.resolved_device())).removeprefix(
        "torch."
    )


def pagoda_threads(serve_args: Sequence[str] = ()) -> int:
    """The intra-op threads pagoda steps with under these `pagoda serve` arguments on this machine:
    their --threads, else what its auto picks here (torch's count capped by the usable CPUs). The
    peers get as many (issue 17: the same thread count)."""
    from pagoda.engine.core.cpu_threads import engine_threads
    from pagoda.services.cli.parser import build_parser

    return engine_threads(build_parser().parse_args(["serve", *serve_args]).threads).threads


def load_hf_model(gguf_path: str, dtype: str = "float32", threads: int = 0) -> Any:
    """The GGUF's model as a transformers model (weights dequantized to `dtype`); with `threads`,
    this process's torch steps it with that many intra-op threads (pagoda's count)."""
    if threads and threads != torch.get_num_threads():  # set_num_threads also resets MKL's dynamic mode
        torch.set_num_threads(threads)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError(f"--peer hf needs transformers: {HF_FIX}") from exc
    if not gguf_path.endswith(".gguf"):
        raise ValueError(f"--peer hf is wired for GGUF models; {gguf_path!r} is not a .gguf file")
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=getattr(torch, dtype)
    ).eval()


def _pad_id(model: Any) -> int:
    return int(model.config.pad_token_id) if model.config.pad_token_id is not None else 0


def generate_static(model: Any, batch: Sequence[Sequence[int]], new_tokens: int) -> int:
    """Left-padded batched greedy `generate` of exactly `new_tokens` per prompt; returns the tokens
    generated (batch x new_tokens)."""
    pad = _pad_id(model)
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return int(out.shape[0] * (out.shape[1] - width))


def run_static(model: Any, prompts: list[list[int]], output_lens: list[int], batch_size: int) -> HfRun:
    """Static batches of `batch_size` in order; each batch runs to its longest output."""
    generate_static(model, prompts[:2], 2)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        generate_static(model, prompts[i : i + batch_size], max(output_lens[i : i + batch_size]))
    seconds = time.perf_counter() - t0
    return HfRun("hf-generate", len(prompts), sum(map(len, prompts)), sum(output_lens), seconds)


def run_continuous(
    model: Any, prompts: list[list[int]], output_lens: list[int], max_batch: int, max_batch_tokens: int = 512
) -> HfRun:
    """`generate_batch` (transformers' paged continuous batching) over all prompts at once, at most
    `max_batch` running together; the paged cache is sized to the workload, not to free memory."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    new = max(output_lens)
    page = 16
    per_request = -(-(max(map(len, prompts)) + new) // page)
    cb = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=per_request * min(max_batch, len(prompts)) + 8,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_batch,
    )
    gen = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=_pad_id(model)
    )

    def run(batch: list[list[int]], cfg: GenerationConfig) -> dict[str, Any]:
        return dict(model.generate_batch(inputs=batch, generation_config=cfg, continuous_batching_config=cb,
                                         progress_bar=False, warmup=False))  # fmt: skip

    warm = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=_pad_id(model))
    run(prompts[:2], warm)
    t0 = time.perf_counter()
    results = run(prompts, gen)
    seconds = time.perf_counter() - t0
    got = [len(r.generated_tokens) for r in results.values()]
    if len(got) != len(prompts) or any(r.error for r in results.values()):
        errors = [str(r.error) for r in results.values() if r.error]
        raise RuntimeError(f"generate_batch finished {len(got)} of {len(prompts)} requests: {errors[:1]}")
    # results come in input order; max_new_tokens is one value per call: tokens past a request's
    # own output length are not counted
    useful = sum(min(n, want) for n, want in zip(got, output_lens, strict=True))
    return HfRun("hf-generate_batch", len(prompts), sum(map(len, prompts)), useful, seconds)


def run_hf_peer(
    model: Any,
    prompts: list[list[int]],
    output_lens: list[int],
    concurrency: int,
    max_batch_tokens: int = 512,
) -> list[HfRun]:
    """Both HF modes on the same prompts; `concurrency` caps the continuous batch and sizes the
    static batches."""
    assert len(prompts) == len(output_lens) and prompts, (len(prompts), len(output_lens))
    return [
        run_continuous(model, prompts, output_lens, concurrency, max_batch_tokens),
        run_static(model, prompts, output_lens, concurrency),
    ]


def turn_ids(tokenizer: Any, turn: BenchTurn, endpoint: str) -> list[int]:
    """The token ids a server gets for this turn: the chat template for chat, the text as is for
    completions (pagoda's tokenizer; the HF model shares the GGUF's vocabulary)."""
    if endpoint == "chat":
        text = tokenizer.apply_chat_template(list(turn.messages))
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(turn.prompt()))


def hf_comparison(
    pagoda_tok_s: float, runs: list[HfRun], dtypes: tuple[str, str]
) -> dict[str, dict[str, float | None]]:
    """Pure: {system (with its dtype): {"output_tok_s", "seconds", "output_tokens", "ratio"}} with
    ratio = pagoda's output tok/s / that system's; `dtypes` = (pagoda's, HF's)."""
    table: dict[str, dict[str, float | None]] = {
        f"pagoda (server, {dtypes[0]})": {
            "output_tok_s": pagoda_tok_s,
            "seconds": None,
            "output_tokens": None,
            "ratio": 1.0,
        }
    }
    for r in runs:
        ratio = pagoda_tok_s / r.output_tok_s if r.output_tok_s else None
        table[f"{r.system} ({dtypes[1]})"] = {
            "output_tok_s": r.output_tok_s,
            "seconds": r.seconds,
            "output_tokens": float(r.output_tokens),
            "ratio": ratio,
        }
    return table


def format_hf_comparison(table: dict[str, dict[str, float | None]]) -> str:
    width = 64
    lines = [" pagoda vs HF transformers (same prompts) ".center(width, "=")]
    lines.append(f"{'system':<34}{'out tok/s':>10}{'seconds':>10}{'pagoda / it':>12}")
    for name, row in table.items():
        secs, ratio = row["seconds"], row["ratio"]
        lines.append(
            f"{name:<34}{row['output_tok_s'] or 0.0:>10.2f}{'-' if secs is None else f'{secs:.2f}':>10}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>12}"
        )
    lines.append("HF runs in-process (no HTTP); multi-turn turns run as independent prompts")
    lines.append("=" * width)
    return "\n".join(lines)
