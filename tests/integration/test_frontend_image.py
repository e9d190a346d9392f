"""The frontend image's environment, built for real without a container engine: a fresh venv gets
exactly what Dockerfile.frontend's build stage installs (its COPY and `pip install` lines replayed,
in order, in a copy of the build context; pip's cache is reused), torch cannot be imported there,
and the gateway, tokenizer and scheduler start in it against the real RabbitMQ and Redis with the
demo model's tokenizer. Prints the venv's size on disk (docs/operations.md quotes it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.dockerfile import parse
from tests.processes import AMQP, REDIS, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 30.0  # each role answers /health within this many seconds of its start


def _venv_env(venv: Path) -> dict[str, str]:
    """This process's environment with `venv` first on PATH and nothing else on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}", "HF_HUB_OFFLINE": "1"}


def _replay_build_stage(venv: Path, context: Path) -> None:
    """Dockerfile.frontend's build stage with /opt/venv -> `venv` and WORKDIR -> `context`."""
    build = parse(ROOT / "Dockerfile.frontend")[0]
    assert build.values("RUN")[0] == "python -m venv /opt/venv" and build.values("WORKDIR") == ["/src"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _venv_env(venv)
    for instruction in build.instructions:
        if instruction.keyword == "COPY":
            *sources, dest = instruction.value.split()
            for source in sources:
                target = context / dest / Path(source).name if dest.endswith("/") else context / dest
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
        elif instruction.keyword == "RUN" and instruction.value.startswith("pip install"):
            out = subprocess.run(
                ["bash", "-c", instruction.value], cwd=context, env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, f"RUN {instruction.value}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def frontend_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frontend-image")
    venv = root / "venv"
    (root / "src").mkdir()
    _replay_build_stage(venv, root / "src")
    size = subprocess.run(
        ["du", "-sm", str(venv)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    print(f"\nfrontend venv (what Dockerfile.frontend installs): {size} MiB on disk")
    return venv


def test_torch_cannot_be_imported_in_the_frontend_venv(frontend_venv: Path) -> None:
    python = str(frontend_venv / "bin/python")
    env = _venv_env(frontend_venv)
    out = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr, out.stderr
    code = "import pagoda; print(pagoda.__file__)"
    pagoda = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=frontend_venv)
    assert pagoda.stdout.startswith(str(frontend_venv)), pagoda.stdout + pagoda.stderr  # the installed wheel


class _Role:
    """`pagoda <role> ...` from the frontend venv, its output in a log file."""

    def __init__(self, venv: Path, log_dir: Path, *args: str) -> None:
        self.name, self.log = args[0], log_dir / f"{args[0]}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(venv / "bin/pagoda"), *args], cwd=log_dir, env=_venv_env(venv),
            stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def roles(frontend_venv: Path, tmp_path: Path) -> Iterator[dict[str, tuple[_Role, str]]]:
    """The three roles started at once; role -> (process, its /health URL)."""
    ns = f"pagoda-frontend-{uuid.uuid4().hex[:8]}"
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", ns]
    ports = {role: free_port() for role in ("gateway", "tokenizer", "scheduler")}
    port_flag = {"gateway": "--port", "tokenizer": "--metrics-port", "scheduler": "--metrics-port"}
    started = {
        role: _Role(frontend_venv, tmp_path, role, *common, port_flag[role], str(port))
        for role, port in ports.items()
    }
    try:
        yield {role: (proc, f"http://127.0.0.1:{ports[role]}/health") for role, proc in started.items()}
    finally:
        running = {role: proc for role, proc in started.items() if proc.proc.poll() is None}
        for proc in running.values():  # one that exited early fails the test with its output
            proc.proc.send_signal(signal.SIGTERM)
        codes = {role: proc.proc.wait(30) for role, proc in running.items()}
        store = redis.Redis.from_url(REDIS)
        for key in store.scan_iter(f"{ns}:*"):
            store.delete(key)
        assert all(code == 0 for code in codes.values()), f"exit codes {codes}"


def test_gateway_tokenizer_and_scheduler_start_without_torch(roles: dict[str, tuple[_Role, str]]) -> None:
    up: dict[str, float] = {}
    deadline = time.monotonic() + STARTUP_S
    while len(up) < len(roles) and time.monotonic() < deadline:
        for role, (proc, url) in roles.items():
            if role in up:
                continue
            assert proc.proc.poll() is None, f"pagoda {role} exited:\n{proc.output()}"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    up[role] = time.monotonic() - proc.started
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    late = {role: proc.output() for role, (proc, _) in roles.items() if role not in up}
    assert not late, f"not up within {STARTUP_S}s: " + "\n".join(f"--- {r}\n{o}" for r, o in late.items())
    print("\nseconds to /health: " + ", ".join(f"{role} {s:.1f}" for role, s in up.items()))
    for proc, _ in roles.values():
        assert "Traceback" not in proc.output(), proc.output()
