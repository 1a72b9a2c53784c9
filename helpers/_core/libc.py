"""ctypes wrappers for the syscalls Python 3.11's ``os`` lacks, and the raw calls a cloned child
makes between clone and exec (``helpers.sandbox``, lab 24).

Each wrapper raises ``OSError(errno, message, target)`` like the ``os`` functions do, so callers
see which namespace, path or file descriptor was refused. One handle, its C types declared here.
"""
import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

_libc = ctypes.CDLL(None, use_errno=True)      # its calls let go of the GIL ...
_libc_gil = ctypes.PyDLL(None, use_errno=True)  # ... these keep it: fork

CLONE_VM = 0x00000100
CLONE_VFORK = 0x00004000
CLONE_PARENT = 0x00008000
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

SYS_PIVOT_ROOT = 155  # x86_64

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mkdir.argtypes = [ctypes.c_char_p, ctypes.c_uint]
_libc.chdir.argtypes = [ctypes.c_char_p]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_libc.execve.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
_libc._exit.argtypes = [ctypes.c_int]

# What clone(2) starts the new process in: a C function of one pointer, made from a Python one.
CLONE_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def _error(what: str, target: object = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", target)


def _check(result: int, what: str, target: object) -> int:
    if result == -1:
        raise _error(what, target)
    return result


def _enc(s: Any) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        return os.unshare(flags)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


def setns(fd: int, nstype: int = 0) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        return os.setns(fd, nstype)
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", fd)


def mount(source: Any, target: Any, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)), "mount", str(target))


def umount(target: Any, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), "umount", str(target))


def pivot_root(new_root: Any, put_old: Any) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)),
           "pivot_root", str(new_root))


def prctl(option: int, arg: int = 0) -> None:
    """prctl(2) with one argument: the cap-bounding-set drop and no_new_privs need it."""
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})", arg)


# --- for a process that shares its parent's memory until it execs ---------------------------

def fork() -> int:
    """os.fork(), without CPython's after-fork work in the child (half a millisecond) when this
    process runs one Python thread: then nothing else can hold the interpreter's locks, and a
    child that only clones and exits needs none of that work."""
    if threading.active_count() > 1:
        return os.fork()
    return _check(_libc_gil.fork(), "fork", None)


def clone(callback: Any, stack_top: int, flags: int) -> int:
    """clone(2): run ``callback`` (a CLONE_CALLBACK) in a new process on the stack whose top is
    ``stack_top``; return its pid."""
    return _check(_libc.clone(callback, stack_top, flags, None), "clone", hex(flags))


def execve(path: bytes, argv: Any, envp: Any) -> NoReturn:
    """execve(2) with C arrays made beforehand; returns only by raising, if it failed."""
    _libc.execve(path, argv, envp)
    raise _error(f"exec {os.fsdecode(path)}", os.fsdecode(path))


def exit_now(code: int) -> NoReturn:
    """_exit(2), called so that the GIL is let go of first: a cloned child that shares its
    parent's memory must end this way, never with os._exit."""
    _libc._exit(code)
    raise AssertionError("_exit returned")


@dataclass(frozen=True)
class Call:
    """One C call with its arguments made now, to make later where as little as possible should
    happen (a cloned child, before it execs): only the call, and errno if it failed. ``text``,
    the shell command that does the same, names it, in an error too."""
    text: str
    fn: Callable[..., int] = field(repr=False)
    args: tuple = field(repr=False, default=())

    def __call__(self) -> None:
        if self.fn(*self.args) == -1:
            raise _error(self.text)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def mount(cls, text: str, source: Any, target: Any, fstype: str | None = None, flags: int = 0,
              data: str | None = None) -> "Call":
        return cls(text, _libc.mount, (_enc(source), _enc(target), _enc(fstype), flags, _enc(data)))

    @classmethod
    def mkdir(cls, path: Any, mode: int = 0o755) -> "Call":
        return cls(f"mkdir {path}", _libc.mkdir, (_enc(path), mode))

    @classmethod
    def chdir(cls, path: Any) -> "Call":
        return cls(f"cd {path}", _libc.chdir, (_enc(path),))

    @classmethod
    def sethostname(cls, name: str) -> "Call":
        return cls(f"hostname {name}", _libc.sethostname, (name.encode(), len(name.encode())))

    @classmethod
    def pivot_root(cls, new_root: Any, put_old: Any) -> "Call":
        return cls(f"pivot_root {new_root} {put_old}", _libc.syscall,
                   (SYS_PIVOT_ROOT, _enc(new_root), _enc(put_old)))

    @classmethod
    def umount(cls, target: Any, flags: int = 0) -> "Call":
        return cls(f"umount {'-l ' if flags & MNT_DETACH else ''}{target}", _libc.umount2,
                   (_enc(target), flags))
