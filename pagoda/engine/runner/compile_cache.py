"""Where the compiled decode graphs live, and when they are compiled.

`--compile` takes three modes:
- `auto` (what `pagoda serve` and `pagoda worker` do on a CPU): graphs saved by an earlier start
  are loaded (~2-3 s); otherwise a server starts serving eagerly at once while a background
  process (niced) compiles the graphs and saves them, and decode steps switch to them when they
  are ready. No request waits for a compile, and the next start loads them. In-process engines
  (`LLM`, the benches) compile before their first step instead.
- `on`: load, or compile before the first step (minutes on 2 cores) and save.
- `off`: eager steps.

The files sit under `$PAGODA_COMPILE_CACHE` (default `~/.cache/pagoda/compiled`), one directory
per key: torch and Python, this CPU's flags, pagoda's engine sources, the model's structure
(module types, their settings, every tensor's shape and dtype; not the weights, which the graphs
take as inputs), the KV block size, the intra-op thread count (inductor writes it into its C++:
`#pragma omp parallel num_threads(N)`; the background compile runs with the server's) and the
`PAGODA_*` settings. Inductor's own caches go beside
them (`inductor/`, unless TORCHINDUCTOR_CACHE_DIR is set): without them a load rebuilds the C++
(~15 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagoda.engine.config import cpu_flags
from pagoda.engine.runner.compile_log import COMPILED_NOW, EAGER_UNTIL_COMPILED, STAYS_EAGER
from pagoda.engine.runner.compiled_decode import CompiledDecode
from pagoda.engine.runner.onednn_linear import OneDnnLinear, start_handles_at

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig

logger = logging.getLogger(__name__)

_ENGINE = Path(__file__).resolve().parents[1]  # pagoda/engine


def cache_root() -> Path:
    return Path(os.environ.get("PAGODA_COMPILE_CACHE", Path.home() / ".cache" / "pagoda" / "compiled"))


def use_inductor_cache() -> str:
    """Points inductor's caches beside the graphs (unless set already); returns the directory."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*_ENGINE.rglob("*.py"), *_ENGINE.rglob("csrc/*")]):
        h.update(str(path.relative_to(_ENGINE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _model_signature(model: nn.Module) -> list[object]:
    """What the traced graph depends on: each module's type and plain settings, and the shape and
    dtype of every tensor it holds."""
    plain = (int, float, bool, str, type(None), torch.dtype, tuple)
    parts: list[object] = []
    for name, module in model.named_modules():
        attrs: list[object] = []
        for k, v in sorted(vars(module).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):
                attrs.append((k, tuple(v.shape), str(v.dtype)))
            elif isinstance(v, plain):
                attrs.append((k, repr(v)))
        parts.append((name, type(module).__qualname__, attrs))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return parts


def decode_compile_mode(
    requested: str,
    device: torch.device,
    backend: str,
    quantization: str | None,
    *,
    pooled: bool,
    lora: bool | None,  # None: no adapters; else whether pagoda's CPU LoRA kernel runs
    moe: bool,
) -> str:
    """The `--compile` mode an engine runs: auto compiles where the graphs run (CPU, torch
    attention, traceable linears, decode steps to compile, adapters through pagoda's kernel, no
    experts); on where they cannot run with adapters or experts is the caller's error."""
    if moe and requested == "on":
        raise ValueError(
            "--compile cannot trace a mixture-of-experts model (its experts' dispatch has "
            "data-dependent shapes; docs/moe.md): drop --compile"
        )
    if lora is False and requested == "on":
        raise ValueError(
            "--compile with --enable-lora runs the adapters through pagoda's CPU kernel, which does "
            "not run here (it needs AVX512-VNNI and float32 or bfloat16): drop --compile"
        )
    runs = device.type == "cpu" and backend == "torch" and quantization != "int8" and not (pooled or moe)
    if requested == "auto" and not (runs and lora is not False):
        return "off"
    return requested


def graph_key(model: nn.Module, block_size: int) -> str:
    settings = sorted(
        (k, v)
        for k, v in os.environ.items()
        if k.startswith("PAGODA_") and not k.startswith("PAGODA_COMPILE")
    )
    h = hashlib.sha256()
    threads = torch.get_num_threads()
    for part in (
        torch.__version__,
        sys.version,
        sorted(cpu_flags()),
        _source_digest(),
        block_size,
        threads,
        settings,
    ):
        h.update(repr(part).encode())
    h.update(repr(_model_signature(model)).encode())
    return h.hexdigest()[:20]


class _Background:
    """`python -m pagoda.engine.runner.compile_cache`: compiles and saves the graphs for `config`
    into `directory`, niced, logging to `directory`.log; it exits when this process does."""

    def __init__(self, config: EngineConfig, directory: Path, key: str, first_handle: int) -> None:
        self.log = directory.with_suffix(".log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # the server's thread count (--threads), which the graphs are generated for and keyed by
        threads = str(torch.get_num_threads())
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=use_inductor_cache(), OMP_NUM_THREADS=threads)
        cmd = [sys.executable, "-m", __name__, str(directory), key, str(os.getpid()), str(first_handle)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps(config))
        self.proc.stdin.close()
        self.started = time.monotonic()

    def finished(self) -> int | None:
        return self.proc.poll()


class DecodeCompiler:
    """Brings a runner's CompiledDecode to the ready state as `mode` says (see the module text);
    `poll()` (each step) adopts graphs a background compile has saved. Saved graphs that do not
    load are deleted and compiled again; a cache that cannot be written leaves a server eager
    (with a warning), never unable to start."""

    def __init__(self, compiled: CompiledDecode, mode: str, config: EngineConfig | None) -> None:
        assert mode in ("auto", "on"), mode
        self.compiled = compiled
        self._job: _Background | None = None
        use_inductor_cache()
        key = graph_key(compiled.model, compiled.block_size)
        self.directory = cache_root() / key
        t0 = time.perf_counter()
        if self._load():
            logger.info(
                "decode steps (batch 1; 2 and more): compiled graphs, loaded from %s in %.1fs; "
                "prompt and mixed steps: eager",
                self.directory,
                time.perf_counter() - t0,
            )
        elif mode == "on" or config is None:
            compiled.compile()
            try:
                compiled.save(self.directory)
            except OSError as e:
                logger.warning("could not save the compiled decode graphs to %s: %s", self.directory, e)
        else:
            handles = [m.handle for m in compiled.model.modules() if isinstance(m, OneDnnLinear)]
            try:
                self._job = _Background(config, self.directory, key, min(handles, default=0))
            except OSError as e:
                logger.warning("%s: cannot compile into %s: %s", STAYS_EAGER, self.directory, e)
                return
            logger.info(
                "%s (log: %s) saves the graphs; later starts load them", EAGER_UNTIL_COMPILED, self._job.log
            )

    def _load(self) -> bool:
        try:
            return self.compiled.load(self.directory)
        except Exception as e:  # a truncated file, another torch's pickle, an unwritable cache
            self.compiled.graphs.clear()
            logger.warning(
                "the saved decode graphs in %s do not load (%s); compiling them again", self.directory, e
            )
            for name in CompiledDecode.FILES.values():
                with contextlib.suppress(OSError):
                    (self.directory / name).unlink()
            return False

    def poll(self) -> None:
        job = self._job
        if job is None or (rc := job.finished()) is None:
            return
        self._job = None
        if rc == 0 and self._load():
            logger.info(
                "decode steps (batch 1; 2 and more): %s (compiled in the background in %.0fs)",
                COMPILED_NOW,
                time.monotonic() - job.started,
            )
        else:
            logger.warning("the background compile failed (exit %s); %s: see %s", rc, STAYS_EAGER, job.log)


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main(argv: list[str]) -> int:
    """The background compile: argv = directory, key, the server's pid and its first oneDNN linear
    handle (the graphs hold handles as constants); the EngineConfig on stdin."""
    directory, key, parent = Path(argv[0]), argv[1], int(argv[2])
    start_handles_at(int(argv[3]))
    config: EngineConfig = pickle.loads(sys.stdin.buffer.read())
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    os.nice(10)  # the server's steps come first
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(directory.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one compile per key at a time
        if all((directory / name).is_file() for name in CompiledDecode.FILES.values()):
            return 0  # another process compiled them meanwhile
        from pagoda.engine.core.engine_core import EngineCore
        from pagoda.engine.models import DecoderModel

        small = dataclasses.replace(config.cache, num_blocks_override=4, enable_prefix_caching=False)
        core = EngineCore(dataclasses.replace(config, compile="off", cache=small))
        if graph_key(core.model, config.cache.block_size) != key:
            print("this process builds a different model than the server's: not compiled", file=sys.stderr)
            return 3
        assert isinstance(core.model, DecoderModel), "decode graphs are for decoders"
        compiled = CompiledDecode(core.model, core.runner.kv_caches, config.cache.block_size)
        compiled.compile()
        compiled.save(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
