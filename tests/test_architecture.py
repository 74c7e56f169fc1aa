"""The layout's rules, checked on the source (ARCHITECTURE.md): no import cycle between the project's modules
(function-level and TYPE_CHECKING imports count), the layers import downwards only, no module over 500 lines,
short module docstrings, and the model-class names spelled only in model/registry.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "parallel", "engine", "capacity", "deployments", "training")
# what each layer may import (besides itself and third-party code)
LAYERS = {"model": set(), "parallel": {"model"}, "capacity": {"model"}, "engine": {"model", "parallel"},
          "training": {"model"}, "deployments": {"model", "parallel", "engine"}}
MODEL_CLASS_NAMES = ("wan2.1_distill", "wan2.1_causvid")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        out["benchmarks." + path.stem] = path
    return out


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """Every project module this module imports, anywhere in it (lazy and TYPE_CHECKING imports included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downwards():
    bad = [(a, b) for a, deps in GRAPH.items() for b in deps
           if a.split(".")[0] in LAYERS and b.split(".")[0] != a.split(".")[0]
           and b.split(".")[0] not in LAYERS[a.split(".")[0]]]
    assert not bad, f"imports against the layers: {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size_and_docstring(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.relative_to(REPO)} has {len(text.splitlines())} lines"
    doc = ast.get_docstring(ast.parse(text), clean=False)
    if doc is not None:
        assert len(doc.strip().splitlines()) <= 12, f"{path.relative_to(REPO)}: module docstring of " \
                                                     f"{len(doc.strip().splitlines())} lines (essays: ARCHITECTURE.md)"


def test_model_class_names_only_in_the_registry():
    found = []
    for name, path in MODULES.items():
        if name == "model.registry":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value == "wan2.1" or any(m in node.value for m in MODEL_CLASS_NAMES):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:60]!r}")
    assert not found, "model-class names outside model/registry.py:\n" + "\n".join(found)
