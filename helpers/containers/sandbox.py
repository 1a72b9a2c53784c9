"""A container from scratch: namespaces + a cgroup + an overlay root + pivot_root, then exec.

What ``docker run --rm --memory 64M --cpus 0.5 --pids-limit 32 --hostname box busybox sh -c
'...'`` does, in one small module::

    sandbox.run(["sh", "-c", "hostname; ps"], memory="64M", cpus=0.5, pids=32, hostname="box")
    with sandbox.Sandbox(memory="64M") as box:       # a long-lived one: PID 1 sleeps
        box.exec("ps")                               # like docker exec

How it happens, in order:

1. here: check the input; bad input raises BadInput before anything exists;
2. fork a throw-away *launcher*, which clones the container's process into new mount, UTS,
   IPC, PID and network namespaces (and a user namespace, optionally). The clone borrows the
   launcher's memory until it execs (CLONE_VM|CLONE_VFORK, like posix_spawn: nothing copied),
   and is our child, not the launcher's (CLONE_PARENT);
3. meanwhile, here: make its cgroup and put the process in it (runc does the same);
4. the container's process takes the steps of ``plan()``: make every mount private, mount the
   overlay (its upper layer on a tmpfs), a fresh /proc, a read-only /sys, mask and
   write-protect the dangerous parts of them, set the hostname, bring up loopback,
   ``pivot_root`` into the overlay and detach the old root; then it drops capabilities, sets
   no_new_privs, enters a cgroup namespace and execs the command;
5. here: wait for it (a pidfd) while reading its output; the cgroup's counters say whether it
   was OOM-killed, hit its pids limit or was throttled; remove everything.

Nothing is mounted on the host: all mounts live in the container's mount namespace and go
with it. Bad input raises BadInput (CommandNotFound for a command that is not in the rootfs)
before anything is created; a start that fails raises StartError and leaves nothing behind.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import mmap
import os
import re
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from helpers._core import libc, owners
from helpers.containers import cgroups, ns
from helpers._core import names
from helpers.containers import rootfs
from helpers.errors import BadInput, LabError

# Every capability, by number (linux/capability.h).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")
# What Docker (moby's oci/caps/defaults.go) leaves a container: the rest are dropped from the
# bounding set, so no program the container execs can ever have them.
DEFAULT_CAPS = frozenset({"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW",
                          "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE",
                          "SYS_CHROOT", "KILL", "AUDIT_WRITE"})
# runc's defaults (a subset): hidden (a file gets /dev/null bound over it, a directory an empty
# read-only tmpfs) and read-only. Paths this kernel lacks (no /proc/kcore here) are skipped.
MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware")
READONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
# The device nodes a container may open (runc's default allow list, v1 devices cgroup syntax).
# Creating any node is allowed (CAP_MKNOD is a default capability): opening it is not.
DEVICES = ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
           "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm")
PATH = ":".join(rootfs.PATH)       # the container's $PATH
OUTPUT_LIMIT = 16 * 2**20          # bytes of output kept; the rest is read and dropped
INIT = ("sleep", "infinity")       # PID 1 of a Sandbox made without a command
ROOT_OUTSIDE = ns.DEFAULT_ID_MAP[0][1]   # with userns=True: root inside is this uid outside
_SCRATCH = rootfs.STATE / "scratch"      # an empty folder each container mounts a tmpfs on

_NAMESPACES = ns.flags(["mnt", "uts", "ipc", "pid"])
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK = 0x8914, 0x1, 0x8
_PROC_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC


class CommandNotFound(BadInput):
    """The command is not an executable file inside the container's root filesystem."""


class StartError(LabError):
    """The container could not be set up; what was made for it has been removed."""


def setcap(path, caps):
    """Give a file capabilities, like ``setcap cap_dac_override+ep path``: whoever execs it gets
    them (within the bounding set), unless no_new_privs is set."""
    bits = sum(1 << CAPABILITIES.index(name) for name in _caps(caps))
    data = struct.pack("<5I", 0x02000000 | 0x1,          # VFS_CAP_REVISION_2, effective
                       bits & 0xFFFFFFFF, 0, bits >> 32, 0)
    os.setxattr(path, "security.capability", data)


