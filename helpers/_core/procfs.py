"""Processes and mounts, read from /proc: the one place the course scans them.

The course marks every process it starts (``MARK`` in the environment of what it executes,
and the ``cnlab`` name on what it forks without exec), so a leak check finds them by that
mark, not by guessing from command lines: a fork of pytest is seen, a kind cluster's own
kube-controller-manager ``--cluster-name=cnlab-ci`` is not.
"""
import contextlib
import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from helpers._core import libc, wait
from helpers._core.names import PREFIX
from helpers.errors import LabTimeout

MARK = "CNLAB_OWNER"          # environment variable set in every program the course executes
COMM = PREFIX                 # /proc/<pid>/comm of every child the course forks without exec
_PR_SET_NAME = 15             # prctl(2): this thread's name, /proc/<pid>/comm
_PR_SET_PDEATHSIG = 1         # prctl(2): the signal this process gets when its parent dies


@dataclass(frozen=True)
class Process:
    pid: int
    argv: tuple[str, ...]

    @property
    def line(self) -> str:
        """The command line as ``ps`` shows it, the program by its base name."""
        if not self.argv:
            return ""
        return " ".join([os.path.basename(self.argv[0]), *self.argv[1:]])

    def __str__(self):
        return f"{self.pid} {' '.join(self.argv)}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:   # gone, or a kernel thread's file we may not read
        return None


def argv(pid: int) -> tuple[str, ...]:
    data = _read(f"/proc/{pid}/cmdline") or b""
    return tuple(a.decode(errors="replace") for a in data.rstrip(b"\0").split(b"\0") if data)


def processes(match: Callable[[Process], bool] = lambda p: True) -> Iterator[Process]:
    """Every process alive now (zombies excluded) for which ``match`` is true."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = Process(int(entry), argv(int(entry)))
            if p.argv and match(p) and alive(p.pid):
                yield p


def pids() -> list[int]:
    """Every pid in /proc now: kernel threads and zombies included."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def parent(pid: int) -> int | None:
    """The parent pid of ``pid`` (a zombie's too), or None once it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return None if stat is None else int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running: a zombie (dead, not yet reaped by its parent) does not count."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return stat is not None and stat.rsplit(b")", 1)[1].split()[0] != b"Z"
    except IndexError:
        return False


def marked(pid: int) -> bool:
    """Started by the course: its environment carries ``MARK``, or it is a forked child named ``cnlab``."""
    comm = _read(f"/proc/{pid}/comm")
    if comm is not None and comm.strip() == COMM.encode():
        return True
    env = _read(f"/proc/{pid}/environ") or b""
    return any(item.startswith(MARK.encode() + b"=") for item in env.split(b"\0"))


def mark_forked() -> None:
    """Name this forked process ``COMM`` (its /proc/<pid>/comm), which ``marked`` knows: a fork
    keeps the parent's environment as the kernel shows it, so it cannot carry ``MARK``. And tie
    its life to the parent's: a fork of a multithreaded parent can block forever on a lock that
    another thread held at the fork, and must not outlive a killed kernel that way."""
    name = ctypes.create_string_buffer(COMM.encode())
    libc.prctl(_PR_SET_NAME, ctypes.addressof(name))
    parent = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:          # the parent died before the line above: nobody waits
        os._exit(1)


def marked_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with the course's mark, for a program it executes."""
    return {**(os.environ if env is None else env), MARK: str(os.getpid())}


def ours() -> list[Process]:
    """The course's processes still alive, apart from this one and its ancestors; and this
    one's forked children that ended unreaped (an interrupt came before their wait): zombies,
    which ``kill`` reaps."""
    skip: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid > 1 and pid not in skip:     # self, parent, ...: a run never counts itself
        skip.add(pid)
        pid = parent(pid)
    zombies = [Process(p, (f"[{COMM}] <defunct>",)) for p in pids()
               if parent(p) == os.getpid() and not alive(p) and marked(p)]
    return [p for p in processes(lambda p: p.pid not in skip) if marked(p.pid)] + zombies


def kill(pids, *, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s, to every pid; return when all are gone."""
    pids = [p for p in pids if p]

    def gone():
        nonlocal pids
        for pid in pids:                # our own children: reap them (first: a zombie is not
            with contextlib.suppress(ChildProcessError, OSError):     # alive, but still there)
                os.waitpid(pid, os.WNOHANG)
        pids = [p for p in pids if alive(p)]
        return not pids
    for sig, patience in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(LabTimeout):
            wait.until(gone, patience, "processes to exit", interval=0.02)
            return


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str
    options: str               # the mount's own (rw, nosuid, ...)
    super_options: str = ""    # the filesystem's (a cgroup v1 hierarchy's controllers)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mounts(pid: int | str = "self", *, table: str | Path | None = None) -> list[Mount]:
    """The mount table of ``pid``'s mount namespace, from its mountinfo, in kernel order; or
    that of the mountinfo file ``table`` (a test's made-up machine)."""
    found = []
    for line in (_read(str(table or f"/proc/{pid}/mountinfo")) or b"").decode().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        found.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]) if len(tail) > 1 else "",
                           fields[5], tail[2] if len(tail) > 2 else ""))
    return found


def mount_points(match: Callable[[str], bool], pid: int | str = "self") -> list[str]:
    """Mount points for which ``match`` is true, deepest first (the order to unmount them in)."""
    return sorted({m.point for m in mounts(pid) if match(m.point)}, key=len, reverse=True)


def unmount(points) -> None:
    """Detach each mount point (lazily: a busy one goes when its last user does)."""
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)


def read_text(path) -> str | None:
    data = _read(str(Path(path)))
    return None if data is None else data.decode(errors="replace")
