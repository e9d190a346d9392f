"""Peer servers for `pagoda bench serve --peer NAME`: another OpenAI-compatible server started on
the same model, on a free 127.0.0.1 port, so both are measured with the same requests in one run.

A peer is a small object with `start()` (blocks until it answers), `stop()` and `base_url`; it is
also a context manager. Peers:
- `llamacpp`: llama.cpp's own `llama-server`, continuous batching over as many slots as the run's
  concurrency, the same thread count (`make llama-server` builds it; FACTS: ~20 min on 2 cores);
- `llama-cpp-python`: the `llama-cpp-python` package's server, which runs one request at a time
  (a queue at any concurrency: never "llama.cpp" in a comparison);
- `pagoda-no-prefix-cache`: pagoda itself with prefix caching off;
- `pagoda-no-spec`: pagoda itself without its --speculative-config.
HF transformers runs in-process instead (pagoda/load/hf_peer.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pagoda.engine.runner.compile_log import COMPILED_NOW, EAGER_UNTIL_COMPILED, STAYS_EAGER
from pagoda.load.server_process import Peer, PeerError, ServerProcess

# Modules `python -m llama_cpp.server` imports beyond llama_cpp itself (the [server] extra).
_LLAMACPP_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
LLAMACPP_FIX = "pip install 'llama-cpp-python[server]'"
LLAMA_SERVER_FIX = (
    "run `make llama-server` (builds llama.cpp's server, about 20 minutes on 2 cores) "
    "or set PAGODA_LLAMA_SERVER to a llama-server binary"
)


def llama_server_path() -> Path | None:
    """llama.cpp's `llama-server`: $PAGODA_LLAMA_SERVER, else on PATH, else where `make
    llama-server` builds it (~/.cache/pagoda/llama.cpp/build/bin/llama-server)."""
    if env := os.environ.get("PAGODA_LLAMA_SERVER"):
        return Path(env)
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    built = Path.home() / ".cache" / "pagoda" / "llama.cpp" / "build" / "bin" / "llama-server"
    return built if built.is_file() else None


def _gguf_or_demo(model_path: str | None) -> str:
    if model_path is None:
        from pagoda.engine.loader import demo_model_path

        model_path = demo_model_path()
    if not Path(model_path).is_file():
        raise PeerError(f"--peer-model {model_path!r} is not a file; pass a .gguf file")
    return model_path


class GgufServerPeer(ServerProcess):
    """A server of llama.cpp's family on a GGUF file (the demo's by default): `n_ctx` tokens of
    context per stream, `n_threads` CPU threads, `slots` concurrent streams."""

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 4096,
        n_threads: int = 2,
        slots: int = 1,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 300.0,
        serve_args: Sequence[str] = (),
    ) -> None:
        super().__init__(host, port, startup_timeout_s)
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.slots = max(1, slots)


class LlamaServerPeer(GgufServerPeer):
    """llama.cpp's own server, `llama-server`, on a GGUF file at full strength: `-np` slots (one per
    concurrent stream, batched continuously), `-c` their total context (llama-server divides it
    among the slots), `-t`/`-tb` threads. The chat template comes from the GGUF's metadata."""

    name = "llama.cpp"
    ready_path = "/health"
    binary: Path | None = None  # found by check()

    def command(self) -> list[str]:
        assert self.model_path and self.port is not None and self.binary is not None
        return [
            str(self.binary), "-m", self.model_path, "--host", self.host, "--port", str(self.port),
            "-np", str(self.slots), "-c", str(self.slots * self.n_ctx),
            "-t", str(self.n_threads), "-tb", str(self.n_threads),
        ]  # fmt: skip

    def check(self) -> None:
        self.binary = llama_server_path()
        if self.binary is None or not os.access(self.binary, os.X_OK):
            where = f" ({self.binary} is not executable)" if self.binary else ""
            raise PeerError(f"--peer llamacpp needs llama.cpp's llama-server{where}: {LLAMA_SERVER_FIX}")
        self.model_path = _gguf_or_demo(self.model_path)


class LlamaCppPythonPeer(GgufServerPeer):
    """The `llama-cpp-python` package's OpenAI-compatible server (`python -m llama_cpp.server`) on
    a GGUF file.

    The chat template comes from the GGUF's `tokenizer.chat_template` metadata (no --chat_format).
    The server runs one request at a time (no batching across requests); others wait in line
    (`--interrupt_requests False`: by default a new request would end the one streaming).
    """

    name = "llama-cpp-python"

    def command(self) -> list[str]:
        assert self.model_path and self.port is not None
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            self.model_path,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
            # the default (True) cuts a streaming reply short when the next request arrives
            "--interrupt_requests",
            "False",
        ]

    def check(self) -> None:
        missing = [m for m in _LLAMACPP_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise PeerError(f"--peer llama-cpp-python needs its server; install it: {LLAMACPP_FIX}")
        self.model_path = _gguf_or_demo(self.model_path)


class PagodaServer(ServerProcess):
    """`pagoda serve` with `serve_args` (and `extra_args`, e.g. --no-enable-prefix-caching) on a
    free port: the target of `bench serve --launch`, or a peer that differs in one setting."""

    ready_path = "/health/ready"

    def __init__(
        self,
        name: str = "pagoda",
        serve_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        model_path: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        super().__init__(host, port, startup_timeout_s)
        self.name = name
        self.serve_args = list(serve_args)
        self.extra_args = list(extra_args)
        self.model_path = model_path

    def _wait_ready(self) -> None:
        """Ready, and then a one-token completion answered: the gateway is ready once a worker
        heartbeats, and the scheduler may see that worker a beat later (a 503 until it does)."""
        import httpx

        super()._wait_ready()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            try:
                model = httpx.get(self.base_url + "/v1/models", timeout=10.0).json()["data"][0]["id"]
                body = {"model": model, "prompt": "Hi", "max_tokens": 1}
                if httpx.post(self.base_url + "/v1/completions", json=body, timeout=60.0).status_code == 200:
                    self._wait_compiled(body, deadline)
                    return
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.2)
        raise PeerError(f"{self.name} server answered no completion within {self.startup_timeout_s:g} s")

    def _wait_compiled(self, body: dict[str, object], deadline: float) -> None:
        """A first start of a model serves eagerly while a background process compiles its decode
        graphs, which a step adopts when they land (a minute or more); every later start loads them.
        Wait for that, sending a one-token completion a second so a step runs, so that the run
        measures what the server serves from then on, not its first minutes."""
        import httpx

        if EAGER_UNTIL_COMPILED not in self._log_text():
            return
        waiting = f"{self.name}: waiting for the background compile of its decode graphs (a first start)"
        print(waiting, file=sys.stderr)
        while time.monotonic() < deadline:
            text = self._log_text()
            if COMPILED_NOW in text:
                return
            if STAYS_EAGER in text:
                print(f"{self.name}: its decode steps stay eager: {self._log_tail()}", file=sys.stderr)
                return
            httpx.post(self.base_url + "/v1/completions", json=body, timeout=60.0)
            time.sleep(1.0)
        raise PeerError(f"{self.name} server compiled no decode graphs within {self.startup_timeout_s:g} s")

    def command(self) -> list[str]:
        assert self.port is not None
        model = ["--model", self.model_path] if self.model_path else []
        return [
            sys.executable, "-m", "pagoda", "serve", *model, *self.serve_args, *self.extra_args,
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip


def pagoda_no_prefix_cache(
    model_path: str | None = None,
    n_ctx: int = 4096,
    n_threads: int = 2,
    slots: int = 1,
    serve_args: Sequence[str] = (),
) -> PagodaServer:
    """pagoda itself with prefix caching off: with --launch, the same server as the target but for
    that one setting, so the TTFT ratio is what prefix caching buys."""
    return PagodaServer("pagoda-no-prefix-cache", serve_args, ["--no-enable-prefix-caching"], model_path)


def pagoda_no_spec(
    model_path: str | None = None,
    n_ctx: int = 4096,
    n_threads: int = 2,
    slots: int = 1,
    serve_args: Sequence[str] = (),
) -> PagodaServer:
    """pagoda itself without speculative decoding: with --launch, the same server as the target but
    for its --speculative-config, so the TPOT ratio is what speculation buys."""
    return PagodaServer("pagoda-no-spec", without_flag(serve_args, "--speculative-config"), (), model_path)


def without_flag(args: Sequence[str], flag: str) -> list[str]:
    """`args` less `flag` and its value (`--flag value` or `--flag=value`)."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


PEERS: dict[str, Callable[..., Peer]] = {
    "llamacpp": LlamaServerPeer,
    "llama-cpp-python": LlamaCppPythonPeer,
    "pagoda-no-prefix-cache": pagoda_no_prefix_cache,
    "pagoda-no-spec": pagoda_no_spec,
}


def make_peer(
    name: str,
    model_path: str | None = None,
    n_ctx: int = 4096,
    n_threads: int = 2,
    slots: int = 1,
    serve_args: Sequence[str] = (),
) -> Peer:
    """Peer `name`; `slots` is the run's concurrency (llama-server's -np), `n_ctx` each slot's
    context."""
    try:
        cls = PEERS[name]
    except KeyError:
        raise PeerError(f"--peer {name!r}: choose one of {', '.join(PEERS)}") from None
    extra = {"serve_args": serve_args} if serve_args else {}  # only --launch gives any
    return cls(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, slots=slots, **extra)