# --- checking the input -----------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """Everything about one container, checked; made by ``Spec.parse``."""
    argv: tuple                  # the command, argv[0] as given
    path: str                    # where argv[0] is inside the rootfs, for execve
    lowers: tuple                # the rootfs: layer folders, bottom first
    limits: cgroups.Limits
    hostname: str
    env: tuple                   # "KEY=value" strings
    workdir: str
    user: tuple | None           # (uid, gid) inside, or None for root
    userns: bool
    network: str                 # "none": a network namespace with only loopback; "host"
    drop: tuple                  # capability numbers to drop from the bounding set
    no_new_privs: bool
    mask_paths: bool
    readonly_paths: bool
    devices: bool

    @functools.cached_property
    def exec_args(self):
        """execve's arguments as C arrays, made before the fork."""
        def strings(items):
            return (ctypes.c_char_p * (len(items) + 1))(*[os.fsencode(i) for i in items], None)
        return os.fsencode(self.path), strings(self.argv), strings(self.env)

    @classmethod
    def parse(cls, command, *, memory=None, cpus=None, pids=None, hostname="sandbox", rootfs_=None,
              userns=False, network="none", user=None, env=None, workdir="/", drop_caps=True,
              cap_add=(), no_new_privs=True, mask_paths=True, readonly_paths=True, devices=True,
              privileged=False):
        limits = cgroups.Limits.parse(memory=memory, cpus=cpus, pids=pids)
        argv = _argv(command)
        if not isinstance(hostname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", hostname):
            raise BadInput(f"hostname={hostname!r} is not a host name",
                           fix="use letters, digits, '-' and '.' (at most 63 characters)")
        if network not in ("none", "host"):
            raise BadInput(f"network={network!r} is not a network mode",
                           fix='use "none" (its own network namespace, loopback only) or "host"')
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise BadInput(f"workdir={workdir!r} is not an absolute path", fix='use e.g. "/" or "/tmp"')
        added, environment, ids = _caps(cap_add), _env(env, hostname, user), _user(user)
        privileged = bool(privileged)
        keep = set(CAPABILITIES) if privileged or not drop_caps else set(DEFAULT_CAPS) | added
        if devices and not privileged and _layout().where("devices") is None:
            keep.discard("MKNOD")      # no devices cgroup to stop a node's use: forbid making one
        lowers = _rootfs(rootfs_)
        path = rootfs.lookup(lowers, argv[0])
        if path is None:
            raise CommandNotFound(f"{argv[0]!r} is not an executable file in the container's root "
                                  f"filesystem ({', '.join(map(str, lowers))})",
                                  fix="use a busybox applet (ls /bin of the rootfs), or a full path")
        return cls(argv=argv, path=path, lowers=tuple(lowers), limits=limits, hostname=hostname,
                   env=environment, workdir=workdir, user=ids, userns=bool(userns), network=network,
                   drop=tuple(i for i, name in enumerate(CAPABILITIES[:_last_cap() + 1]) if name not in keep),
                   no_new_privs=bool(no_new_privs) and not privileged,
                   mask_paths=bool(mask_paths) and not privileged,
                   readonly_paths=bool(readonly_paths) and not privileged,
                   devices=bool(devices) and not privileged)


def _rootfs(value):
    if value is None:
        return [rootfs.busybox_rootfs()]
    lowers = rootfs._lowers(value) if isinstance(value, (str, os.PathLike, list, tuple)) else None
    if not lowers or not rootfs.is_rootfs(lowers):
        raise BadInput(f"rootfs={value!r} is not a root filesystem (it needs /bin/sh, /proc, /dev "
                       f"and /tmp)", fix="use rootfs.busybox_rootfs(), or rootfs.layer_dirs(layers)")
    return lowers


def _argv(command):
    if isinstance(command, str):
        if not command.strip():
            raise BadInput("the command is empty", fix='pass e.g. "echo hi" or ["echo", "hi"]')
        return ("/bin/sh", "-c", command)
    if isinstance(command, (list, tuple)) and command \
            and all(isinstance(a, (str, os.PathLike)) for a in command):
        argv = tuple(os.fspath(a) for a in command)
        if all("\0" not in a for a in argv) and argv[0]:
            return argv
    raise BadInput(f"cannot run {command!r}",
                   fix='pass a shell command as a string, or a list such as ["ls", "-l", "/"]')


def _caps(names):
    names = [names] if isinstance(names, str) else list(names)
    wanted = {str(n).upper().removeprefix("CAP_") for n in names}
    if "ALL" in wanted:
        return set(CAPABILITIES)
    unknown = sorted(wanted - set(CAPABILITIES))
    if unknown:
        raise BadInput(f"unknown capabilities {', '.join(unknown)}",
                       fix="use names from sandbox.CAPABILITIES, e.g. NET_ADMIN or SYS_ADMIN")
    return wanted


def _user(user):
    if user is None:
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", str(user))
    if not match or int(match[1]) >= 2**32 - 1 or int(match[2] or 0) >= 2**32 - 1:
        raise BadInput(f"user={user!r} is not a user id", fix='use a number, or "uid:gid", e.g. "65534:65534"')
    uid = int(match[1])
    return uid, int(match[2]) if match[2] else uid


def _env(env, hostname, user):
    values = {"PATH": PATH, "HOSTNAME": hostname,
              "HOME": "/root" if _user(user) in (None, (0, 0)) else "/"}
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) \
                or not isinstance(value, str) or "\0" in value:
            raise BadInput(f"env {key!r}={value!r} is not an environment variable",
                           fix='use names like "GREETING" and string values')
        values[key] = value
    return tuple(f"{k}={v}" for k, v in values.items())


