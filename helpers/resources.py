"""Where the course keeps its things, how it names them, and how it sweeps them.

Every resource the helpers create carries the prefix ``cnlab`` (cgroups, mount points under
``STATE``, network namespaces, containers and their labels, data directories), so that
``cleanup()`` can find and remove whatever a crash or an interrupted cell left behind, and
``leftovers()`` can prove that nothing was.
"""
import contextlib
import importlib
import importlib.util
import os
import socket
import subprocess
from pathlib import Path

PREFIX = "cnlab"
LABEL = PREFIX  # Docker/containerd label key: {"cnlab": "<owner>"}
ROOT = Path(__file__).resolve().parent.parent          # the course checkout
LABS = ROOT / "labs"
# Survives runs and checkouts: the kernel, the rootfs, built binaries. Shared by every clone.
CACHE = Path(os.environ.get("CNLAB_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / PREFIX)
STATE = Path(os.environ.get("CNLAB_STATE", f"/run/{PREFIX}"))     # per-run: mounts, sockets, data

# Modules that own something beyond the generic kinds below, in the order they must go:
# what runs inside something else is stopped first. Each has a ``sweep()``.
_OWNERS = ("kind", "sandbox", "vm", "cri", "containerd", "runc", "controller", "swarm", "images",
           "apiserver", "etcd", "ns", "cgroups", "oci")


def name(*parts):
    """A resource name that ``cleanup()`` will recognise: ``cnlab-<parts>``."""
    return "-".join((PREFIX, *map(str, parts)))


def state_dir(*parts):
    path = STATE.joinpath(*map(str, parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now (servers stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mounts():
    """Mount points with the prefix, deepest first (the order they can be unmounted in)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if PREFIX in point:
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def _cgroups():
    root = Path("/sys/fs/cgroup")
    found = [str(p) for p in root.rglob(f"*{PREFIX}*") if p.is_dir()] if root.is_dir() else []
    return sorted(found, key=len, reverse=True)


def _netns():
    run = Path("/run/netns")
    return sorted(p.name for p in run.iterdir() if PREFIX in p.name) if run.is_dir() else []


def _processes():
    """Processes whose command line names the prefix (our etcd, qemu, containerd, shells)."""
    me = {os.getpid(), os.getppid()}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if PREFIX in args and int(pid) not in me and "pytest" not in args:
            found.append(f"{pid} {args}")
    return found


def _docker():
    from .images import EngineUnavailable, client as docker_client
    from .swarm import is_ours
    try:
        client = docker_client(timeout=5)
    except EngineUnavailable:  # no engine: nothing of ours can be alive there
        return []
    with contextlib.closing(client):
        # the low-level list: the high-level one re-reads each container, racing their removal
        found = [f"container {c['Names'][0].lstrip('/')}"
                 for c in client.api.containers(all=True, filters={"label": LABEL})]
        found += [f"docker-network {n.name}" for n in client.networks.list(filters={"label": LABEL})]
        found += [f"docker-volume {v.name}" for v in client.volumes.list(filters={"label": LABEL})]
        if client.info()["Swarm"]["LocalNodeState"] == "active" and is_ours(client):
            found.append("swarm made by the course")
        return found


def leftovers():
    """Everything with the prefix still alive on this machine, one line each (like shared/tools/leaks)."""
    return ([f"mount {m}" for m in _mounts()] + [f"cgroup {c}" for c in _cgroups()]
            + [f"netns {n}" for n in _netns()] + [f"process {p}" for p in _processes()]
            + _docker())


def cleanup():
    """Remove everything the helpers created and a crash left behind; return what was removed.

    Safe to call at any time and twice: each owner's ``sweep()`` treats "already gone" as done.
    """
    before = leftovers()
    for owner in _OWNERS:
        if importlib.util.find_spec(f"helpers.{owner}"):
            importlib.import_module(f"helpers.{owner}").sweep()
    for _ in range(10):  # mounts can be stacked on one point: detach until none is left
        points = _mounts()
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True)
        if not points:
            break
    after = set(leftovers())
    return [item for item in before if item not in after]
