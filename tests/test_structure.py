"""The package's shape, checked from its source: no import cycles, a core that imports nothing
above it, ruff and mypy clean. These read the code; nothing runs."""
import ast
import subprocess
import sys
from pathlib import Path

import helpers

PACKAGE = Path(helpers.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Every module of helpers and the helpers modules it imports, at the top or inside a function."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:        # `from helpers.x import Name`: the module x
                    t = t.rpartition(".")[0]
                if t and t != name and t != "helpers":
                    found.add(t)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once (Tarjan's strongly connected components of two or more modules)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = imports()
    assert len(graph) > 30 and "helpers.containers.cgroups" in graph["helpers.containers.cri"]
    assert cycles(graph) == []


def test_the_core_imports_nothing_above_it():
    for name, targets in imports().items():
        if name.startswith("helpers._core") or name == "helpers.errors":
            above = {t for t in targets if not t.startswith("helpers._core") and t != "helpers.errors"}
            # owners walks the package by name at run time, which is no import
            assert not above, f"{name} imports {sorted(above)}"


def test_every_short_name_is_a_module():
    for short, full in helpers.MODULES.items():
        path = PACKAGE.parent / (full.replace(".", "/") + ".py")
        assert path.exists() or path.with_suffix("").joinpath("__init__.py").exists(), (short, full)


def test_ruff_and_mypy_pass():
    bin_ = Path(sys.executable).parent
    root = PACKAGE.parent
    for command in ([bin_ / "ruff", "check", "helpers", "tests", "bench"], [bin_ / "mypy"]):
        done = subprocess.run(command, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, f"{command[0].name}:\n{done.stdout}{done.stderr}"