@functools.cache
def _last_cap():
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except OSError:
        return len(CAPABILITIES) - 1


@functools.cache
def _layout():
    return cgroups.detect()


def _group_layout(limits):
    """Only the hierarchies this container needs (v1 has one directory per controller): memory
    always (its peak, OOM kills), cpuacct for CPU time, cpu and pids when limited."""
    full = _layout()
    wanted = {"memory", "cpuacct"} | set(limits.controllers())
    v1 = {c: p for c, p in full.v1.items() if c in wanted and c not in full.v2_controllers}
    keep_v2 = full.v2 is not None and bool(wanted & set(full.v2_controllers))
    return cgroups.Layout(v1=v1, v2=full.v2 if keep_v2 else None,
                          v2_controllers=full.v2_controllers if keep_v2 else ())


# --- the result -------------------------------------------------------------------------------

@dataclass
class Result:
    """How a container (or one ``exec`` in it) ended, and what its cgroup saw."""
    command: tuple
    status: int                  # as a shell reports it: exit code, or 128 + signal
    signal: int | None           # the signal that ended it (9 for an OOM kill or a timeout)
    output: str                  # stdout and stderr, interleaved as written
    oom_killed: bool             # the OOM killer killed a process in it
    pids_limited: bool           # a fork was refused because of the pids limit
    throttled: bool              # it ran out of CPU quota in at least one period
    timed_out: bool              # killed because ``timeout`` seconds passed
    seconds: float               # from the call to the result: start, run and clean-up
    startup: float               # from the call until the command was exec'd
    memory_peak: int | None      # bytes: the most its cgroup ever used
    cpu_seconds: float | None    # CPU time used
    pid: int = field(repr=False, default=0)   # the host's pid of the process

    @property
    def ok(self):
        return self.status == 0

    def summary(self):
        """One line: the exit status and what the limits did."""
        events = [what for what, happened in (("OOM-killed", self.oom_killed),
                                              ("hit its pids limit", self.pids_limited),
                                              ("throttled", self.throttled),
                                              ("timed out", self.timed_out)) if happened]
        return f"exit status {self.status}" + (f" ({', '.join(events)})" if events else "")


# --- a process in the container: the parent's side --------------------------------------------

class _Launch:
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
            left = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(left)
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
        if self.pid is not None and self.out is not None:
            self.kill()
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


def _decode(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), None


# --- inside: the launcher, then the container's process (never returns) -----------------------

_CLONE_VM, _CLONE_VFORK, _CLONE_PARENT = 0x100, 0x4000, 0x8000
_STACK = 4 << 20                     # bytes of C stack for the container's process, until exec
_C = ctypes.CDLL(None, use_errno=True)                # these calls let go of the GIL ...
_C.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_C.execve.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
_C._exit.argtypes = [ctypes.c_int]
_GIL_KEPT = ctypes.PyDLL(None, use_errno=True)      # ... this one keeps it
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def _fork():
    """os.fork(), without CPython's after-fork work in the child (half a millisecond) when this
    process runs one Python thread: then nothing else can hold the interpreter's locks, and a
    launcher that only clones and exits needs none of that work."""
    if threading.active_count() > 1:
        return os.fork()
    pid = _GIL_KEPT.fork()
    if pid == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid


_child = [None]                      # what the callback below runs, in the launcher


@functools.cache
def _stack():
    """C stack for the container's process, and the C callback it starts in: made once, here,
    so that the launcher only calls clone."""
    stack = mmap.mmap(-1, _STACK)
    top = (ctypes.addressof(ctypes.c_char.from_buffer(stack)) + _STACK) & ~0xF
    return stack, top, _CALLBACK(lambda _: _child[0]())


