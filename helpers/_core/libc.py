"""ctypes wrappers for the syscalls Python 3.11's ``os`` lacks.

Each raises ``OSError(errno, message, target)`` like the ``os`` functions do, so callers
see which namespace, path or file descriptor was refused.
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

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


def _check(result, what, target):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", target)
    return result


def unshare(flags):
    if hasattr(os, "unshare"):  # Python 3.12+
        return os.unshare(flags)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


def setns(fd, nstype=0):
    if hasattr(os, "setns"):  # Python 3.12+
        return os.setns(fd, nstype)
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", fd)


def mount(source, target, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           "mount", str(target))


def umount(target, flags=0):
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount", str(target))


def pivot_root(new_root, put_old):
    _check(_libc.syscall(SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)),
           "pivot_root", str(new_root))


_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option, arg=0):
    """prctl(2) with one argument: the cap-bounding-set drop and no_new_privs need it."""
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})", arg)
