"""The tree's layering, read from the source with `ast` (nothing is imported): every import runs
downward (benchmarks → deployments → engine), modules import each other without cycles, and tests
import neither the benchmarks nor another test module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "deployments", "benchmarks")
# What each package may import from the others (its own modules always).
ALLOWED = {"engine": set(), "deployments": {"engine"}, "benchmarks": {"engine", "deployments"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_import_runs_downward(package):
    wrong = {
        f"{module_name(p)} imports {name}"
        for p in python_files(package)
        for name in imports_of(p)
        if top(name) in PACKAGES and top(name) != package and top(name) not in ALLOWED[package]
    }
    assert not wrong, sorted(wrong)


def test_no_import_cycles_between_modules():
    files = python_files(*PACKAGES)
    known = {module_name(p) for p in files}
    graph = {module_name(p): {n for n in imports_of(p) if n in known and n != module_name(p)} for p in files}
    # a package's __init__ importing its own modules is not a cycle through them
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (cycle := visit(dep, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_tests_import_neither_benchmarks_nor_other_test_modules():
    wrong = set()
    for p in python_files("tests"):
        for name in imports_of(p):
            leaf = name.split(".")[-1]
            if top(name) == "benchmarks" or (top(name) == "tests" and leaf.startswith("test_")):
                wrong.add(f"{module_name(p)} imports {name}")
    assert not wrong, sorted(wrong)
