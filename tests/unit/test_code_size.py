"""No source file under pagoda/ over 400 lines and no function over 60 lines, unless an allowlist
below states why. The allowlists must name only what is still over the limit, so an entry goes
when its code is split."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pagoda"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

# "path/from/repo/root.py" -> why the file stays longer
LONG_FILES: dict[str, str] = {}
# "path/from/repo/root.py:Qualified.name" -> why the function stays longer
LONG_FUNCTIONS: dict[str, str] = {}


def function_lengths(source: str, path: str) -> Iterator[tuple[str, int]]:
    """("path:Qualified.name", lines from `def` to the last line) of every function and method
    in `source`, nested ones included (their names under their parent's)."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield f"{path}:{name}", (child.end_lineno or child.lineno) - child.lineno + 1
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(source), "")


def _sources() -> Iterator[tuple[str, str]]:
    for file in sorted(PACKAGE.rglob("*.py")):
        yield file.relative_to(ROOT).as_posix(), file.read_text(encoding="utf-8")


def _long_files() -> dict[str, int]:
    sizes = {path: len(text.splitlines()) for path, text in _sources()}
    return {path: n for path, n in sizes.items() if n > MAX_FILE_LINES}


def _long_functions() -> dict[str, int]:
    found = (item for path, text in _sources() for item in function_lengths(text, path))
    return {name: n for name, n in found if n > MAX_FUNCTION_LINES}


def test_no_file_over_the_limit_without_a_reason() -> None:
    over = {path: n for path, n in _long_files().items() if path not in LONG_FILES}
    assert not over, f"files over {MAX_FILE_LINES} lines (split them, or add a reason to LONG_FILES): {over}"


def test_no_function_over_the_limit_without_a_reason() -> None:
    over = {name: n for name, n in _long_functions().items() if name not in LONG_FUNCTIONS}
    assert not over, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps, or add a reason to "
        f"LONG_FUNCTIONS): {over}"
    )


def test_the_allowlists_name_only_what_is_still_over() -> None:
    stale = (set(LONG_FILES) - set(_long_files())) | (set(LONG_FUNCTIONS) - set(_long_functions()))
    assert not stale, f"no longer over the limit (or renamed): remove {sorted(stale)} from the allowlist"


@pytest.mark.parametrize("kind", ["def", "async def"])
def test_the_walk_measures_nested_functions_and_methods(kind: str) -> None:
    """The walk can fail: it sees a long function inside a method, with its full length."""
    body = "".join(f"            x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = f"class A:\n    def method(self):\n        {kind} inner():\n{body}\n        return inner\n"
    lengths = dict(function_lengths(source, "m.py"))
    assert lengths["m.py:A.method.inner"] == MAX_FUNCTION_LINES + 1
    assert lengths["m.py:A.method"] == MAX_FUNCTION_LINES + 4
