"""One container, described and checked before anything exists (lab 24): the command found in
its root filesystem, its limits, environment and security settings, and execve's arguments."""
import ctypes
import functools
import os
from dataclasses import dataclass

from helpers.containers import cgroups, rootfs
import helpers.containers.sandbox.security as security
from helpers.containers.sandbox.options import Options
from helpers.errors import BadInput

PATH = ":".join(rootfs.PATH)       # the container's $PATH


class CommandNotFound(BadInput):
    """The command is not an executable file inside the container's root filesystem."""


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
    host_upper: bool             # the upper layer in a folder on the host
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
    def parse(cls, command, **options) -> "Spec":
        """``command`` (a shell command string, or an argv list) with the options of ``Options``."""
        o = Options(**options)
        limits = o.limits()
        argv = command_argv(command)
        lowers = _rootfs(o.rootfs)
        path = rootfs.lookup(lowers, argv[0])
        if path is None:
            raise CommandNotFound(f"{argv[0]!r} is not an executable file in the container's root "
                                  f"filesystem ({', '.join(map(str, lowers))})",
                                  fix="use a busybox applet (ls /bin of the rootfs), or a full path")
        privileged = o.privileged
        return cls(argv=argv, path=path, lowers=tuple(lowers), limits=limits, hostname=o.hostname,
                   env=environment(o.env, o.hostname, o.user), workdir=o.workdir, user=o.user,
                   userns=o.userns, network=o.network, host_upper=o.host_upper,
                   drop=security.dropped(o.cap_add, drop_caps=o.drop_caps, privileged=privileged,
                                         no_mknod=o.devices and layout().where("devices") is None),
                   no_new_privs=o.no_new_privs and not privileged,
                   mask_paths=o.mask_paths and not privileged,
                   readonly_paths=o.readonly_paths and not privileged,
                   devices=o.devices and not privileged)


def _rootfs(value):
    if value is None:
        return [rootfs.busybox_rootfs()]
    lowers = rootfs.stack(value) if isinstance(value, (str, os.PathLike, list, tuple)) else None
    if not lowers or not rootfs.is_rootfs(lowers):
        raise BadInput(f"rootfs={value!r} is not a root filesystem (it needs /bin/sh, /proc, /dev "
                       f"and /tmp)", fix="use rootfs.busybox_rootfs(), or rootfs.layer_dirs(layers)")
    return lowers


def command_argv(command) -> tuple[str, ...]:
    """A command as an argv: a string runs in ``/bin/sh -c``."""
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


def environment(env: dict[str, str], hostname: str, user: tuple[int, int] | None) -> tuple[str, ...]:
    """The process's environment: PATH, HOSTNAME and HOME (root's, or / for another user), then ``env``."""
    values = {"PATH": PATH, "HOSTNAME": hostname, "HOME": "/root" if user in (None, (0, 0)) else "/"}
    values.update(env)
    return tuple(f"{k}={v}" for k, v in values.items())


@functools.cache
def layout() -> cgroups.Layout:
    """This machine's cgroup hierarchies, read once."""
    return cgroups.detect()
