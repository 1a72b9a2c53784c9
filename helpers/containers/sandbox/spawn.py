"""Starting a sandbox's process, and waiting for it (lab 24): fork a throw-away launcher, which
clones the process into new namespaces on a stack of its own. The clone borrows the launcher's
memory until it execs (CLONE_VM|CLONE_VFORK, like posix_spawn: nothing copied) and is our
child, not the launcher's (CLONE_PARENT), so we wait for it through a pidfd.
"""
import contextlib
import ctypes
import functools
import mmap
import os
import select
import signal
import time
from typing import Callable

from helpers._core import libc, procfs, wait as waiting
from helpers.errors import LabError

OUTPUT_LIMIT = 16 * 2**20          # bytes of output kept; the rest is read and dropped
_STACK = 4 << 20                   # bytes of C stack for the container's process, until exec


class StartError(LabError):
    """The container could not be set up; what was made for it has been removed."""


# --- the parent's side ------------------------------------------------------------------------

class Launch:
    """One process started in the container, seen from here. It is our child (CLONE_PARENT),
    so we wait for it directly, through a pidfd that becomes readable when it ends. Pipes:
    ``up`` (it tells us its pid), ``down`` (we tell it its ids are mapped, then that it is in
    its cgroup and may exec), ``err`` (what went wrong in its set-up; closed by its exec) and
    ``out`` (its stdout and stderr)."""

    def __init__(self, leader, up, down, err, out):
        self.leader, self.up, self.down, self.err, self.out = leader, up, down, err, out
        self.pid = self.pidfd = None
        self.started = None        # perf_counter at the exec
        self.status = None         # the wait status, once it ended
        self._output, self._size = [], 0

    def start(self, *, prepare=None, join=None, map_ids=None):
        """Learn its pid; ``map_ids(pid)`` if it has a user namespace; ``prepare()`` (make its
        cgroup) and ``join(pid)`` (put it in), while it sets up its namespaces, as runc does;
        let it exec when it is ready. If anything fails, remove it and raise."""
        try:
            data = _read(self.up, 4)
            if len(data) == 4:
                self.pid = int.from_bytes(data, "little")
                self.pidfd = os.pidfd_open(self.pid)
                if map_ids is not None:
                    map_ids(self.pid)
                    self._tell(b"m")
                if prepare is not None:
                    prepare()
                if join is not None:
                    join(self.pid)
                self._tell(b"g")
            message = b""
            while chunk := os.read(self.err, 4096):
                message += chunk
            self.started = time.perf_counter()
            if message or self.pid is None:
                raise StartError("the container could not start: "
                                 + (message.decode(errors="replace") or "its launcher died"))
        except BaseException:
            self.abandon()
            raise
        finally:
            for name in ("up", "down", "err"):
                if getattr(self, name) is not None:
                    os.close(getattr(self, name))
                    setattr(self, name, None)
        self._reap_leader(block=False)

    def _tell(self, word):
        with contextlib.suppress(BrokenPipeError):    # it failed: its message is on ``err``
            os.write(self.down, word)

    def wait(self, timeout=None):
        """Read its output until it ends, killing it after ``timeout`` seconds; return
        (wait status, output, timed out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        poller = select.poll()
        watching = {self.out, self.pidfd}
        for fd in watching:
            poller.register(fd, select.POLLIN)
        while watching:
            events = poller.poll(None if deadline is None else waiting.remaining(deadline) * 1000)
            if not events and deadline is not None and time.monotonic() >= deadline:
                self.kill()
                timed_out, deadline = True, None
            for fd, _ in events:
                data = b"" if fd == self.pidfd else os.read(fd, 65536)
                if not data:
                    poller.unregister(fd)
                    watching.discard(fd)
                elif self._size < OUTPUT_LIMIT:
                    self._output.append(data)
                self._size += len(data)
        self.status = os.waitpid(self.pid, 0)[1]
        self._close()
        output = b"".join(self._output).decode(errors="replace")
        if self._size > OUTPUT_LIMIT:
            output += f"\n[... {self._size - OUTPUT_LIMIT} more bytes of output dropped]\n"
        return self.status, output, timed_out

    def kill(self):
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    @property
    def alive(self):
        return self.out is not None

    def abandon(self):
        """Kill it and reap it (and its launcher), after a failure."""
        if self.pid is None and self.up is not None and self.down is not None:
            # interrupted before it told its pid: told nothing more, it reads end-of-file and
            # exits, which ends the pipe too; it is our child, to reap (a zombie, else)
            os.close(self.down)
            self.down = None
            data = _read(self.up, 4)
            if len(data) == 4:
                self.pid = int.from_bytes(data, "little")
        if self.pid is not None and self.out is not None:
            if self.pidfd is None:        # interrupted between learning its pid and this
                self.pidfd = os.pidfd_open(self.pid)
            self.kill()
            if self.leader is not None:   # killed before its exec, it held the interpreter's
                with contextlib.suppress(ProcessLookupError):   # lock in the launcher's memory:
                    os.kill(self.leader, signal.SIGKILL)        # the launcher would wait forever
            self.wait()
        self._close()

    def _reap_leader(self, block):
        if self.leader is not None:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.leader, 0 if block else os.WNOHANG)[0] == 0:
                    return
            self.leader = None

    def _close(self):
        for name in ("up", "down", "err", "out", "pidfd"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)
        self._reap_leader(block=True)


def _read(fd, size):
    data = b""
    while len(data) < size and (chunk := os.read(fd, size - len(data))):
        data += chunk
    return data


def decode(status: int) -> tuple[int, int | None]:
    """A wait status as a shell reports it (exit code, or 128 + signal), and the signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), None