def _spawn(child, flags):
    """Run ``child()`` in a new process (in new namespaces, ``flags``) that shares this one's
    memory until it execs, like vfork(2) or posix_spawn: nothing is copied, and its exec frees
    nothing. CLONE_PARENT makes it a child of our parent. This process (a throw-away launcher)
    sleeps until the child has exec'd or exited."""
    _, top, callback = _stack()
    _child[0] = child
    pid = _C.clone(callback, top, flags | _CLONE_VM | _CLONE_VFORK | _CLONE_PARENT | signal.SIGCHLD,
                   None)
    if pid == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}", hex(flags))


class _Link:
    """The container's process's end of the pipes to the parent."""

    def __init__(self, up, down):
        self.up, self.down = up, down

    def wait_for(self, what):
        """Wait for the parent's word: b"m" (ids mapped), b"g" (in the cgroup: go)."""
        if os.read(self.down, 1) != what:
            raise LabError("the parent went away")


def _launch(work, before=None, flags=0):
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
            work(_Link(up_w, down_r))
        except BaseException as e:
            _report(err_w, e)
        _C._exit(127)            # never os._exit here: the GIL must be let go of first
    _stack()
    leader = _fork()
    if leader == 0:
        code = 1
        try:
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
    return _Launch(leader, up_r, down_w, err_r, out_r)


def _report(fd, error):
    with contextlib.suppress(OSError):
        text = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
        os.write(fd, text.encode(errors="replace"))


# --- the steps a container's process takes, worked out here, executed there -----------------

_C.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_C.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_C.mkdir.argtypes = [ctypes.c_char_p, ctypes.c_uint]
_C.chdir.argtypes = [ctypes.c_char_p]
_C.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_C.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Step:
    """One system call of a container's set-up, as the shell command that does the same. Its
    arguments are made here, so that the container's process, between clone and exec, only
    makes the call (and a failure names the step)."""
    text: str
    call: object = field(repr=False)
    args: tuple = field(repr=False)

    def __call__(self):
        if self.call(*self.args) == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"{self.text}: {os.strerror(err)}")

    def __str__(self):
        return self.text


def _b(value):
    return None if value is None else os.fsencode(value)


def _mount(text, source, target, fstype=None, flags=0, data=None):
    return Step(text, _C.mount, (_b(source), _b(target), _b(fstype), flags, _b(data)))


def _mkdir(path):
    return Step(f"mkdir {path}", _C.mkdir, (_b(path), 0o755))


def _loopback_up():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:     # any socket takes the ioctl
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK))


@dataclass(frozen=True)
class Plan:
    """What a container's process does between clone and exec, step by step, in groups: the
    root filesystem (in its new mount namespace), the kernel's filesystems, the masks and
    read-only paths, the hostname, the network, and pivot_root."""
    rootfs: tuple
    kernel_fs: tuple
    masks: tuple
    readonly: tuple
    hostname: tuple
    network: tuple
    pivot_root: tuple

    @property
    def setup(self):
        """Everything after the root filesystem."""
        return (self.kernel_fs + self.masks + self.readonly + self.hostname + self.network
                + self.pivot_root)

    def __iter__(self):
        return iter(self.rootfs + self.setup)

    def __str__(self):
        return "\n".join(step.text for step in self)


