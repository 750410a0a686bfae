"""The package layout (docs/architecture.md): layered imports, no cycles, small files.

Layers, lowest first; a module may import only from its own layer or lower ones, and the
three packages of the services layer (convert, train, engine) do not import each other:

0. ground floor: spec, rope, layers, sampling, runtime, checkpoint, plan, rows, serving, kernels
1. cache, attention
2. model
3. eval (data, tokenizers, perplexity), testing
4. services: convert | train | engine
5. entry points: cli, demo, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvslim"
LAYERS = [
    ("kvslim", "kvslim.spec", "kvslim.rope", "kvslim.layers", "kvslim.sampling", "kvslim.runtime",
     "kvslim.checkpoint", "kvslim.plan", "kvslim.rows", "kvslim.serving", "kvslim.kernels"),
    ("kvslim.cache", "kvslim.attention"),
    ("kvslim.model",),
    ("kvslim.eval", "kvslim.testing"),
    ("kvslim.convert", "kvslim.train", "kvslim.engine"),
    ("kvslim.cli", "kvslim.demo", "kvslim.__main__"),
]
SERVICES = ("kvslim.convert", "kvslim.train", "kvslim.engine")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _owner(name: str, table) -> tuple[int, str]:
    """(layer, group) of a module: the longest group prefix that matches."""
    best = None
    for i, groups in enumerate(table):
        for g in groups:
            if (name == g or name.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (i, g)
    if best is None:
        raise AssertionError(f"module {name} is in no layer of tests/test_layout.py")
    return best


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported kvslim module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n == "kvslim" or n.startswith("kvslim."):
                out.append((n, id(node) in top))
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    layer, group = _owner(module, LAYERS)
    for name, _ in _imports(MODULES[module], module):
        target = _resolve(name)
        if target is None:
            continue
        t_layer, t_group = _owner(target, LAYERS)
        assert t_layer <= layer, f"{module} (layer {layer}) imports {target} (layer {t_layer}): an upward arrow"
        if group in SERVICES and t_group in SERVICES:
            assert group == t_group, f"{module} imports {target}: the service packages stay independent"


def test_no_import_cycles():
    graph = {m: {t for n, top in _imports(p, m) if top and (t := _resolve(n)) and t != m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if m.startswith(t + ".") and t in MODULES:  # a submodule importing its own package __init__
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_small(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (> {MAX_LINES}): split it along its seams"


def test_every_module_opens_with_a_docstring():
    missing = [m for m, p in MODULES.items() if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"
