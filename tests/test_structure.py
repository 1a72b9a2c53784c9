"""The package's shape, checked from its source: no import cycles, a core that imports nothing
above it, ruff and mypy clean. These read the code; nothing runs."""
import ast
import re
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


# --- each piece of plumbing exists once (issue #14): found in the source, where it lives -------

def _trees() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with ``{}`` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _where(found) -> list[str]:
    return sorted({path for path, _ in found})


def _walk(trees=None):
    for path, tree in (trees or _trees()).items():
        for node in ast.walk(tree):
            yield path, node


def _calls(name: str, trees=None):
    """(path, call) for every call of ``x.name(...)`` or ``name(...)``."""
    for path, node in _walk(trees):
        if isinstance(node, ast.Call):
            f = node.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == name:
                yield path, node


PROC_FILES = re.compile(r"/proc/(\{\}|self|\d+|\*)/(cmdline|mountinfo)$")
_BOUND = r"\{\d*,(\d+|\{\})\}"                     # {0,30}, or an f-string's {0,{most}}
_PIECE = rf"(\[[^\]]+\]|\{{\}}|[()?:*+]|{_BOUND})"     # a class, a placeholder, a group, a repeat
NAME_RULE = re.compile(rf"{_PIECE}*{_BOUND}{_PIECE}*")


def proc_readers(trees=None) -> list[str]:
    """Modules that name a process's command line or mount table, or list /proc."""
    found = [(path, node) for path, node in _walk(trees) if PROC_FILES.search(_text(node) or "")]
    found += [(path, call) for path, call in _calls("listdir", trees)
              if call.args and _text(call.args[0]) == "/proc"]
    return _where(found)


def name_rules(trees=None) -> list[str]:
    """Modules that match a string against a name rule of their own: character classes with a
    bounded length, such as ``[a-z0-9][a-z0-9-]{0,30}``."""
    return _where((path, call) for fn in ("compile", "fullmatch", "match", "search")
                  for path, call in _calls(fn, trees)
                  if call.args and NAME_RULE.fullmatch(_text(call.args[0]) or ""))


def names_built_by_hand(trees=None) -> list[str]:
    """Modules that build a ``cnlab-<parts>`` name in an f-string instead of ``names.name``."""
    return _where((path, node) for path, node in _walk(trees) if isinstance(node, ast.JoinedStr)
                  and len(node.values) > 2 and isinstance(node.values[0], ast.FormattedValue)
                  and getattr(node.values[0].value, "id", None) == "PREFIX"
                  and (_text(node.values[1]) or "").startswith("-"))


# Loops that sleep to measure over time, not to wait for something: they keep their own loop.
MEASURING = {("containers/cgroups.py", "sample"), ("notebook/widgets.py", "_run")}


def polling_loops(trees=None) -> list[str]:
    """Functions with a loop that sleeps (a poll until a deadline), as path:function."""
    found = set()
    for path, tree in (trees or _trees()).items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for loop in ast.walk(fn):
                    if isinstance(loop, (ast.While, ast.For)) and any(_calls("sleep", {path: loop})) \
                            and (path, fn.name) not in MEASURING:
                        found.add(f"{path}:{fn.name}")
    return sorted(found)


def libc_handles(trees=None) -> list[str]:
    return _where((path, node) for path, node in _walk(trees) if isinstance(node, ast.Attribute)
                  and node.attr in ("CDLL", "PyDLL", "LoadLibrary"))


def whiteout_rules(trees=None) -> list[str]:
    """Modules that spell out the OCI whiteout names or test for overlayfs's 0:0 device."""
    return _where((path, node) for path, node in _walk(trees)
                  if (_text(node) or "").startswith(".wh.")
                  or isinstance(node, ast.Attribute) and node.attr == "st_rdev")


def daemon_runners(trees=None) -> list[str]:
    """Modules that start a process in a session of its own, or tie its life to its parent's."""
    return _where((path, node) for path, node in _walk(trees)
                  if isinstance(node, ast.Call) and any(k.arg == "start_new_session" for k in node.keywords)
                  or _text(node) == "--pdeathsig")


def cgroup_internals(trees=None) -> list[str]:
    """Modules that reach into cgroups' private functions (its files are written by
    ``cgroups.write`` and removed by ``cgroups.remove_dirs``)."""
    return _where((path, node) for path, node in _walk(trees) if isinstance(node, ast.Attribute)
                  and getattr(node.value, "id", None) == "cgroups" and node.attr.startswith("_"))


def loop_faces(trees=None) -> list[str]:
    """Classes outside the core that run a ``loop.Loop`` and write its running/start/stop or
    ``with`` block themselves, instead of inheriting ``loop.Runs``."""
    found = []
    for path, tree in (trees or _trees()).items():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef) or path == "_core/loop.py":
                continue
            runs_a_loop = any(isinstance(c, ast.Call) and getattr(c.func, "attr", None) == "Loop"
                              for c in ast.walk(cls))
            bases = {getattr(b, "attr", getattr(b, "id", None)) for b in cls.bases}
            own = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
            if runs_a_loop and ("Runs" not in bases or own & {"running", "__enter__", "__exit__"}):
                found.append(f"{path}:{cls.name}")
    return found


def test_each_piece_of_plumbing_exists_once():
    trees = _trees()                      # the package, parsed once for all nine checks
    assert proc_readers(trees) == ["_core/procfs.py"]
    assert name_rules(trees) == ["_core/names.py"]
    assert names_built_by_hand(trees) == []
    assert polling_loops(trees) == ["_core/wait.py:until"]
    assert libc_handles(trees) == ["_core/libc.py"]
    assert whiteout_rules(trees) == ["containers/rootfs.py"]
    assert daemon_runners(trees) == ["_core/daemon.py"]
    assert cgroup_internals(trees) == []
    assert loop_faces(trees) == []


def test_the_plumbing_checks_find_a_copy():
    """Each check above sees a copy of its plumbing, written the way the old copies were."""
    copies = {
        proc_readers: "def mounts():\n    return open('/proc/self/mountinfo').read()\n",
        name_rules: "import re\ndef ok(n):\n    return re.fullmatch(r'[a-z0-9][a-z0-9-]{0,30}', n)\n",
        names_built_by_hand: "def f(name):\n    return f'{PREFIX}-{name}'\n",
        polling_loops: ("import time\ndef wait(done):\n    deadline = time.monotonic() + 5\n"
                        "    while not done() and time.monotonic() < deadline:\n        time.sleep(0.1)\n"),
        libc_handles: "import ctypes\nlibc = ctypes.CDLL(None)\n",
        whiteout_rules: "def deleted(name):\n    return name.startswith('.wh.')\n",
        daemon_runners: "import subprocess\nsubprocess.Popen(['etcd'], start_new_session=True)\n",
        cgroup_internals: "from helpers.containers import cgroups\ncgroups._write('x', 1)\n",
        loop_faces: ("class C:\n    def __init__(self):\n        self._loop = loop.Loop(None)\n"
                     "    @property\n    def running(self):\n        return self._loop.running\n"),
    }
    for check, source in copies.items():
        found = check({"copy.py": ast.parse(source)})
        assert found and found[0].startswith("copy.py"), check.__name__