def _plan(spec, options, merged, scratch=None):
    """The steps for ``spec``: the overlay (``options``) at ``merged`` (on a tmpfs mounted at
    ``scratch``, if given), /proc, /sys, the masks and read-only paths, the hostname, loopback,
    pivot_root. Which masked paths exist is this kernel's: the host's /proc and /sys say."""
    m = str(merged)
    rootfs = [_mount("mount --make-rprivate /", None, "/", None, libc.MS_REC | libc.MS_PRIVATE)]
    if scratch is not None:
        rootfs.append(_mount(f"mount -t tmpfs tmpfs {scratch}", "tmpfs", scratch, "tmpfs", 0, "mode=0755"))
        rootfs += [_mkdir(f"{scratch}/{name}") for name in ("upper", "work", "root")]
    rootfs.append(_mount(f"mount -t overlay overlay -o {options} {m}", "overlay", m, "overlay", 0, options))
    kernel_fs = []
    if spec.userns:    # the overlay came with the copy of the launcher's mounts, locked to its
        # place: pivot_root wants a mount made in here, so bind it onto itself
        kernel_fs.append(_mount(f"mount --rbind {m} {m}", m, m, None, libc.MS_BIND | libc.MS_REC))
    kernel_fs.append(_mount(f"mount -t proc -o nosuid,nodev,noexec proc {m}/proc", "proc",
                            f"{m}/proc", "proc", _PROC_FLAGS))
    if spec.userns and spec.network == "host":     # not its network: it may not mount sysfs
        kernel_fs.append(_mount(f"mount --rbind /sys {m}/sys", "/sys", f"{m}/sys", None,
                                libc.MS_BIND | libc.MS_REC))
    else:
        kernel_fs.append(_mount(f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {m}/sys", "sysfs",
                                f"{m}/sys", "sysfs", _PROC_FLAGS | libc.MS_RDONLY))
    masks, readonly = [], []
    for path in MASKED if spec.mask_paths else ():
        if os.path.isdir(path):
            masks.append(_mount(f"mount -t tmpfs -o ro,size=0 tmpfs {m}{path}", "tmpfs", m + path,
                                "tmpfs", _PROC_FLAGS | libc.MS_RDONLY, "size=0"))
        elif os.path.lexists(path):
            masks.append(_mount(f"mount --bind /dev/null {m}{path}", "/dev/null", m + path, None,
                                libc.MS_BIND))
    for path in READONLY if spec.readonly_paths else ():
        if os.path.lexists(path):
            readonly += [_mount(f"mount --rbind {m}{path} {m}{path}", m + path, m + path, None,
                                libc.MS_BIND | libc.MS_REC),
                         _mount(f"mount -o remount,bind,ro {m}{path}", None, m + path, None,
                                libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | _PROC_FLAGS)]
    name = spec.hostname.encode()
    hostname = [Step(f"hostname {spec.hostname}", _C.sethostname, (name, len(name)))]
    network = [Step("ip link set lo up", lambda: _loopback_up() or 0, ())] if spec.network == "none" else []
    pivot_root = [Step(f"cd {m}", _C.chdir, (_b(m),)),
                  # the new root on top of the old one, then the old one detached: out of reach
                  Step("pivot_root . .", _C.syscall, (libc.SYS_PIVOT_ROOT, b".", b".")),
                  Step("umount -l .", _C.umount2, (b".", libc.MNT_DETACH)),
                  Step(f"cd {spec.workdir}", _C.chdir, (_b(spec.workdir),))]
    return Plan(*map(tuple, (rootfs, kernel_fs, masks, readonly, hostname, network, pivot_root)))


def _scratch(lowers):
    """Overlay options and mount point for an upper layer on a tmpfs in the container's own mount
    namespace, mounted on an empty folder that only that namespace ever sees filled."""
    _SCRATCH.mkdir(parents=True, exist_ok=True)
    return (_rootfs_module.overlay_options(lowers, _SCRATCH / "upper", _SCRATCH / "work"),
            _SCRATCH / "root", _SCRATCH)


def plan(command=INIT, **options):
    """The steps a container started with these options (Sandbox's) would take, to read or to
    take one group at a time in a child of your own: ``for step in plan().rootfs: step()``."""
    spec = Spec.parse(command, **{("rootfs_" if k == "rootfs" else k): v for k, v in options.items()})
    return _plan(spec, *_scratch(spec.lowers))


def _container(spec, steps):
    """What PID 1 of a new container does: the steps (with a user namespace, the launcher,
    root on the host, has made the root filesystem), then ``_enter``: the security settings,
    the cgroup, exec."""
    def work(link):
        if spec.userns:    # wait until the parent has written the id maps, then be root
            link.wait_for(b"m")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        else:
            for step in steps.rootfs:
                step()
        for step in steps.setup:
            step()
        _enter(spec, link)
    return work


def _enter(spec, link):
    """The last steps before exec, for PID 1 and for each exec: capabilities, no_new_privs, the
    cgroup (the parent puts us in) and a cgroup namespace, the user."""
    for cap in spec.drop:
        libc.prctl(_PR_CAPBSET_DROP, cap)
    if spec.no_new_privs:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
    link.wait_for(b"g")                     # the parent has put us in the cgroup
    libc.unshare(libc.CLONE_NEWCGROUP)    # its cgroup looks like / from inside
    if spec.user is not None:
        uid, gid = spec.user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _C.execve(*spec.exec_args)             # returns only if it failed
    err = ctypes.get_errno()
    raise OSError(err, f"exec {spec.path}: {os.strerror(err)}", spec.path)


def _joiner(fds, userns):
    """What the launcher of an ``exec`` does first: join the container's namespaces, user
    first, mount last (which also makes the container's root our root)."""
    def before():
        for fd, flag in fds:
            libc.setns(fd, flag)
        if userns:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    return before


# --- the container ----------------------------------------------------------------------------

