"""The registry that ``helpers.cleanup()`` and ``helpers.leftovers()`` walk.

A module that creates something registers, at import, how to sweep it (and, if the generic
kinds below do not cover it, how to list it). ``cleanup()`` imports every module of the package
first, so that a fresh process (after a crashed kernel) sweeps as much as the one that made
the mess: adding a module touches nothing here.

Sweeps run by ``stage``: what runs inside something else goes first.
"""
import functools
import importlib
import os
import pkgutil
import shutil
from pathlib import Path
from typing import Callable

from helpers._core import procfs
from helpers._core.names import CACHE, PARTIAL, PREFIX, STATE

CLUSTERS = 10     # kind clusters: their nodes are containers
WORKLOADS = 20    # sandboxes, VMs, pods, runc containers, swarm services
RUNTIMES = 30     # containerd, Docker engines of the course's own, controllers
SERVERS = 40      # the API server, then etcd
KERNEL = 50       # namespaces, cgroups
FILES = 60        # state folders

_sweeps: list[tuple[int, str, Callable[[], object]]] = []
_listers: list[Callable[[], list[str]]] = []
_kept: list[Path] = []


_journal: list[str] | None = None    # while a journal is open: what each sweep removed


def sweeper(stage: int):
    """Decorator: ``fn()`` removes what its module made and a crash left; it must be idempotent."""
    def register(fn):
        key = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def sweep(*args, **kwargs):
            if _journal is None:
                return fn(*args, **kwargs)
            before = set(leftovers())
            try:
                return fn(*args, **kwargs)
            finally:
                if _journal is not None:
                    _journal.extend(f"{key}() removed {item}" for item in before - set(leftovers()))
        if all(k != key for _, k, _ in _sweeps):
            _sweeps.append((stage, key, sweep))
        return sweep
    return register


def journal(on: bool) -> list[str]:
    """Open (``on``) or close the journal of what sweeps removed; return what it holds. The test
    plugin opens it around a test's teardown, so a fixture that sweeps up its test's leak still
    fails that test."""
    global _journal
    held, _journal = _journal or [], ([] if on else None)
    return held


def lister(fn: Callable[[], list[str]]):
    """Decorator: ``fn()`` lists, one line each, what its module made that is still alive."""
    if fn not in _listers:
        _listers.append(fn)
    return fn


def keeps(path: Path) -> Path:
    """Declare a folder under ``STATE`` a cache that outlives a run (unpacked layers): not a leak."""
    if path not in _kept:
        _kept.append(path)
    return path


def _import_all():
    import helpers
    for info in pkgutil.walk_packages(helpers.__path__, "helpers."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


# -- the generic kinds, found by their name ----------------------------------------------------

def _mounts():
    return procfs.mount_points(lambda point: PREFIX in point)


def _cgroups():
    # os.walk, not rglob: a group removed while it is read is skipped, not an error
    found = [os.path.join(top, d) for top, dirs, _ in os.walk("/sys/fs/cgroup") for d in dirs
             if PREFIX in d]
    return sorted(found, key=len, reverse=True)


def _netns():
    run = Path("/run/netns")
    return sorted(p.name for p in run.iterdir() if PREFIX in p.name) if run.is_dir() else []


def _links():
    """veths and bridges named by the course, in the host's own network namespace."""
    net = Path("/sys/class/net")
    return sorted(p.name for p in net.iterdir() if PREFIX in p.name) if net.is_dir() else []


def _state():
    """Files left in the per-run state folder (its empty skeleton does not count)."""
    if not STATE.is_dir():
        return []
    return sorted(str(p) for p in STATE.rglob("*")
                  if not p.is_dir() and not any(p.is_relative_to(k) for k in _kept))


def _partials():
    """Half-built files and folders (``names.partial``) whose builder is dead, in CACHE and STATE."""
    found = []
    for top in (CACHE, STATE):
        for depth in ("", "*/", "*/*/"):
            for path in top.glob(f"{depth}.*.partial-*"):
                match = PARTIAL.fullmatch(path.name)
                if match and not procfs.alive(int(match["pid"])):
                    found.append(str(path))
    return sorted(found)


def leftovers() -> list[str]:
    """Everything of the course's still alive on this machine, one line each."""
    _import_all()
    found = ([f"mount {m}" for m in _mounts()] + [f"cgroup {c}" for c in _cgroups()]
             + [f"netns {n}" for n in _netns()] + [f"link {n}" for n in _links()]
             + [f"process {p}" for p in procfs.ours()] + [f"state {s}" for s in _state()] + [f"partial {p}" for p in _partials()])
    for fn in _listers:
        found += fn()
    return found


def cleanup() -> list[str]:
    """Remove everything the helpers created and a crash left behind; return what was removed.

    Safe to call at any time and twice: each sweep treats "already gone" as done.
    """
    before = leftovers()
    for _, _, fn in sorted(_sweeps, key=lambda s: s[0]):
        fn()
    for _ in range(10):  # mounts can be stacked on one point: detach until none is left
        points = _mounts()
        if not points:
            break
        procfs.unmount(points)
    procfs.kill([p.pid for p in procfs.ours()])
    for path in map(Path, _partials()):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    after = set(leftovers())
    return [item for item in before if item not in after]
