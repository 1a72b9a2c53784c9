"""Linux namespaces: create them, run code inside them in a child process, join and list them.

The notebook kernel is multithreaded, so its own namespaces are never changed: all namespace
work happens in a forked child that reports back over a pipe. The pieces compose::

    ns.run(socket.gethostname, new=["uts"], hostname="box")     # a callable in new namespaces
    ns.run(["ps", "-e"], new=["pid", "mnt"])                     # a command, PID 1, its own /proc
    with ns.start(["sleep", "60"], new=["net"]) as child:        # a long-running child
        ns.run(["ip", "link"], join=child.pid)                   # setns into its namespaces

and a caller that forks for itself (helpers.sandbox) can use ``flags()``, ``Namespace.enter``
and ``write_id_maps`` directly.

Used in: 21-namespaces, 22-cgroups, 23-filesystems, 24-container-from-scratch, 26-docker, book/containers/container-from-scratch, book/containers/images-filesystems, book/containers/namespaces-cgroups, book/containers/oci-docker-cri.
"""
import contextlib
import fcntl
import json
import os
import pickle
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Self

from helpers._core import libc, names, owners, procfs, wait
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool

# The name of each namespace type in /proc/<pid>/ns, and the flag that creates one.
NAMESPACES = {
    "uts": libc.CLONE_NEWUTS,
    "pid": libc.CLONE_NEWPID,
    "mnt": libc.CLONE_NEWNS,
    "net": libc.CLONE_NEWNET,
    "ipc": libc.CLONE_NEWIPC,
    "user": libc.CLONE_NEWUSER,
    "cgroup": libc.CLONE_NEWCGROUP,
    "time": libc.CLONE_NEWTIME,
}
_KIND_OF_FLAG = {flag: kind for kind, flag in NAMESPACES.items()}
# Joining: the user namespace first (it grants the capabilities over the others it owns),
# the mount namespace late (it changes what /proc and paths mean), like nsenter(1).
_JOIN_ORDER = ("user", "cgroup", "ipc", "uts", "net", "pid", "mnt", "time")
_NS_GET_NSTYPE = 0xB703           # ioctl(2) on a namespace fd: which CLONE_NEW* it is
NETNS_DIR = Path("/run/netns")    # where `ip netns` and pyroute2 keep named network namespaces
DEFAULT_ID_MAP = ((0, 100_000, 65_536),)   # root inside = uid 100000 outside, like /etc/subuid
_CLOCKS = ("monotonic", "boottime")        # the clocks a time namespace can offset


def probe(kind: str) -> str | None:
    """Try to create a namespace of this kind in a child; return None, or why it failed."""
    pid = os.fork()
    if pid == 0:
        try:
            libc.unshare(NAMESPACES[kind])
            os._exit(0)
        except OSError as e:
            os._exit(e.errno or 1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"unshare({kind}) failed: {os.strerror(code)}"


def flags(kinds: str | Iterable[str]) -> int:
    """The CLONE_NEW* flags for namespace names like ["pid", "mnt"]; BadInput names the valid ones."""
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in NAMESPACES]
    if unknown:
        raise BadInput(f"unknown namespace type {', '.join(map(repr, unknown))}",
                       fix=f"use some of {', '.join(NAMESPACES)}")
    value = 0
    for kind in kinds:
        value |= NAMESPACES[kind]
    return value


def unshare(kind: str) -> None:
    """Create one new namespace for the calling process. Only ever call it in a forked child."""
    try:
        libc.unshare(NAMESPACES[kind])
    except OSError as e:
        raise OSError(e.errno, f"cannot create a new {kind} namespace: {e.strerror}", kind) from e


