"""Root filesystems: a cached busybox one, overlay mounts on top of it, and image layers.

A root filesystem is what an image holds, with nothing to hide: one static binary, its applet
links, the directories a program expects, a few device nodes and an ``/etc/passwd``.

A container never writes into it. An *overlay* puts a per-container writable layer on top::

    with rootfs.Overlay(rootfs.busybox_rootfs()) as fs:     # mounted at fs.merged
        (fs.merged / "etc" / "motd").write_text("hi\\n")     # lands in fs.upper only
        os.remove(fs.merged / "etc" / "group")              # leaves a whiteout in fs.upper
        rootfs.changes(fs.upper)        # {"etc/motd": "changed", "etc/group": "deleted"}

and image layers (helpers.oci's tarballs, named by their sha256) unpack into one directory
each, stacked in order as the overlay's lower layers: ``rootfs.layer_dirs(layers)``.

Used in: 23-filesystems, 24-container-from-scratch, book/containers/container-from-scratch, book/containers/images-filesystems.
"""
import contextlib
import errno
import functools
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from helpers._core import libc, names, owners
from helpers.errors import BadInput, LabError, MissingTool, NeedsRoot
from helpers._core.names import CACHE

_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var/run", "home")
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
            "tty": (5, 0)}
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_MARKER = ".cnlab-rootfs"
PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
STATE = names.STATE / "sandbox"     # per-container upper/work/merged dirs, unpacked layers
LAYERS = owners.keeps(STATE / "layers")   # unpacked once, kept: a cache, not a leak
WHITEOUT = ".wh."                       # a layer's "<dir>/.wh.<name>": <name> is deleted
OPAQUE = ".wh..wh..opq"                 # a layer's "<dir>/.wh..wh..opq": <dir> hides what is below
_OPAQUE_XATTR = "trusted.overlay.opaque"
_fingerprints: dict = {}                # (path, inode, size, mtime) -> sha256: hash busybox once
_checked: dict = {}                     # rootfs -> the stamps of its marker, its shell, busybox


def _busybox():
    path = shutil.which("busybox")
    if path is None:
        raise MissingTool("busybox", package="busybox-static")
    return Path(path)


def _stamp(path):
    st = os.lstat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=1)
def _which_busybox(search_path):
    return shutil.which("busybox", path=search_path)


def _busybox_stamp():
    found = _which_busybox(os.environ.get("PATH", os.defpath))
    return found and _stamp(found)


