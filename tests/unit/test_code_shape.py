"""The shape of the source a reader meets: short functions, and the layers import-linter states."""

from __future__ import annotations

import ast
import concurrent.futures
import multiprocessing
import pathlib
import shutil
import subprocess
import sys

import flashsale

SRC = pathlib.Path(flashsale.__file__).parent
ROOT = SRC.parent.parent
#: Longest function, counted from its first decorator to its last line.
MAX_FUNCTION_LINES = 50


def _long_functions(tree: ast.AST, path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    return found


def _too_long(paths: list[pathlib.Path]) -> list[str]:
    return [entry for path in paths for entry in _long_functions(ast.parse(path.read_text()), path)]


def test_no_function_in_the_package_is_longer_than_fifty_lines() -> None:
    # In a process of its own: CPython 3.11 keeps the AST converter's depth count in one global, which
    # earlier tests in this process can leave off (the bench client's error tests do); ast.parse then
    # fails its own check with "AST constructor recursion depth mismatch", whatever the source.
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        too_long = pool.submit(_too_long, sorted(SRC.rglob("*.py"))).result(timeout=60)
    assert too_long == []


def test_the_length_check_counts_decorators_and_body() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(48))
    source = f"@a\n@b\ndef f():\n{body}\n"
    assert _long_functions(ast.parse(source), SRC / "x.py") == ["x.py:3 f (51 lines)"]
    assert _long_functions(ast.parse(source.replace("@b\n", "")), SRC / "x.py") == []


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: `make install`"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