class Namespace:
    """An open namespace, like lxns': it owns a file descriptor on ``/proc/<pid>/ns/<kind>``
    or on a bind mount such as ``/run/netns/<name>``, which keeps the namespace alive."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.kind = _KIND_OF_FLAG[fcntl.ioctl(self.fd, _NS_GET_NSTYPE)]
            self.inode = os.fstat(self.fd).st_ino
        except OSError as e:
            os.close(self.fd)
            raise OSError(e.errno, f"{self.path} is not a namespace: {e.strerror}", self.path) from e

    @classmethod
    def of(cls, pid: int | str, kind: str) -> Self:
        """The namespace of this kind that process ``pid`` is in."""
        flags([kind])
        return cls(f"/proc/{pid}/ns/{kind}")

    def enter(self) -> None:
        """setns(2) into it. Only ever call it in a forked child (see ``run(join=...)``)."""
        try:
            libc.setns(self.fd, NAMESPACES[self.kind])
        except OSError as e:
            raise OSError(e.errno, f"cannot join {self.kind} namespace {self}: {e.strerror}",
                          self.path) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other):
        return isinstance(other, Namespace) and (self.kind, self.inode) == (other.kind, other.inode)

    def __hash__(self):
        return hash((self.kind, self.inode))

    def __repr__(self):
        return f"<{type(self).__name__} {self}>"

    def __str__(self):
        return f"{self.kind}:[{self.inode}]"


# --- listing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NsInfo:
    """One namespace of a process: its type, inode, and every process that shares it."""
    kind: str
    inode: int
    pids: tuple


def _inode(pid, kind):
    link = os.readlink(f"/proc/{pid}/ns/{kind}")      # "net:[4026531840]"
    return int(link[link.index("[") + 1:-1])


def namespaces(pid: int | str = "self") -> list[NsInfo]:
    """The namespaces of process ``pid`` (type, inode, sharing pids), read from /proc like lsns."""
    pid = os.getpid() if pid == "self" else int(pid)
    mine = {kind: _inode(pid, kind) for kind in NAMESPACES}
    sharing: dict[str, list[int]] = {kind: [] for kind in NAMESPACES}
    for other in procfs.pids():
        for kind, inode in mine.items():
            try:
                if _inode(other, kind) == inode:
                    sharing[kind].append(other)
            except OSError:       # gone, or a kernel thread without this link
                pass
    return [NsInfo(kind, mine[kind], tuple(sorted(sharing[kind]))) for kind in NAMESPACES]


def lsns(pid: int | str) -> list[dict[str, Any]]:
    """What util-linux's ``lsns -p <pid>`` says: a list of {"kind", "inode", "nprocs"}."""
    if not shutil.which("lsns"):
        raise MissingTool("lsns", package="util-linux")
    out = subprocess.run(["lsns", "--json", "-p", str(pid), "-o", "NS,TYPE,NPROCS"],
                         capture_output=True, text=True, check=True).stdout
    return [{"kind": n["type"], "inode": int(n["ns"]), "nprocs": int(n["nprocs"])}
            for n in json.loads(out)["namespaces"]]


def children(pid: int | None = None) -> list[int]:
    """The pids of the children of ``pid`` (default: this process), zombies included: what
    ``start()`` left running or unreaped. A notebook checks it is empty at the end."""
    pid = os.getpid() if pid is None else int(pid)
    return sorted(other for other in procfs.pids() if procfs.parent(other) == pid)


# --- running in a child -----------------------------------------------------------------------

@dataclass
class Result:
    """How a child ended: its pid (on the host), exit status, output and return value."""
    pid: int | None       # None only if it ended before it could report one
    status: int           # as a shell reports it: the exit code, or 128 + the signal number
    signal: int | None    # the signal that killed it (9 for an OOM kill), or None
    output: str           # stdout and stderr, interleaved as written
    value: object = None  # what the callable returned (None for a command)

    @property
    def ok(self) -> bool:
        return self.status == 0