# --- the launcher, then the container's process -----------------------------------------------

class Link:
    """The container's process's end of the pipes to the parent."""

    def __init__(self, up, down):
        self.up, self.down = up, down

    def wait_for(self, what):
        """Wait for the parent's word: b"m" (ids mapped), b"g" (in the cgroup: go)."""
        if os.read(self.down, 1) != what:
            raise LabError("the parent went away")


_child: list[Callable | None] = [None]     # what the callback below runs, in the launcher


@functools.cache
def _stack():
    """C stack for the container's process, and the C callback it starts in: made once, here,
    so that the launcher only calls clone."""
    stack = mmap.mmap(-1, _STACK)
    top = (ctypes.addressof(ctypes.c_char.from_buffer(stack)) + _STACK) & ~0xF
    return stack, top, libc.CLONE_CALLBACK(lambda _: _child[0]())


def _spawn(child, flags):
    """Run ``child()`` in a new process (in new namespaces, ``flags``) that shares this one's
    memory until it execs, like vfork(2) or posix_spawn: nothing is copied, and its exec frees
    nothing. CLONE_PARENT makes it a child of our parent. This process (a throw-away launcher)
    sleeps until the child has exec'd or exited."""
    _, top, callback = _stack()
    _child[0] = child
    libc.clone(callback, top, flags | libc.CLONE_VM | libc.CLONE_VFORK | libc.CLONE_PARENT
               | signal.SIGCHLD)


def launch(work: Callable[[Link], None], before: Callable[[], None] | None = None, flags: int = 0) -> Launch:
    """Fork a launcher that runs ``before()`` (setns, for an exec) and spawns the process that
    runs ``work(link)`` in new namespaces (``flags``) as *our* child."""
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    err_r, err_w = os.pipe()
    out_r, out_w = os.pipe()
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # the host's pids

    def child():                 # the container's process, in the launcher's memory
        try:
            os.write(up_w, int(os.readlink("self", dir_fd=proc)).to_bytes(4, "little"))
            os.dup2(out_w, 1), os.dup2(out_w, 2)
            work(Link(up_w, down_r))
        except BaseException as e:
            _report(err_w, e)
        libc.exit_now(127)
    _stack()
    leader = libc.fork()
    if leader == 0:
        code = 1
        try:
            # The parent's ends go, here and so in the clone (a copy of these fds): once the
            # parent dies, nothing holds ``down`` open, and the waiting container's process
            # reads end-of-file and exits rather than block forever, an orphan. Both are named
            # ``cnlab`` (the clone inherits it) until the exec, for helpers.leftovers().
            for fd in (up_r, down_w, err_r, out_r):
                os.close(fd)
            procfs.mark_forked()
            if before is not None:
                before()
            _spawn(child, flags)
            code = 0
        except BaseException as e:
            _report(err_w, e)
        finally:          # the pipes close now, not when this big copy of us is torn down
            for fd in (up_w, down_r, err_w, out_w):
                os.close(fd)
            os._exit(code)
    for fd in (up_w, down_r, err_w, out_w, proc):
        os.close(fd)
    return Launch(leader, up_r, down_w, err_r, out_r)


def _report(fd, error):
    with contextlib.suppress(OSError):
        text = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
        os.write(fd, text.encode(errors="replace"))
