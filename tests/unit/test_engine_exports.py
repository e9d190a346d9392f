"""The engine's API is `pagoda.engine`'s exports: the services import nothing else of the engine,
the type checker sees the same names the lazy loader serves, and light names stay torch-free."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pagoda.engine as engine_api

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "pagoda" / "services"
# what the gateway, tokenizer and scheduler roles (and a simulated worker) import: no torch
LIGHT = (
    "SamplingParams", "RequestOutput", "TokenLogprob", "Tokenizer", "IncrementalDetokenizer", "StopChecker",
    "BlockHash", "hash_full_blocks", "AsyncEngine", "EngineDeadError", "StepCore", "build_off_main_thread",
    "CoreCounters", "EngineCapacity", "SimCore", "SimConfig",
)  # fmt: skip


def engine_imports_outside_the_api(source: str) -> list[str]:
    """Every import in `source` of an engine submodule, or of a name `pagoda.engine` does not export."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("pagoda.engine.")]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.startswith("pagoda.engine."):
                bad.append(node.module)
            elif node.module == "pagoda.engine":
                bad += [f"pagoda.engine.{a.name}" for a in node.names if a.name not in engine_api._EXPORTS]
    return bad


def test_the_check_catches_each_way_around_the_api() -> None:
    source = (
        "import pagoda.engine.kv.block_pool\n"
        "from pagoda.engine.outputs import RequestOutput\n"
        "from pagoda.engine import loader, SamplingParams\n"
        "def f() -> None:\n    from pagoda.engine.core import engine_core\n"
    )
    assert engine_imports_outside_the_api(source) == [
        "pagoda.engine.kv.block_pool", "pagoda.engine.outputs", "pagoda.engine.loader", "pagoda.engine.core",
    ]  # fmt: skip


def test_services_import_only_what_the_engine_exports() -> None:
    files = sorted(SERVICES.rglob("*.py"))
    assert len(files) > 20, files  # the walk found the services
    found = {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := engine_imports_outside_the_api(path.read_text()))
    }
    assert found == {}, "import these from pagoda.engine (add them to its _EXPORTS if needed)"


def test_the_type_checker_sees_exactly_the_exports() -> None:
    tree = ast.parse((ROOT / "pagoda" / "engine" / "__init__.py").read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    typed = {a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert typed == engine_api._EXPORTS


def test_every_export_is_its_module_s_object() -> None:
    for name, module in engine_api._EXPORTS.items():
        assert getattr(engine_api, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match=r"'pagoda\.engine' has no attribute 'kv_pool'"):
        engine_api.kv_pool  # noqa: B018


def test_light_exports_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        f"from pagoda.engine import {', '.join(LIGHT)}\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not heavy, heavy[:5]\n"
        "import pagoda.engine\n"
        "pagoda.engine.EngineCore\n"  # and a heavy name does bring it: the check can fail
        "assert 'torch' in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
