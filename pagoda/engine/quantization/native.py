"""pagoda's own CPU kernels (csrc/: qgemm.cpp, wgemm.cpp, fp8.cpp,
norm.cpp, lora.cpp for multi-LoRA, attention.cpp for decode attention over the paged KV cache, and
bitmask.cpp for structured outputs), built on first use with the
machine's compiler for its own instruction set (`-march=native`) and cached under
~/.cache/pagoda/kernels (or $PAGODA_KERNEL_CACHE), one build per source, torch install and CPU
(checkouts of the same source share it: the sources are built from copies in it): the ops torch
ships for quantized weights dequantize per row (int4pack) or requantize activations in several
passes (fbgemm, oneDNN), which at 16 rows makes them slower than bf16 (docs/perf.md, issue 16).

The kernels need AVX512-VNNI (Cascade Lake and newer Xeons, Zen 4 and newer EPYCs); the AMX paths
(per-token W8A8, prompt rows of weight-only layers) need AMX too. On a CPU with AVX2, FMA
and F16C but no AVX-512 (Zen 1-3 EPYCs, Intel client cores), the integer GEMM and the decode
attention run (qgemm_avx2.cpp: the same integers, so the same results; attention_avx2.cpp):
`runs(op)` says which op runs here; `available()`, which covers every kernel, is False there.
Where the build fails (no g++), both are False and the layers keep torch's kernels; the reason is
logged once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from pagoda.engine.config import cpu_flags

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
STALE_LOCK_S = 900.0  # a kernel build's lock older than this was left by a killed build
SOURCES = sorted(CSRC.glob("*.cpp"))
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # every kernel
AVX2_FLAGS = ("avx2", "fma", "f16c")  # without NEEDED_FLAGS: AVX2_OPS alone
AVX2_OPS = ("decode_attention", "qgemm")  # attention_avx2.cpp, qgemm_avx2.cpp
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


def cache_dir() -> Path:
    return Path(os.environ.get("PAGODA_KERNEL_CACHE", Path.home() / ".cache" / "pagoda" / "kernels"))


def missing_flags() -> list[str]:
    """The CPU features the kernels need that this CPU lacks."""
    flags = cpu_flags()
    return [f for f in NEEDED_FLAGS if f not in flags]


def build_name() -> str:
    """A name unique to the source, the flags it is built with, torch (its version and where it is
    installed: the build's include paths name it, and a changed command rebuilds) and the CPU's
    features."""
    key = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        key.update(path.read_bytes())
    key.update(" ".join([*CFLAGS, torch.__version__, torch.__file__, *sorted(cpu_flags())]).encode())
    return f"pagoda_cpu_{key.hexdigest()[:16]}"


def avx2_only() -> bool:
    """Whether this CPU runs AVX2_OPS and no other kernel: it lacks NEEDED_FLAGS but has
    AVX2_FLAGS."""
    flags = cpu_flags()
    return bool(missing_flags()) and all(f in flags for f in AVX2_FLAGS)


@functools.cache
def available() -> bool:
    """True once every kernel is built and loaded here (a CPU with NEEDED_FLAGS)."""
    missing = missing_flags()
    if missing:
        some = f" but {', '.join(sorted(AVX2_OPS))} (AVX2)" if avx2_only() and _built() else ""
        logger.info("pagoda's CPU kernels are off%s: this CPU lacks %s", some, ", ".join(missing))
        return False
    return _built()


def isa() -> str:
    """The instruction set the kernels run on here, as layer kinds name it: "VNNI" (AVX512-VNNI)
    or "AVX2"."""
    return "AVX2" if missing_flags() else "VNNI"


def supports(op: str) -> bool:
    """Whether this CPU has what `op` needs (NEEDED_FLAGS, or AVX2_FLAGS for AVX2_OPS); nothing is
    built to answer."""
    return not missing_flags() or (op in AVX2_OPS and avx2_only())


@functools.cache
def runs(op: str) -> bool:
    """Whether `torch.ops.pagoda_cpu.<op>` runs here: the CPU supports it and the build succeeded
    (every op where available())."""
    if not missing_flags():
        return available()
    return supports(op) and _built()


@functools.cache
def _built() -> bool:
    try:
        _load()
    except Exception as e:  # a failed build must not stop serving: torch's kernels still work
        logger.warning("pagoda's CPU kernels could not be built (%s); using torch's", e)
        return False
    return True


def cache_clear() -> None:
    """Forget what available() and runs() found (tests that change the CPU's flags)."""
    for fn in (available, runs, _built):
        fn.cache_clear()


def _load() -> None:
    from torch.utils import cpp_extension

    # the ninja that pip installed beside this interpreter, for a venv that is not activated
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    name = build_name()
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    _clear_stale_lock(directory / "lock")
    if fresh:
        logger.info("building pagoda's CPU kernels for this CPU (once, 15-40 s) in %s", directory)
    start = time.monotonic()
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in _copied_sources(directory)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    if fresh:
        logger.info("built pagoda's CPU kernels in %.0f s", time.monotonic() - start)
    _register_fake()


def _clear_stale_lock(lock: Path) -> None:
    """Remove the lock of a build that was killed (torch leaves it behind and waits on it forever,
    so every later start would hang): a build takes minutes, a lock older than `STALE_LOCK_S` is
    nobody's."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        logger.warning("removing the lock of a kernel build that ended %.0f s ago without finishing", age)
        lock.unlink(missing_ok=True)


def _copied_sources(directory: Path) -> list[Path]:
    """The sources, copied into the build directory: its build file names them by path, so a build
    from another checkout of the same sources (a second clone, a git worktree) would otherwise
    rebuild the shared directory for its own paths."""
    src = directory / "src"
    src.mkdir(exist_ok=True)
    for path in CSRC.iterdir():
        data, copy = path.read_bytes(), src / path.name
        if not copy.exists() or copy.read_bytes() != data:
            partial = src / f".{path.name}.{os.getpid()}"
            partial.write_bytes(data)
            partial.replace(copy)  # atomic: a concurrent build never reads half a file
    return [src / p.name for p in SOURCES]


def _register_fake() -> None:
    """Shapes for torch.compile's tracing: the GEMMs give y [m, tiles * 16] in x's dtype, the
    norms x's shape."""

    def packed_gemm(x: torch.Tensor, packed: torch.Tensor, *weight_args: object) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0] * 16)

    for op in ("pagoda_cpu::qgemm", "pagoda_cpu::wgemm"):
        torch.library.register_fake(op)(packed_gemm)

    @torch.library.register_fake("pagoda_cpu::rms_norm")  # type: ignore[misc]
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("pagoda_cpu::add_rms_norm")  # type: ignore[misc]
    def _add_norm(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("pagoda_cpu::lora_add_")  # type: ignore[misc]
    def _lora(y: torch.Tensor, x: torch.Tensor, *weights_rows_and_columns: object) -> None:
        return None

    @torch.library.register_fake("pagoda_cpu::decode_attention")  # type: ignore[misc]
    def _attention(q: torch.Tensor, *caches_tables_and_scalars: object) -> torch.Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("pagoda_cpu::fp8_gemm")  # type: ignore[misc]
    def _fp8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], codes.shape[0] * 16)


def main() -> None:
    """`python -m pagoda.engine.quantization.native`: build now (make install and the images do,
    so the first request does not wait for the compiler)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if available():
        print("pagoda CPU kernels: ready")
    elif all(runs(op) for op in AVX2_OPS):
        ops = ", ".join(AVX2_OPS)
        print(f"pagoda CPU kernels: {ops} ready (AVX2); the others need AVX-512 (torch's are used)")
    else:
        print("pagoda CPU kernels: not available (torch's kernels are used)")


if __name__ == "__main__":
    main()