def start(target: Callable[..., Any] | Sequence[str | PathLike[str]], *args: Any,
          new: Iterable[str] = (), join: int | str | Sequence[Namespace] | None = None,
          cgroup: Any = None, hostname: str | None = None,
          uid_map: Iterable[tuple[int, int, int]] | None = None,
          gid_map: Iterable[tuple[int, int, int]] | None = None,
          clocks: dict[str, int] | None = None) -> "Child":
    """Start ``target`` (a callable, or a command as a list of strings) in a forked child.

    The child first joins ``cgroup`` (any object with ``add(pid=0)``, e.g. a helpers.cgroups
    Cgroup), then the namespaces in ``join`` (a pid: all of that process's namespaces that
    differ from ours, like ``nsenter --all``; or Namespace objects), then creates the ``new``
    ones. A new user namespace gets ``uid_map``/``gid_map`` (default: root inside = 100000
    outside), written by this process while the child waits. A new PID or time namespace only
    applies to children, so the child forks once more and the grandchild runs the target as
    PID 1; with new "pid" and "mnt" it gets its own /proc. ``hostname`` is set in a new UTS
    namespace, ``clocks`` ({"monotonic"|"boottime": seconds}) offsets a new time namespace.
    Returns a running Child once the target is set up (a command: once it has been executed,
    as ``subprocess.Popen`` does); errors in setup, and a command that cannot run, are raised here.

    Every process it makes carries the course's mark, so a leak check finds a forgotten one: a
    command gets it in its environment, a forked child that runs a callable is named ``cnlab``.
    """
    new = tuple(new)
    flags(new)
    joined = _to_join(join)
    try:
        _check(target, new, {n.kind for n in joined}, cgroup, hostname, uid_map, clocks)
        if "user" in new:
            uid_map = _id_map(uid_map if uid_map is not None else DEFAULT_ID_MAP, "uid_map")
            gid_map = _id_map(gid_map if gid_map is not None else uid_map, "gid_map")
        env = procfs.marked_env()           # the mark names this process as the owner
        records_r, records_w = os.pipe()
        output_r, output_w = os.pipe()
        go_r, go_w = os.pipe()
        exec_r, exec_w = os.pipe2(os.O_CLOEXEC)   # end-of-file: the target ran its exec (or ended)
        pid = os.fork()
        if pid == 0:
            for fd in (records_r, output_r, go_w, exec_r):
                os.close(fd)
            _leader(target, args, new, joined, cgroup, hostname, uid_map, clocks, env,
                    records_w, output_w, go_r, exec_w)
        for fd in (records_w, output_w, go_r, exec_w):
            os.close(fd)
    finally:
        if join is not None and not isinstance(join, (list, tuple)):
            for n in joined:
                n.close()
    child = Child(pid, records_r, output_r, go_w, exec_r)
    child._start(uid_map, gid_map)
    return child


def run(target: Callable[..., Any] | Sequence[str | PathLike[str]], *args: Any, timeout: float | None = 60,
        **options: Any) -> Result:
    """``start()`` the target, wait for it and return its Result (see start for the options).

    A callable's return value comes back as ``Result.value`` and an exception it raises is
    raised here; a command's exit status is ``Result.status`` (137 when it was SIGKILLed).
    """
    with start(target, *args, **options) as child:
        return child.wait(timeout)


def write_id_maps(pid: int, uid_map: Iterable[tuple[int, int, int]],
                  gid_map: Iterable[tuple[int, int, int]]) -> None:
    """Map user and group ids for the new user namespace of ``pid`` (from its parent, as root)."""
    for name, ranges in (("uid_map", uid_map), ("gid_map", gid_map)):
        text = "".join(f"{inside} {outside} {count}\n" for inside, outside, count in ranges)
        try:
            Path(f"/proc/{pid}/{name}").write_text(text)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {name} of the user namespace of pid {pid}: "
                          f"{e.strerror}", "user") from e


def _to_join(join):
    if join is None:
        return []
    if isinstance(join, (list, tuple)):
        if not all(isinstance(n, Namespace) for n in join):
            raise BadInput("join= must be a pid or a list of Namespace objects",
                           fix="use join=child.pid or join=[ns.Namespace.of(pid, 'net')]")
        return list(join)
    try:
        pid = int(join)
    except (TypeError, ValueError) as e:
        raise BadInput(f"join={join!r} is not a pid", fix="use join=child.pid") from e
    found = []
    for kind in NAMESPACES:
        try:
            if _inode(pid, kind) != _inode("self", kind):
                found.append(Namespace.of(pid, kind))
        except FileNotFoundError as e:
            raise BadInput(f"no process {pid} to join", fix="pass the pid of a running process") from e
    return found


