"""`pagoda eval perplexity`: how well the served model predicts a text, exp(mean NLL per token).

The model is loaded by `pagoda.engine.LLM`, the path `pagoda serve` takes (same dtype resolution,
same quantized or oneDNN-packed linears, same attention backend), so a quantized form is measured
as it is served. Only the KV cache differs: one block, since `forward_tokens` runs each window with
a private cache of its own.

Windowing: the tokens (first `max_tokens` of the text, tokenized without special tokens) are cut
into non-overlapping windows of `window` tokens, and each window starts fresh: no BOS is put in
front and no context carries over from the window before, so position 0 of a window is never
scored and every window predicts its tokens 1..W-1 from the ones before them in that window. A
last window shorter than `window` is scored as it is (one of a single token predicts nothing and is
dropped). This is llama.cpp's `perplexity` without its half-window warm-up: numbers are comparable
between pagoda's own runs (dtype against dtype, quantized against not) at one window size, not to
figures measured with a sliding window, which are lower.

The built-in corpus is the first half of CPython's `pydoc_data.topics` (the help texts of
`help('if')` etc., English prose with code: 39 topics, 205,000 characters, about 50,000 tokens),
joined in sorted-key order, so every run on every machine with the same Python scores the same
tokens. The other half is `pagoda quantize`'s built-in calibration text: no scored token was
calibrated on (pagoda/compress/corpus.py).

Measured (demo SmolLM2-135M, built-in corpus, 4,096 tokens, window 512, 2-core AVX512-BF16 CPU):
float32 14.7045, bfloat16 14.7155, bfloat16 + int4 linears 14.8840, float32 + int8 15.3656; a
shuffle of the same tokens scores about 150x worse (3,002 against 20.5 on 256 tokens).

Importing this module does not import torch (the `pagoda` parser imports it to build `eval`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pagoda.engine.models.llama import LlamaForCausalLM

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DEFAULT_MAX_TOKENS = 4096
DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class PerplexityResult:
    """One `pagoda eval perplexity` run; `seconds` is the scoring time (model load excluded,
    reported apart as `load_seconds`)."""

    model: str
    dtype: str  # as loaded, e.g. "bfloat16"
    quantization: str  # as loaded: "none", "int8", "int4", ...
    corpus: str  # "builtin" or the --text path
    tokens: int  # predicted (scored) tokens
    windows: int
    window: int
    perplexity: float
    seconds: float
    load_seconds: float

    def line(self) -> str:
        return (
            f"{self.model} ({self.dtype}, quantization {self.quantization}): perplexity "
            f"{self.perplexity:.4f} over {self.tokens} tokens in {self.windows} windows of "
            f"{self.window} ({self.corpus}), {self.seconds:.1f}s (load {self.load_seconds:.1f}s)"
        )


def builtin_text() -> str:
    """The built-in corpus: the evaluation half of the pydoc help topics, in sorted-key order."""
    from pagoda.compress.corpus import evaluation_text

    return evaluation_text()


def read_text(path: str | None) -> str:
    """The text to score: the file at `path` (UTF-8), or the built-in corpus when None. Raises a
    one-line ValueError naming the fix for a missing, unreadable or empty file."""
    if path is None:
        return builtin_text()
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"--text {path}: no such file; pass a UTF-8 text file, or omit --text for the built-in corpus"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"--text {path}: cannot be read as UTF-8 text ({exc}); pass a UTF-8 text file"
        ) from exc
    if not text.strip():
        raise ValueError(f"--text {path} is empty; pass a file with text to score")
    return text


def check_window(window: int, max_tokens: int | None = None) -> None:
    """Raise a ValueError naming the fix when the window or token budget cannot score a token."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 (a window predicts its tokens 1..W-1), got {window}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (one token predicts nothing), got {max_tokens}")