class Sandbox:
    """A container, started now; removed (processes, cgroup, upper layer) by ``close()`` or at
    the end of a ``with`` block.

    ``command`` runs as PID 1 (default: ``sleep infinity``, to ``exec`` commands in it).
    Limits: ``memory`` ("64M"), ``cpus`` (0.5), ``pids`` (32). ``rootfs``: a folder or a list
    of layer folders (default: the busybox rootfs), never written to: an overlay's upper layer
    takes the writes, a tmpfs in the container's own mount namespace (gone with it), or with
    ``host_upper=True`` a folder on the host (``upper``) to look at from outside.
    ``userns=True``: root inside is uid 100000 outside. ``network="host"``: share the host's
    network namespace. ``user`` ("uid[:gid]") runs the command as that user.

    The security defaults, each of which can be turned off to see what it protects:
    ``drop_caps`` (the bounding set keeps only DEFAULT_CAPS, plus ``cap_add``),
    ``no_new_privs``, ``mask_paths`` (MASKED), ``readonly_paths`` (READONLY), ``devices`` (the
    devices cgroup lets it open only the usual nodes); ``privileged=True`` turns all off.
    """

    def __init__(self, command=None, *, memory=None, cpus=None, pids=None, hostname="sandbox",
                 rootfs=None, userns=False, network="none", user=None, env=None, workdir="/",
                 host_upper=False, drop_caps=True, cap_add=(), no_new_privs=True, mask_paths=True,
                 readonly_paths=True, devices=True, privileged=False):
        self._t0 = time.perf_counter()
        self.spec = Spec.parse(INIT if command is None else command, memory=memory, cpus=cpus,
                               pids=pids, hostname=hostname, rootfs_=rootfs, userns=userns,
                               network=network, user=user, env=env, workdir=workdir,
                               drop_caps=drop_caps, cap_add=cap_add, no_new_privs=no_new_privs,
                               mask_paths=mask_paths, readonly_paths=readonly_paths,
                               devices=devices, privileged=privileged)
        self.id = uuid.uuid4().hex[:12]
        self.name = names.name("sandbox", self.id)
        self.overlay = self.cgroup = self._devices = self._launch = self._result = None
        self.pid = self.steps = None
        try:
            if host_upper:
                self.overlay = _rootfs_module.Overlay(self.spec.lowers,
                                                      owner=ROOT_OUTSIDE if userns else None)
            self._launch = self._start()
            self.pid = self._launch.pid
        except BaseException:
            self._teardown()
            raise

    def _start(self):
        if self.overlay is not None:
            self.steps = _plan(self.spec, self.overlay.options, self.overlay.merged)
        else:     # a tmpfs on a scratch folder, in the container's mount namespace only
            self.steps = _plan(self.spec, *_scratch(self.spec.lowers))
        self.spec.exec_args          # noqa: B018 -- built here, not in the child
        flags = _NAMESPACES | (libc.CLONE_NEWNET if self.spec.network == "none" else 0)

        def mount_rootfs():      # with a user namespace, the launcher, root on the host, mounts
            libc.unshare(libc.CLONE_NEWNS)     # the overlay in a mount namespace of its own,
            for step in self.steps.rootfs:       # which the container's is a copy of
                step()
        if self.spec.userns:
            flags |= libc.CLONE_NEWUSER
        launch = _launch(_container(self.spec, self.steps), flags=flags,
                         before=mount_rootfs if self.spec.userns else None)
        self._launch = launch              # for _teardown, should the start fail
        launch.start(prepare=self._make_cgroup, join=self._join, map_ids=(
            (lambda pid: ns.write_id_maps(pid, ns.DEFAULT_ID_MAP, ns.DEFAULT_ID_MAP))
            if self.spec.userns else None))
        return launch

    def _make_cgroup(self):
        """The cgroup, made while the container's process sets up its namespaces."""
        lim = self.spec.limits
        self.cgroup = cgroups.Cgroup(self.name, memory=lim.memory, cpus=lim.cpus, pids=lim.pids,
                                     layout=_group_layout(lim))
        if self.spec.devices and _layout().where("devices") == "v1":
            self._devices = _devices_group(_layout().v1["devices"] / self.name)

    def _join(self, pid):
        self.cgroup.add(pid)
        if self._devices is not None:
            _put(self._devices / "cgroup.procs", pid)

    @property
    def upper(self):
        """The container's writable layer, on the host: every file it changed, every whiteout."""
        if self.overlay is None:
            raise LabError("this sandbox's upper layer is a tmpfs inside its own mount namespace",
                           fix="start it with host_upper=True to see the upper layer from the host")
        return self.overlay.upper

    @property
    def running(self):
        return self._result is None and self._launch is not None and self._launch.alive

    def stats(self):
        """The cgroup's counters now (see helpers.cgroups.Stats)."""
        return self.cgroup.stats()

    def exec(self, command, *, timeout=None, user=None, env=None, workdir=None):
        """Run another command in the container (like ``docker exec``): same namespaces,
        cgroup, root and security settings; return its Result."""
        t0 = time.perf_counter()
        if not self.running:
            raise LabError("the sandbox is not running", fix="start a new one")
        argv = _argv(command)
        path = _rootfs_module.lookup(f"/proc/{self.pid}/root", argv[0])   # the container's view
        if path is None:
            raise CommandNotFound(f"{argv[0]!r} is not an executable file in the container",
                                  fix="use a busybox applet, or a full path")
        spec = dataclasses.replace(self.spec, argv=argv, path=path,
                        env=_env(env, self.spec.hostname, user) if env or user else self.spec.env,
                        user=_user(user) if user is not None else self.spec.user,
                        workdir=workdir or self.spec.workdir)
        spec.exec_args               # noqa: B018 -- built here, not in the child
        kinds = (["user"] if spec.userns else []) + ["ipc", "uts", "net", "pid", "mnt"]
        fds = [(os.open(f"/proc/{self.pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC), ns.NAMESPACES[k])
               for k in kinds]
        before = self.cgroup.stats()

        def work(link):
            os.chdir(spec.workdir)
            _enter(spec, link)
        try:
            launch = _launch(work, before=_joiner(fds, spec.userns))
        finally:
            for fd, _ in fds:
                os.close(fd)
        launch.start(join=self._join)
        status, output, timed_out = launch.wait(timeout)
        return _result(spec.argv, status, output, timed_out, launch, t0, self.cgroup.stats(), before)

    def wait(self, timeout=None):
        """Wait for PID 1 to end (kill it after ``timeout`` seconds), remove everything, and
        return its Result."""
        if self._result is None:
            try:
                status, output, timed_out = self._launch.wait(timeout)
                stats = self.cgroup.stats()
            finally:
                self._teardown()
            self._result = _result(self.spec.argv, status, output, timed_out, self._launch,
                                   self._t0, stats)
        return self._result

    def close(self):
        """Kill every process in the container and remove it: idempotent."""
        if self._result is None and self._launch is not None and self._launch.alive:
            self._launch.kill()
            self.wait()
        self._teardown()

    def _teardown(self):
        if self._launch is not None and self._launch.alive:
            self._launch.abandon()
        if self.cgroup is not None:
            _remove_group(self.cgroup)
            self.cgroup = None
        if self._devices is not None:
            cgroups.remove_dirs([self._devices])
            self._devices = None
        if self.overlay is not None:
            self.overlay.remove()
            self.overlay = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<Sandbox {' '.join(self.spec.argv)!r} {state}>"


_rootfs_module = rootfs


def _result(argv, status, output, timed_out, launch, t0, stats, before=None):
    def grew(name):
        now, then = getattr(stats, name), getattr(before, name) if before else 0
        return bool(now and now > (then or 0))
    code, sig = _decode(status)
    return Result(command=argv, status=code, signal=sig, output=output,
                  oom_killed=grew("oom_kills"), pids_limited=grew("pids_refused"),
                  throttled=grew("cpu_throttled"), timed_out=timed_out,
                  seconds=time.perf_counter() - t0,
                  startup=(launch.started or time.perf_counter()) - t0,
                  memory_peak=stats.memory_peak,
                  cpu_seconds=None if stats.cpu_usage_us is None else stats.cpu_usage_us / 1e6,
                  pid=launch.pid or 0)


def _devices_group(path):
    """A v1 devices cgroup that allows only DEVICES (runc makes the same, or an eBPF filter on
    v2). ``helpers.cgroups`` leaves the devices controller out: it is security, not a limit."""
    os.mkdir(path)
    try:
        _put(path / "devices.deny", "a")
        _put(path / "devices.allow", *DEVICES)
    except BaseException:
        os.rmdir(path)
        raise
    return path


def _put(path, *values):
    """Write each value to a cgroup file, one write(2) each (the kernel reads one rule a write)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for value in values:
            os.write(fd, str(value).encode())
    except OSError as e:
        raise LabError(f"the kernel refused {value!r} for {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def _remove_group(group):
    """rmdir each directory (the processes are gone by now); the careful way if one is busy."""
    for path in group.dirs:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            group.remove()
            return


def run(command, *, timeout=None, **options):
    """Start a container, wait for ``command`` to end (kill it after ``timeout`` seconds),
    remove the container and return the Result. The options are Sandbox's."""
    with Sandbox(command, **options) as box:
        return box.wait(timeout)


# --- one option parser, two front ends: the command line and the %%sandbox magic ---------------

def add_options(parser):
    """The options of ``python -m helpers sandbox run`` and of ``%%sandbox``, docker run's names."""
    limits = parser.add_argument_group("limits")
    limits.add_argument("--memory", "-m", help="memory limit: 64M, 1G, or bytes")
    limits.add_argument("--cpus", help="CPU quota in cores: 0.5")
    limits.add_argument("--pids", "--pids-limit", help="most processes at once: 32")
    limits.add_argument("--timeout", type=float, help="kill it after this many seconds")
    box = parser.add_argument_group("container")
    box.add_argument("--hostname", "-H", default="sandbox", help="its hostname (default: sandbox)")
    box.add_argument("--rootfs", help="a root filesystem folder (default: the busybox rootfs)")
    box.add_argument("--user", "-u", help="uid[:gid] to run the command as (default: root)")
    box.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE",
                     help="an environment variable (repeatable)")
    box.add_argument("--workdir", "-w", default="/", help="working directory inside")
    box.add_argument("--userns", action="store_true", help="a user namespace: root inside is "
                                                           "uid 100000 outside")
    box.add_argument("--network", choices=("none", "host"), default="none",
                     help="none: loopback only (default); host: the host's network")
    security = parser.add_argument_group("security (defaults like runc's; each can be turned off)")
    security.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                          help="keep this capability too (repeatable; ALL keeps every one)")
    security.add_argument("--allow-new-privs", action="store_true",
                          help="do not set no_new_privs (setuid and file capabilities work)")
    security.add_argument("--unmask", action="store_true",
                          help="do not mask /proc/kcore, /proc/keys, /proc/timer_list, /sys/firmware")
    security.add_argument("--writable-proc", action="store_true",
                          help="leave /proc/sys, /proc/sysrq-trigger, /proc/irq, /proc/bus writable")
    security.add_argument("--all-devices", action="store_true",
                          help="no devices cgroup: any device node it makes can be opened")
    security.add_argument("--privileged", action="store_true", help="all of the above")
    return parser