def _check(target, new, joined, cgroup, hostname, uid_map, clocks):
    """Refuse bad combinations before anything is forked."""
    if not callable(target) and not (isinstance(target, (list, tuple)) and target
                                     and all(isinstance(a, (str, os.PathLike)) for a in target)):
        raise BadInput(f"cannot run {target!r}", fix='pass a callable, or a command as a list: ["ps", "-e"]')
    if cgroup is not None and not callable(getattr(cgroup, "add", None)):
        raise BadInput(f"cgroup={cgroup!r} has no add() method", fix="pass a helpers.cgroups.Cgroup")
    if len(set(new)) != len(new) or set(new) & joined:
        raise BadInput(f"each namespace type can be new or joined once: new={list(new)}, "
                       f"joined={sorted(joined)}")
    if hostname is not None and "uts" not in new and "uts" not in joined:
        raise BadInput("hostname= needs a UTS namespace of its own", fix='add new=["uts"]')
    if uid_map is not None and "user" not in new:
        raise BadInput("uid_map= needs a new user namespace", fix='add new=["user"]')
    if clocks is not None:
        if "time" not in new:
            raise BadInput("clocks= needs a new time namespace", fix='add new=["time"]')
        if not isinstance(clocks, dict) or not set(clocks) <= set(_CLOCKS) \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in clocks.values()):
            raise BadInput(f"clocks={clocks!r} is not valid",
                           fix='use whole seconds per clock, e.g. {"boottime": 86400, "monotonic": 0}')


def _id_map(ranges, what):
    """[(inside, outside, count), ...] of non-negative ints, count >= 1."""
    try:
        ranges = [tuple(int(x) for x in r) for r in ranges]
        if all(len(r) == 3 and min(r) >= 0 and r[2] >= 1 for r in ranges) and ranges:
            return ranges
    except (TypeError, ValueError):
        pass
    raise BadInput(f"{what}={ranges!r} is not an id map",
                   fix="use a list of (inside, outside, count), e.g. [(0, 100000, 65536)]")


class Child:
    """A running child started by ``start()``; a context manager that kills and reaps it.

    ``pid`` is the host pid of the process that runs the target (the PID 1 of a new PID
    namespace, seen from outside).
    """

    def __init__(self, leader: int, records: int, output: int, go: int, execed: int) -> None:
        self._leader = leader          # the process we forked, leader of its own process group
        # pipes from the child: pickled records, its output, and one that nothing writes to,
        # closed when the target executes its command (close-on-exec) or ends
        self._open = {records, output, execed}
        self._output = output
        self._execed = execed
        self._go = go                  # pipe to the child: "continue", once the id maps are written
        self._selector = selectors.DefaultSelector()
        for fd in self._open:
            self._selector.register(fd, selectors.EVENT_READ)
        self._buffer = b""
        self._chunks: list[bytes] = []
        self._seen: dict[str, list[Any]] = {}   # tag -> the record's payload
        self._result: Result | None = None
        self.pid: int | None = None

    def _start(self, uid_map, gid_map, timeout=30):
        deadline = time.monotonic() + timeout
        try:
            if uid_map and self._pump(lambda: {"unshared", "error"} & self._seen.keys(), deadline) \
                    and "unshared" in self._seen:
                write_id_maps(self._leader, uid_map, gid_map)
                os.write(self._go, b"1")
            # a command: returned once it runs, as subprocess does, so /proc shows the command
            if not self._pump(lambda: {"ready", "pid"} <= self._seen.keys()
                              and self._execed not in self._open or "error" in self._seen,
                              deadline):
                raise LabTimeout(f"the child was not set up within {timeout} s")
            if "ready" not in self._seen or "error" in self._seen:
                ended = self.wait()     # raises the child's error
                raise LabError(f"the child ended during its set-up:\n{ended.output}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _pump(self, until, deadline):
        """Read both pipes until ``until()`` holds or both are closed; False on timeout."""
        while not until() and self._open:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            for key, _ in self._selector.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    self._selector.unregister(key.fd)
                    self._open.discard(key.fd)
                    os.close(key.fd)
                elif key.fd == self._output:
                    self._chunks.append(data)
                else:
                    self._buffer += data
                    self._unpack()
        return True

    def _unpack(self):
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if len(self._buffer) < 4 + size:
                return
            tag, *payload = pickle.loads(self._buffer[4:4 + size])
            self._buffer = self._buffer[4 + size:]
            self._seen[tag] = payload
            if tag == "pid":
                self.pid = payload[0]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the target's process group: the target and whatever it started. (A leader
        that forked the target is spared: it reaps the target and reports how it ended.)"""
        with contextlib.suppress(ProcessLookupError):
            if self.pid is None:    # still setting up: the leader, whose group may not exist yet
                os.kill(self._leader, sig)
            else:
                os.killpg(self.pid, sig)

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for the child to end and return its Result; re-raise what the callable raised."""
        if self._result is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._pump(lambda: False, deadline):
                self.kill()
                self._reap()
                raise LabTimeout(f"the child (pid {self.pid}) did not finish within {timeout} s",
                                 fix="give it a larger timeout=, or see what it waits for")
            self._reap()
        if "error" in self._seen:
            exc, text = self._seen["error"]
            exc.add_note(f"raised in the child (pid {self.pid}):\n{text}")
            raise exc
        assert self._result is not None     # _reap() set it
        return self._result

    def _reap(self, linger=5.0):
        """Collect what is left in the pipes (a killed target's status comes from its leader),
        then the leader's exit status."""
        if self._go >= 0:           # a leader that waits for the id maps reads end-of-file
            os.close(self._go)
            self._go = -1
        self._pump(lambda: False, time.monotonic() + linger)
        _, status = os.waitpid(self._leader, 0)
        for fd in self._open:
            self._selector.unregister(fd)
            os.close(fd)
        self._open.clear()
        self._selector.close()
        status = self._seen.get("exit", [status])[0]   # relayed by the leader when it forked
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + sig if sig else os.WEXITSTATUS(status)
        output = b"".join(self._chunks).decode(errors="replace")
        self._result = Result(self.pid, code, sig, output, self._seen.get("value", [None])[0])

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._result is None:
            self.kill()
            self._reap()