def split_windows(n: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of each non-overlapping window over n tokens that predicts at least one token:
    full windows, then the remainder if it holds two tokens or more."""
    check_window(window)
    return [(s, min(s + window, n)) for s in range(0, n, window) if min(s + window, n) - s >= 2]


def _served_model(model_or_llm: Any) -> LlamaForCausalLM:
    """The model inside an `LLM`, an `EngineCore`, or the model itself."""
    engine = getattr(model_or_llm, "engine", model_or_llm)  # LLM -> EngineCore
    model = getattr(engine, "model", engine)  # EngineCore -> model
    if not hasattr(model, "compute_logits"):
        raise TypeError(f"expected an LLM, an EngineCore or a model, got {type(model_or_llm).__name__}")
    return model  # type: ignore[no-any-return]


def window_nlls(model: LlamaForCausalLM, ids: torch.Tensor) -> list[float]:
    """-log p(ids[i+1] | ids[..i]) for i in 0..len-2 of one window run fresh: the log_softmax in
    float32 of the logits at every position but the last, gathered at the next token."""
    import torch

    from pagoda.engine.runner.forward import forward_tokens

    hidden = forward_tokens(model, ids)  # [n, hidden]
    with torch.no_grad():  # every row, as the server computes them; the last predicts past the window
        logits = model.compute_logits(hidden)[:-1]  # [n-1, vocab] float32
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = ids[1:].to(logp.device)[:, None]  # [n-1, 1]
    return [-v for v in logp.gather(1, target).squeeze(1).double().tolist()]


def perplexity(model_or_llm: Any, token_ids: Sequence[int] | torch.Tensor, window: int) -> tuple[float, int]:
    """(exp(mean NLL), tokens scored) of `token_ids` cut into fresh windows of `window` tokens
    (see the module docstring). `model_or_llm`: an `LLM`, an `EngineCore` or its model. The NLLs
    are summed with math.fsum (exactly rounded, so independent of order)."""
    import torch

    model = _served_model(model_or_llm)
    ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    nlls: list[float] = []
    for start, end in split_windows(int(ids.numel()), window):
        nlls.extend(window_nlls(model, ids[start:end]))
    if not nlls:
        raise ValueError(f"{ids.numel()} tokens score nothing; give a text of at least 2 tokens")
    return math.exp(math.fsum(nlls) / len(nlls)), len(nlls)


def evaluate(
    model: str = "",
    *,
    text: str | None = None,
    dtype: str = "auto",
    quantization: str = "auto",
    device: str = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
) -> PerplexityResult:
    """Load `model` as `pagoda serve --model` would and score the first `max_tokens` tokens of the
    file `text` (None: the built-in corpus)."""
    check_window(window, max_tokens)
    corpus = read_text(text)  # before the model loads: a bad path fails in milliseconds
    from pagoda.engine import LLM

    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=quantization, device=device, num_blocks=1, enforce_eager=True)
    load_seconds = time.perf_counter() - t0
    engine = llm.engine
    if window > engine.max_model_len:
        raise ValueError(
            f"--window {window} exceeds the model's context length {engine.max_model_len}; lower --window"
        )
    ids = llm.tokenizer.encode(corpus, add_special_tokens=False)[:max_tokens]
    t0 = time.perf_counter()
    ppl, scored = perplexity(engine.model, ids, window)
    return PerplexityResult(
        model=engine.model_name,
        dtype=str(engine.dtype).removeprefix("torch."),
        quantization=engine.quantization,
        corpus=text if text is not None else "builtin",
        tokens=scored,
        windows=len(split_windows(len(ids), window)),
        window=window,
        perplexity=ppl,
        seconds=time.perf_counter() - t0,
        load_seconds=load_seconds,
    )


def add_eval_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pagoda eval perplexity ...` under the `pagoda` command's subparsers `sub`."""
    ev = sub.add_parser("eval", help="measure the served model's quality (perplexity)")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = esub.add_parser(
        "perplexity",
        help="exp(mean NLL) of a text in fresh non-overlapping windows, the model loaded as served",
    )
    p.add_argument(
        "model",
        nargs="?",
        default="",
        metavar="MODEL",
        help="GGUF file, HF directory or Hub id, as `pagoda serve --model` (default: the demo model)",
    )
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="UTF-8 text to score (default: the first half of pydoc's topics)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument(
        "--quantization", default="auto", help="as `pagoda serve --quantization` (auto, none, int8, int4)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="score the text's first N tokens"
    )
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window (each starts fresh)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")


def run_eval(args: argparse.Namespace) -> int:
    """Run the `pagoda eval` subcommand `args` names; print its result."""
    assert args.eval_command == "perplexity", args.eval_command
    result = evaluate(
        args.model,
        text=args.text,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        max_tokens=args.max_tokens,
        window=args.window,
    )
    print(json.dumps(asdict(result)) if args.json else result.line())
    return 0
