"""Running a server process the one way the course does: every daemon it starts (etcd, the API
server, containerd, a private dockerd, QEMU, virtiofsd) goes through ``Daemon``.

- its own session, so a Ctrl-C in the notebook reaches the cell, not the server;
- ``setpriv --pdeathsig KILL`` in front, so the kernel kills it when the process that started it
  dies (a restarted Jupyter kernel, a ``kill -9``ed pytest): nothing waits for a sweep;
- the course's mark in its environment, so ``helpers.leftovers()`` recognises it and its children;
- a log file, whose tail goes into every error;
- ``stop()``: SIGTERM, then SIGKILL; and a start that fails or is interrupted kills it again.

Strictly, the death signal follows the *thread* that started it; the labs start daemons from
the main thread.
"""
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from helpers._core import procfs, wait
from helpers.errors import LabError, MissingTool


def guard() -> list[str]:
    """The prefix that ties a child's life to its parent's (util-linux: on every Debian and Ubuntu)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise MissingTool("setpriv", package="util-linux")
    return [setpriv, "--pdeathsig", "KILL"]


class Daemon:
    """One server process: ``start(ready)`` returns once ``ready()`` is true."""

    def __init__(self, argv: Sequence[str], *, log: Path, what: str, env: dict | None = None,
                 cwd=None, error: type[LabError] = LabError, stdin=subprocess.DEVNULL):
        self.argv, self.log, self.what, self.error = [str(a) for a in argv], Path(log), what, error
        self.env, self.cwd, self.stdin = env, cwd, stdin
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, ready: Callable[[], object] = lambda: True, *, timeout: float = 30.0,
              fix: str | None = None, **popen):
        """Start, then wait until ``ready()`` is true. If the daemon exits first, ``error`` with
        its status and log tail; ``LabTimeout`` after ``timeout``. Killed again on any failure."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            process = self.process = subprocess.Popen(
                [*guard(), *self.argv], stdin=self.stdin, stdout=log, stderr=log, cwd=self.cwd,
                env=procfs.marked_env(self.env), start_new_session=True, **popen)
        try:
            def up():
                if process.poll() is not None:
                    raise self.error(f"{self.what} exited with status {process.returncode}:\n"
                                     f"{self.log_tail()}", fix=fix)
                return ready()
            wait.until(up, timeout, f"{self.what} to become ready", interval=0.1,
                       detail=self.log_tail, fix=fix or "read the log above")
        except BaseException:
            self.kill()
            raise
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0):
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; reaped."""
        if self.process is not None and self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self

    def kill(self):
        """SIGKILL: a crash, as far as the daemon can tell."""
        if self.process is not None:
            if self.running:
                self.process.kill()
            self.process.wait()
        return self


def strays(match: Callable[[procfs.Process], bool], *, timeout: float = 5.0) -> list[procfs.Process]:
    """Kill every process ``match`` picks out (what a crashed run left); return them."""
    found = list(procfs.processes(match))
    procfs.kill([p.pid for p in found], timeout=timeout)
    return found