def _fingerprint(busybox):
    st = busybox.stat()
    key = (str(busybox), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _fingerprints:
        _fingerprints[key] = hashlib.sha256(busybox.read_bytes()).hexdigest()
    return _fingerprints[key]


def stack(root: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A root filesystem (a folder, or a list of layer folders) as its stack of layer folders,
    bottom first: the one shape the overlay code works with."""
    if isinstance(root, (str, os.PathLike)):
        return [Path(root)]
    return [Path(p) for p in root]


def is_rootfs(path):
    """True if ``path`` (a folder, or a list of layer folders, bottom first) looks like a usable
    root filesystem: a shell, and the directories to mount /proc, /dev and /tmp on."""
    try:
        lowers = stack(path)
    except TypeError:
        return False
    if not lowers or not all(p.is_dir() for p in lowers):
        return False
    return resolve(lowers, "/bin/sh") is not None and all(
        (found := resolve(lowers, d)) is not None and found.is_dir() for d in ("/proc", "/dev", "/tmp"))


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


def busybox_rootfs(cache=None):
    """The cached rootfs (built on first use, rebuilt when missing, broken or outdated).
    ``cache`` is the folder that holds it (default: the course's cache)."""
    if os.geteuid() != 0:
        raise NeedsRoot("building a root filesystem with device nodes")
    target = Path(cache or CACHE / "rootfs") / "busybox"
    marker = target / _MARKER
    with contextlib.suppress(OSError):     # checked fully before: a few stat calls will do
        if _checked.get(target) == (_stamp(marker), _stamp(target / "bin" / "sh"), _busybox_stamp()):
            return target
    busybox = _busybox()
    fingerprint = _fingerprint(busybox)
    with contextlib.suppress(OSError):
        if marker.read_text() == fingerprint and is_rootfs(target):
            _checked[target] = (_stamp(marker), _stamp(target / "bin" / "sh"), _busybox_stamp())
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


# --- looking inside a root filesystem, as the kernel would after chroot -----------------------

def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _find(lowers, rel):
    """The host path of ``rel`` in the topmost layer that has it; None when no layer has it or a
    layer above deletes it (a whiteout). Opaque directories are not followed: good enough to
    check that a command exists."""
    for layer in reversed(lowers):
        path = os.path.join(layer, rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        return None if _is_whiteout(st) else path
    return None


def resolve(root, path, *, limit=40):
    """The host path of the file that ``path`` names inside ``root`` (a folder, or layer folders
    bottom first), symlinks followed inside the root, as a process chrooted there would; or None.
    An absolute symlink (``/bin/sh -> /bin/busybox``) stays inside the root."""
    lowers = [os.fspath(p) for p in stack(root)]
    todo = [p for p in reversed(str(path).split("/")) if p]
    done: list[str] = []
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            done = done[:-1]
            continue
        found = _find(lowers, "/".join(done + [name]))
        if found is None:
            return None
        if os.path.islink(found):
            limit -= 1
            if limit < 0:
                return None          # a loop, as ELOOP
            target = os.readlink(found)
            if target.startswith("/"):
                done = []
            todo.extend(p for p in reversed(target.split("/")) if p)
            continue
        done.append(name)
    found = _find(lowers, "/".join(done))
    return None if found is None else Path(found)


def lookup(root, command, *, path=PATH):
    """Where ``command`` is inside ``root``, as the absolute path the kernel will exec: a name is
    searched in ``path`` like a shell does; a path must name an executable file. None if missing."""
    command = str(command)
    candidates = [command if command.startswith("/") else f"/{command}"] if "/" in command \
        else [f"{d}/{command}" for d in path]
    for candidate in candidates:
        found = resolve(root, candidate)
        if found is not None:
            st = os.stat(found)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return candidate
    return None


# --- overlay mounts ---------------------------------------------------------------------------

class Overlay:
    """A read-only lower layer (or several, bottom first), a writable upper layer and overlayfs's
    work directory, merged at ``merged``: every write goes to ``upper``; ``lower`` never changes.

    The directories are made now, under ``where/<id>`` (default ``/run/cnlab/sandbox/<id>``).
    ``mount()`` mounts the overlay in the caller's mount namespace (a container does it in its
    own); a ``with`` block mounts it, then unmounts it and removes the directories.
    """

    def __init__(self, lower, *, where=None, owner=None):
        self.lowers = stack(lower)
        if not self.lowers or not all(p.is_dir() for p in self.lowers):
            raise BadInput(f"lower={lower!r} is not a directory (or list of directories)",
                           fix="pass rootfs.busybox_rootfs(), or folders made by rootfs.layer_dirs()")
        self.id = uuid.uuid4().hex[:12]
        self.path = Path(where or STATE) / self.id
        self.upper, self.work, self.merged = (self.path / d for d in ("upper", "work", "merged"))
        try:
            self.path.mkdir(parents=True)
            for d in (self.upper, self.work, self.merged):
                os.mkdir(d)
            if owner is not None:      # the mapped root of a user namespace writes the upper layer
                for d in (self.upper, self.work):
                    os.chown(d, owner, owner)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.mounted = False

    @property
    def options(self):
        return overlay_options(self.lowers, self.upper, self.work)

    def mount(self):
        """Mount it at ``merged`` in the calling process's mount namespace."""
        try:
            libc.mount("overlay", self.merged, "overlay", 0, self.options)
        except OSError as e:
            raise LabError(f"cannot mount the overlay at {self.merged}: {e.strerror}",
                           fix="overlayfs needs root and a kernel with CONFIG_OVERLAY_FS") from e
        self.mounted = True
        return self.merged

    def unmount(self):
        if self.mounted:
            with contextlib.suppress(FileNotFoundError):
                _unmount(self.merged)
            self.mounted = False

    def remove(self):
        """Unmount (if mounted here) and remove the upper, work and merged directories."""
        self.unmount()
        try:        # what an unchanged container leaves: empty folders, and overlayfs's work/work
            for d in (self.upper, self.work / "work", self.work, self.merged, self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(d)
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)

    def changes(self):
        return changes(self.upper, self.lowers)

    def __enter__(self):
        try:
            self.mount()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"<Overlay {self.id}: {len(self.lowers)} lower layer(s){' mounted' if self.mounted else ''}>"


def overlay_options(lowers, upper, work):
    """The mount data: overlayfs wants the lower layers top first, separated by colons."""
    lower = ":".join(str(p) for p in reversed(stack(lowers)))
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def _unmount(point):
    try:
        libc.umount(point, libc.MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):      # not a mount point (any more)
            raise


def changes(upper, lower=None):
    """What an upper layer holds, as {path: "changed" | "deleted" | "opaque"}: a file written (or
    copied up) through the overlay, a whiteout (char device 0:0) that hides a lower file, or a
    directory that hides everything below it. Directories that only hold changes are left out;
    given the ``lower`` layer(s), a directory they don't have is reported as "changed"."""
    upper = Path(upper)
    lowers = stack(lower) if lower is not None else None
    found = {}
    for path in sorted(upper.rglob("*")):
        rel = path.relative_to(upper).as_posix()
        st = path.lstat()
        if _is_whiteout(st):
            found[rel] = "deleted"
        elif not stat.S_ISDIR(st.st_mode):
            found[rel] = "changed"
        elif _xattr(path, _OPAQUE_XATTR) == b"y":
            found[rel] = "opaque"
        elif lowers is not None and _find(lowers, rel) is None:
            found[rel] = "changed"
    return found


def _xattr(path, name):
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


# --- image layers -----------------------------------------------------------------------------

def whiteout(name: str) -> tuple[str, str] | None:
    """What a layer entry's name means by the OCI image spec's whiteout rules: ("deleted", path)
    for ``<dir>/.wh.<name>`` (``path`` is ``<dir>/<name>``), ("opaque", dir) for
    ``<dir>/.wh..wh..opq`` ("" is the root), None for an ordinary entry."""
    parent, _, base = name.rstrip("/").rpartition("/")
    if base == OPAQUE:
        return "opaque", parent
    if base.startswith(WHITEOUT):
        return "deleted", f"{parent}/{base[len(WHITEOUT):]}" if parent else base[len(WHITEOUT):]
    return None


def whiteout_entry(path: str) -> str:
    """The layer entry that deletes ``path``: ``etc/group`` -> ``etc/.wh.group``."""
    parent, _, base = path.rpartition("/")
    return f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}"


def unpack(layer, target):
    """Unpack one image layer (a ``helpers.oci.Layer``) into an empty directory the way overlayfs
    stores a layer: a ``.wh.<name>`` entry becomes a whiteout (char device 0:0) called ``<name>``,
    ``.wh..wh..opq`` marks its directory opaque. Stack such directories with ``Overlay``."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
        members = [(m, whiteout(m.name)) for m in tar.getmembers()]
        tar.extractall(target, members=[m for m, rule in members if rule is None], filter="tar")
        for _, rule in members:
            if rule is None:
                continue
            kind, rel = rule
            if kind == "opaque":
                folder = target / rel
                folder.mkdir(parents=True, exist_ok=True)
                os.setxattr(folder, _OPAQUE_XATTR, b"y")
            else:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.mknod(target / rel, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return target


def layer_dirs(layers, *, where=None):
    """Each layer unpacked into a directory named by its ``diff_id`` (unpacked once, then reused:
    content addressing), bottom first, ready to be an overlay's lower layers."""
    base = Path(where or LAYERS)
    found = []
    for layer in layers:
        target = base / layer.diff_id.split(":")[1]
        if not target.is_dir():
            base.mkdir(parents=True, exist_ok=True)
            fresh = Path(tempfile.mkdtemp(prefix=".unpack-", dir=base))
            try:
                unpack(layer, fresh)
                os.chmod(fresh, 0o755)
                fresh.rename(target)
            except OSError as e:
                shutil.rmtree(fresh, ignore_errors=True)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):   # another caller was faster
                    raise
        found.append(target)
    return found


# --- chroot and its escape --------------------------------------------------------------------

def escape(root, *, pivot_root=False):
    """Try the classic escape from a chroot, as root, in a child with a private mount namespace;
    return True if it reached the host's files (this course's checkout).

    The jail is ``chroot(root)``, or with ``pivot_root=True`` what a container does: make
    ``root`` the root of the mount namespace and detach the old root. The escape, from inside:
    ``mkdir x; chroot x`` (the working directory stays *outside* the new root), then ``cd ..``
    many times (nothing stops a directory outside the root at the root), then ``chroot .``.
    """
    from helpers.containers import ns
    root = Path(root)
    if not is_rootfs(root):
        raise BadInput(f"{root} is not a root filesystem", fix="use rootfs.busybox_rootfs()")
    return ns.run(_escape, str(root), pivot_root, str(names.ROOT), new=["mnt"]).value


def _escape(root, pivot, host_marker):
    # a scratch tmpfs on the jail's /tmp, so the jail itself is never written to
    libc.mount("tmpfs", f"{root}/tmp", "tmpfs", 0, "size=1m")
    if pivot:
        libc.mount(root, root, None, libc.MS_BIND | libc.MS_REC)   # the new root must be a mount
        os.chdir(root)
        libc.pivot_root(".", ".")
        libc.umount(".", libc.MNT_DETACH)
    else:
        os.chroot(root)
    os.chdir("/")
    # -- inside the jail: the escape --
    os.mkdir("/tmp/x")
    os.chroot("/tmp/x")            # cwd is still "/" of the jail: outside this new root
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    return os.path.isdir(host_marker)
