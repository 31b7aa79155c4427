"""The import graph of the project's packages: one-way arrows between packages, no cycle
between modules, and imports inside functions only for optional dependencies.

The graph is read from the source with `ast` (no module is imported), so a cycle that
only shows at import time in some order, or an arrow hidden in a function, is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (pyproject's package-dir mapping)
PACKAGES = {
    "skillpack_kernels": "kernels",
    "skillpacks": "skillpacks",
    "skillpack_evals": "evals",
    "skillpack_server": "server",
}
# package -> the packages of ours it may import (the arrows of docs/ARCHITECTURE.md)
ALLOWED = {
    "skillpack_kernels": set(),
    "skillpacks": {"skillpack_kernels"},
    "skillpack_evals": {"skillpacks", "skillpack_kernels"},
    "skillpack_server": {"skillpacks", "skillpack_kernels"},
}
# dependencies that are not always installed (extras, the GPU image): the only ones a
# function may import late, so a missing one breaks only the code that needs it
OPTIONAL = {"openai", "matplotlib", "ray", "lm_eval", "triton", "llguidance", "uvicorn", "gguf", "peft"}


def _modules() -> dict[str, Path]:
    mods = {}
    for name, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, ast.AST, bool]]:
    """(imported name, node, inside a function) for each import in the file; relative
    imports resolved, `from a import b` counted as `a.b` when that is a module of ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, child, nested))
                found.extend((f"{target}.{a.name}", child, nested) for a in child.names
                             if f"{target}.{a.name}" in known)
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = _modules()
GRAPH = {m: _imports(m, p, set(MODULES)) for m, p in MODULES.items()}


def _package(name: str) -> str:
    return name.split(".")[0]


def _needing_optional() -> set[str]:
    """Modules of ours that import an optional dependency at their top level, directly or
    through another such module: importing one of them late is importing that dependency late."""
    needs = {m for m, imps in GRAPH.items() if any(_package(t) in OPTIONAL and not nested for t, _, nested in imps)}
    while True:
        more = {m for m, imps in GRAPH.items() if m not in needs and any(t in needs and not nested for t, _, nested in imps)}
        if not more:
            return needs
        needs |= more


NEEDS_OPTIONAL = _needing_optional()


def test_every_package_is_read():
    for name in PACKAGES:
        assert any(_package(m) == name for m in MODULES), f"no module of {name} found"


def test_arrows_between_packages_are_one_way():
    wrong = sorted({(m, t) for m, imps in GRAPH.items() for t, _, _ in imps
                    if _package(t) in PACKAGES and _package(t) != _package(m)
                    and _package(t) not in ALLOWED[_package(m)]})
    assert not wrong, f"imports against the package arrows: {wrong}"


def test_package_code_never_imports_tests_or_bench():
    wrong = sorted({(m, t) for m, imps in GRAPH.items() for t, _, _ in imps if _package(t) in ("tests", "bench")})
    assert not wrong, wrong


def test_bench_never_imports_tests():
    wrong = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for t, _, _ in _imports("bench." + path.stem, path, set()):
            if _package(t) == "tests":
                wrong.append((path.name, t))
    assert not wrong, f"bench scripts importing tests: {wrong}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    # the oracle for the real test: a three-module ring and a self-contained tail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    edges = {m: {t for t, _, _ in imps if t in MODULES and t != m} for m, imps in GRAPH.items()}
    assert _cycles(edges) == []


def _has_reason(lines: list[str], at: int) -> bool:
    """A comment on the import's line or above it, within the block of imports it belongs to."""
    if "#" in lines[at]:
        return True
    for line in reversed(lines[:at]):
        text = line.strip()
        if not text.startswith(("#", "import ", "from ")):
            return False
        if "#" in text:
            return True
    return False


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_inside_functions_are_optional_dependencies_with_a_reason(package):
    wrong = []
    for module, imps in GRAPH.items():
        if _package(module) != package:
            continue
        lines = MODULES[module].read_text().splitlines()
        for target, node, nested in imps:
            if not nested:
                continue
            if _package(target) not in OPTIONAL and target not in NEEDS_OPTIONAL:
                wrong.append(f"{module}:{node.lineno} imports {target} inside a function")
                continue
            if not _has_reason(lines, node.lineno - 1):
                wrong.append(f"{module}:{node.lineno} imports {target} late without a comment saying why")
    assert not wrong, "\n".join(wrong)