def options(args):
    """Parsed options -> keyword arguments for ``run``/``Sandbox`` (and ``timeout``)."""
    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq:
            raise BadInput(f"--env {item!r} is not KEY=VALUE", fix="e.g. --env GREETING=hello")
        env[key] = value
    return dict(memory=args.memory, cpus=args.cpus, pids=args.pids, timeout=args.timeout,
                hostname=args.hostname, rootfs=args.rootfs, user=args.user, env=env,
                workdir=args.workdir, userns=args.userns, network=args.network,
                drop_caps="ALL" not in {c.upper() for c in args.cap_add},
                cap_add=[c for c in args.cap_add if c.upper() != "ALL"],
                no_new_privs=not args.allow_new_privs, mask_paths=not args.unmask,
                readonly_paths=not args.writable_proc, devices=not args.all_devices,
                privileged=args.privileged)


def main(argv=None):
    """``python -m helpers sandbox run [options] -- command...``; the exit status is the
    container's (125: it could not start, 127: no such command in it)."""
    parser = argparse.ArgumentParser(prog="python -m helpers sandbox",
                                     description="a container from scratch, like docker run")
    sub = parser.add_subparsers(dest="action", required=True)
    add_options(sub.add_parser("run", help="run a command in a fresh container, then remove it"))
    sub.choices["run"].add_argument("command", nargs=argparse.REMAINDER,
                                    help="the command and its arguments (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: add -- and the command, e.g. -- sh -c 'hostname'")
    try:
        result = run(command, **options(args))
    except CommandNotFound as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 127
    except LabError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(result.output)
    if not result.ok:
        print(f"sandbox: {result.summary()}", file=sys.stderr)
    return result.status


# --- leftovers --------------------------------------------------------------------------------

@owners.sweeper(owners.WORKLOADS)
def sweep():
    """Remove every sandbox leftover: kill the processes in sandbox cgroups and remove the
    cgroups, unmount overlays under the state folder, remove its upper layers and unpacked
    layers. "Already gone" is fine."""
    cgroups.sweep(prefix=names.name("sandbox"))
    base = str(_rootfs_module.STATE)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == base or point.startswith(base + "/"):
                points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        _rootfs_module._unmount(point)
    shutil.rmtree(base, ignore_errors=True)
