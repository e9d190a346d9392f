"""The gateway, tokenizer and scheduler never import torch: their image can be slim and they start
in well under the 2 s a worker's imports alone take. Each check runs in a fresh interpreter, since
this test process has torch loaded already."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FRONT_ROLES = ("gateway", "tokenizer", "scheduler")

# Makes `import torch` (and any torch submodule) fail as if torch were not installed.
_BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)

# Builds one role's services from its command line, as `pagoda <role>` does before it starts them.
_BUILD_ROLE = textwrap.dedent(
    """
    import asyncio

    from pagoda.services.cli.config import launch_config
    from pagoda.services.cli.launch import Process
    from pagoda.services.cli.parser import build_parser

    role = sys.argv[1]
    args = build_parser().parse_args([role, "--bus", "amqp://unused", "--store", "redis://unused"])
    process = Process(launch_config(args, (role,)))
    asyncio.run(process.build_services())
    print("built:", ",".join(sorted(type(s).__name__ for s in process.services)))
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch: blocked")
    """
)
_EXPECTED_SERVICES = {
    "gateway": "BusFrontend,FleetAdmission",
    "tokenizer": "TokenizerService",
    "scheduler": "SchedulerService",
}


def _python(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)


def _imported_modules(importtime_stderr: str) -> list[str]:
    """Module names from `python -X importtime` output ('import time: self | cumulative | name')."""
    lines = [ln for ln in importtime_stderr.splitlines() if ln.startswith("import time:")]
    return [ln.rsplit("|", 1)[1].strip() for ln in lines[1:]]  # lines[0] is the header


@pytest.mark.parametrize("role", FRONT_ROLES)
def test_role_help_imports_no_torch(role: str) -> None:
    out = _python("-X", "importtime", "-m", "pagoda", role, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"usage: pagoda {role}" in out.stdout
    modules = _imported_modules(out.stderr)
    assert "pagoda.services.cli.parser" in modules  # importtime saw the parser being built
    torch_modules = [m for m in modules if m == "torch" or m.startswith("torch.")]
    assert not torch_modules, f"`pagoda {role} --help` imported {torch_modules[:5]}"


def test_the_importtime_check_sees_torch_when_it_is_imported() -> None:
    """The check above can fail: the same parsing finds torch in a process that imports it."""
    out = _python("-X", "importtime", "-c", "import torch")
    assert "torch" in _imported_modules(out.stderr)


@pytest.mark.parametrize("role", FRONT_ROLES)
def test_role_builds_with_torch_unimportable(role: str) -> None:
    """Against the demo GGUF's tokenizer (the default model): the role's services are built while
    any `import torch` fails."""
    out = _python("-c", _BLOCK_TORCH + _BUILD_ROLE, role)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"built: {_EXPECTED_SERVICES[role]}" in out.stdout, out.stdout
    assert "torch: blocked" in out.stdout  # the blocker was in force the whole time


def test_a_worker_needs_torch() -> None:
    """The blocker works: a worker's build, which loads a model, fails without torch."""
    out = _python("-c", _BLOCK_TORCH + _BUILD_ROLE, "worker")
    assert out.returncode != 0
    assert "blocked by the test" in out.stderr
