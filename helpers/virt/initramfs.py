"""A tiny initramfs: busybox, an ``/init`` script and a few kernel modules, as a gzipped cpio.

The kernel unpacks this archive into a tmpfs and runs ``/init`` as PID 1: no disk, no
distribution, no systemd. It is the smallest thing that is still a Linux userland, which is
why a VM booted with it reaches its init in seconds even without hardware virtualization.

The archive is written here (the ``newc`` format is a 110-byte ASCII header per file), not by
``cpio``, so that it is byte-for-byte reproducible and cached by what went into it.

Used in: no lab directly.
"""
import gzip
import hashlib
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

from helpers.errors import MissingTool, NotSupported
from helpers._core.names import CACHE, publish

_TRAILER = "TRAILER!!!"
_DIR, _FILE, _LINK = 0o040000, 0o100000, 0o120000


def newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of ``(path, mode, data)`` entries, data as bytes.

    Every timestamp, owner and inode number is fixed, so equal inputs give equal archives.
    """
    out = bytearray()
    for ino, (path, mode, data) in enumerate([*entries, (_TRAILER, 0, b"")], start=1):
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def modules(names: Iterable[str], moddir: str | PathLike[str]) -> list[Path]:
    """Paths of the kernel modules ``names`` and their dependencies, in an order ``insmod`` can load.

    ``moddir`` is a kernel's ``/lib/modules/<version>``. Its ``modules.dep`` is written by
    ``depmod`` at install time, which the course never runs, so the dependencies are read
    from each module's own ``.modinfo`` section (the ``depends=`` string).
    """
    moddir = Path(moddir)
    paths = {Path(line).name.removesuffix(".ko").replace("-", "_"): moddir / line
             for line in (moddir / "modules.order").read_text().split()}
    ordered: list[Path] = []

    def visit(name):
        if name not in paths:
            raise NotSupported(f"kernel module {name} is not in {moddir}",
                               fix="this kernel was built without it; use another kernel")
        if paths[name] in ordered:
            return
        found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", paths[name].read_bytes())
        for dep in filter(None, (found.group(1).decode().split(",") if found else ())):
            visit(dep)
        ordered.append(paths[name])

    for name in names:
        visit(name)
    return ordered


def _dynamic(elf):
    """Whether an ELF64 executable names a program interpreter (the dynamic loader)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    size, count = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * size)[0] == 3  # PT_INTERP
               for i in range(count))


def build(init: str, *, modules: Sequence[str | PathLike[str]] = ()) -> Path:
    """Build (once) and return the path of an initramfs with busybox, ``init`` and ``modules``.

    ``/init`` installs busybox's applets as symlinks itself (``busybox --install -s``);
    the modules go to ``/lib/modules/`` with a file ``order`` listing them in load order.
    The result is cached under ``CACHE/initramfs``, keyed by the hash of everything in it.
    """
    busybox = shutil.which("busybox")
    if busybox is None:
        raise MissingTool("busybox", package="busybox-static")
    binary = Path(busybox).read_bytes()
    if _dynamic(binary):  # the initramfs has no libc for it to load
        raise MissingTool("a static busybox", package="busybox-static")
    names = [Path(p).name for p in modules]
    entries = [(d, _DIR | 0o755, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "mnt",
                                                 "lib", "lib/modules")]
    entries += [("bin/busybox", _FILE | 0o755, binary),
                ("bin/sh", _LINK | 0o777, b"busybox"),
                ("init", _FILE | 0o755, init.encode()),
                ("lib/modules/order", _FILE | 0o644, "".join(n + "\n" for n in names).encode())]
    entries += [(f"lib/modules/{n}", _FILE | 0o644, Path(p).read_bytes())
                for n, p in zip(names, modules)]
    archive = newc(entries)
    path = CACHE / "initramfs" / f"{hashlib.sha256(archive).hexdigest()[:16]}.cpio.gz"
    if not path.exists():                       # another process may race us: both write the same
        publish(path, gzip.compress(archive, compresslevel=6, mtime=0))
    return path
