"""A minimal root filesystem from Debian's static busybox, cached and self-repairing.

It is what an image's root filesystem is, with nothing to hide: one static binary, its applet
links, the directories a program expects, a few device nodes and an ``/etc/passwd``.
"""
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from .errors import MissingTool, NeedsRoot
from .resources import CACHE

_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var/run", "home")
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
            "tty": (5, 0)}
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_MARKER = ".cnlab-rootfs"


def _busybox():
    path = shutil.which("busybox")
    if path is None:
        raise MissingTool("busybox", package="busybox-static")
    return Path(path)


def _fingerprint(busybox):
    return hashlib.sha256(busybox.read_bytes()).hexdigest()


def is_rootfs(path):
    """True if ``path`` looks like a usable root filesystem: a shell, and the dirs to mount on."""
    path = Path(path)
    return (path / "bin" / "sh").exists() and all((path / d).is_dir() for d in ("proc", "dev", "tmp"))


def _build(target, busybox):
    for d in _DIRS:
        (target / d).mkdir(parents=True, exist_ok=True)
    os.chmod(target / "tmp", 0o1777)
    shutil.copy2(busybox, target / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (target / "bin" / applet).symlink_to("busybox")
    for name, (major, minor) in _DEVICES.items():
        os.mknod(target / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    (target / "etc" / "passwd").write_text(_PASSWD)
    (target / "etc" / "group").write_text(_GROUP)
    (target / "etc" / "hostname").write_text("cnlab\n")


def busybox_rootfs():
    """The cached rootfs (built on first use, rebuilt when missing, broken or outdated)."""
    if os.geteuid() != 0:
        raise NeedsRoot("building a root filesystem with device nodes")
    busybox = _busybox()
    target = CACHE / "rootfs" / "busybox"
    marker = target / _MARKER
    fingerprint = _fingerprint(busybox)
    if is_rootfs(target) and marker.is_file() and marker.read_text() == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="busybox.", dir=target.parent))
    try:
        _build(fresh, busybox)
        (fresh / _MARKER).write_text(fingerprint)
        os.chmod(fresh, 0o755)
        if target.exists():
            shutil.rmtree(target)
        fresh.rename(target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return target