# --- inside the child (never returns) ---------------------------------------------------------

def _send(fd, *record):
    try:
        data = pickle.dumps(record)
    except Exception as e:                 # an unpicklable value or exception
        data = pickle.dumps(("error", TypeError(f"cannot send {record[0]} back: {e}"), ""))
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _leader(target, args, new, joined, cgroup, hostname, uid_map, clocks, env, records, output, go,
            execed):
    code = 1
    try:
        procfs.mark_forked()               # and the grandchild it may fork inherits the name
        os.setsid()                        # its own session and process group, for Child.kill()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0), os.dup2(output, 1), os.dup2(output, 2)
        os.close(null)
        os.close(output)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if cgroup is not None:
            cgroup.add()                   # before unshare("cgroup"): the group becomes its root
        for kind in _JOIN_ORDER:
            for n in joined:
                if n.kind == kind:
                    n.enter()
        if "user" in new:
            unshare("user")
            _send(records, "unshared")
            if os.read(go, 1) != b"1":
                raise LabError("the parent did not write the id maps")
            if any(inside == 0 for inside, _, _ in uid_map):
                os.setresgid(0, 0, 0)
                os.setgroups([])
                os.setresuid(0, 0, 0)
                procfs.mark_forked()       # a change of credentials clears the death signal
        for kind in NAMESPACES:
            if kind in new and kind != "user":
                unshare(kind)
                if kind == "mnt":          # mounts made in here never propagate to the host
                    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        if clocks:
            Path("/proc/self/timens_offsets").write_text(
                "".join(f"{clock} {seconds} 0\n" for clock, seconds in clocks.items()))
        forks = {"pid", "time"} & (set(new) | {n.kind for n in joined})
        pid = os.fork() if forks else 0
        if pid:
            os.close(execed)                   # the grandchild's copy tells when it has executed
            with contextlib.suppress(OSError):  # as the target does: whichever runs first
                os.setpgid(pid, pid)
            _send(records, "pid", pid)
            status = os.waitpid(pid, 0)[1]
            _send(records, "exit", status)
            code = 0
        else:
            if forks:
                os.setpgid(0, 0)           # its own process group, for Child.kill()
                procfs.mark_forked()       # a PID namespace's first process dies with the leader
            else:
                _send(records, "pid", os.getpid())
            code = _target(target, args, new, hostname, env, records, execed)
    except BaseException as e:
        _send(records, "error", e, traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _target(target, args, new, hostname, env, records, execed):
    """Finish the set-up as the process that runs the target; return its exit code."""
    if "pid" in new and "mnt" in new:      # a /proc that shows this PID namespace
        libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    if hostname is not None:
        socket.sethostname(hostname)
    _send(records, "ready")
    if not callable(target):
        os.execvpe(target[0], [os.fspath(a) for a in target], env)
    os.close(execed)
    try:
        value = target(*args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    _send(records, "value", value)
    return 0


# --- named network namespaces -----------------------------------------------------------------

def _named(name):
    return names.prefixed(names.check(name, "network namespace name", upper=True, punct="_.-",
                                      most=48))


class NetNS(Namespace):
    """A named network namespace, ``/run/netns/cnlab-<name>`` as ``ip netns add`` makes it.

    Created now, deleted by ``remove()`` or at the end of a ``with`` block (its interfaces go
    with it). pyroute2 creates it in a forked child, so this process's namespace never changes.
    """

    def __init__(self, name: str) -> None:
        from pyroute2 import netns
        self.name = _named(name)
        if (NETNS_DIR / self.name).exists():
            raise LabError(f"network namespace {self.name} already exists",
                           fix="pick another name, or run helpers.cleanup() to remove leftovers")
        netns.create(self.name)
        try:
            super().__init__(NETNS_DIR / self.name)
        except OSError:
            _remove_netns(self.name)
            raise

    def links(self) -> dict[str, str]:
        """{interface name: "up" | "down"} inside this namespace."""
        def read():
            with _iproute(self) as ipr:
                return {link.get_attr("IFLA_IFNAME"): link.get("state") for link in ipr.get_links()}
        return off_the_loop(read)

    def remove(self) -> None:
        """Delete it; removing twice, or after a sweep, is fine."""
        self.close()
        _remove_netns(self.name)

    def __exit__(self, *exc: object) -> None:
        self.remove()


def connect(a: NetNS, b: NetNS, address_a: str, address_b: str, *,
            names: tuple[str, str] = ("veth0", "veth1")) -> None:
    """Join two NetNS with a veth pair: ``names[0]`` in ``a`` with ``address_a`` ("10.200.0.1/24"),
    ``names[1]`` in ``b``; addresses set, both ends and both loopbacks up. Nothing touches the host."""
    import ipaddress
    try:
        ends = [ipaddress.ip_interface(address_a), ipaddress.ip_interface(address_b)]
    except ValueError as e:
        raise BadInput(str(e), fix='use addresses with a prefix length, e.g. "10.200.0.1/24"') from e
    if any(len(n) > 15 or not n.isprintable() or "/" in n for n in names):
        raise BadInput(f"interface names {names} must be at most 15 characters")

    def configure():
        with _iproute(a) as ipr:
            ipr.link("add", ifname=names[0], kind="veth", peer={"ifname": names[1], "net_ns_fd": b.name})
        for space, name, address in ((a, names[0], ends[0]), (b, names[1], ends[1])):
            with _iproute(space) as ipr:
                index = ipr.link_lookup(ifname=name)[0]
                ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for space, name in ((a, names[0]), (b, names[1])):    # until the kernel says it is up
            with _iproute(space) as ipr:
                wait.until(lambda: ipr.get_links(ifname=name)[0].get_attr("IFLA_OPERSTATE") == "UP",
                           5, f"the veth end {name} in {space.name} to come up", interval=0.01)
    off_the_loop(configure)


def ping(space: NetNS, address: str, count: int = 3) -> Result:
    """Ping ``address`` from inside the network namespace ``space``; return the Result.

    Uses ping(8), or busybox's when iputils-ping is not installed.
    """
    tool = ["ping"] if shutil.which("ping") else ["busybox", "ping"] if shutil.which("busybox") else None
    if tool is None:
        raise MissingTool("ping", package="iputils-ping")
    return run([*tool, "-c", str(int(count)), "-W", "2", str(address)], join=[space], timeout=30)


def _iproute(space):
    """pyroute2's IPRoute, talking netlink to the kernel inside ``space`` (a NetNS)."""
    from pyroute2 import IPRoute
    return IPRoute(netns=space.name)


def off_the_loop(work):
    """Run ``work()`` in a fresh thread: pyroute2's synchronous API runs an asyncio loop of its
    own, which fails in a thread that already runs one, like a Jupyter kernel's main thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


def _remove_netns(name):
    from pyroute2 import netns
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


@owners.sweeper(owners.KERNEL)
def sweep(prefix: str = names.PREFIX) -> None:
    """Delete every cnlab network namespace (or those whose name starts with ``prefix``);
    their veths go with them."""
    if NETNS_DIR.is_dir():
        for path in NETNS_DIR.iterdir():
            if path.name.startswith(prefix):
                _remove_netns(path.name)
