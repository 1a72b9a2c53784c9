"""Linux namespaces: create them, run code inside them in a child process, join and list them.

The notebook kernel is multithreaded, so its own namespaces are never changed: all namespace
work happens in a forked child that reports back over a pipe.
"""
import os

from . import _libc

# The name of each namespace type in /proc/<pid>/ns, and the flag that creates one.
NAMESPACES = {
    "uts": _libc.CLONE_NEWUTS,
    "pid": _libc.CLONE_NEWPID,
    "mnt": _libc.CLONE_NEWNS,
    "net": _libc.CLONE_NEWNET,
    "ipc": _libc.CLONE_NEWIPC,
    "user": _libc.CLONE_NEWUSER,
    "cgroup": _libc.CLONE_NEWCGROUP,
    "time": _libc.CLONE_NEWTIME,
}


def probe(kind):
    """Try to create a namespace of this kind in a child; return None, or why it failed."""
    pid = os.fork()
    if pid == 0:
        try:
            _libc.unshare(NAMESPACES[kind])
            os._exit(0)
        except OSError as e:
            os._exit(e.errno or 1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"unshare({kind}) failed: {os.strerror(code)}"


def sweep():
    """Nothing yet: named network namespaces arrive with the namespaces chapter."""
