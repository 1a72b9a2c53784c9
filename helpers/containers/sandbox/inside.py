"""What a sandbox's process does between clone and exec (lab 24), worked out here, before the
fork, as a list of steps that each make one system call: make every mount private, mount the
overlay (its upper layer on a tmpfs), a fresh /proc, a read-only /sys, mask and write-protect
the dangerous parts of them, set the hostname, bring up loopback, ``pivot_root`` into the
overlay and detach the old root; then drop capabilities, set no_new_privs, enter a cgroup
namespace and exec the command.
"""
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from helpers._core import libc
import helpers.containers.sandbox.security as security
from helpers.containers.sandbox.spawn import Link
from helpers.containers.sandbox.spec import Spec

_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK = 0x8914, 0x1, 0x8

Step = libc.Call       # one system call of a container's set-up, as the shell command that does the same


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


def _loopback_up():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:     # any socket takes the ioctl
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK))
    return 0


def plan(spec: Spec, options: str, merged, scratch=None) -> Plan:
    """The steps for ``spec``: the overlay (``options``) at ``merged`` (on a tmpfs mounted at
    ``scratch``, if given), /proc, /sys, the masks and read-only paths, the hostname, loopback,
    pivot_root."""
    m = str(merged)
    mount = Step.mount
    rootfs = [mount("mount --make-rprivate /", None, "/", None, libc.MS_REC | libc.MS_PRIVATE)]
    if scratch is not None:
        rootfs.append(mount(f"mount -t tmpfs tmpfs {scratch}", "tmpfs", scratch, "tmpfs", 0, "mode=0755"))
        rootfs += [Step.mkdir(f"{scratch}/{name}") for name in ("upper", "work", "root")]
    rootfs.append(mount(f"mount -t overlay overlay -o {options} {m}", "overlay", m, "overlay", 0, options))
    kernel_fs = []
    if spec.userns:    # the overlay came with the copy of the launcher's mounts, locked to its
        # place: pivot_root wants a mount made in here, so bind it onto itself
        kernel_fs.append(mount(f"mount --rbind {m} {m}", m, m, None, libc.MS_BIND | libc.MS_REC))
    kernel_fs.append(mount(f"mount -t proc -o nosuid,nodev,noexec proc {m}/proc", "proc",
                           f"{m}/proc", "proc", security.PROC_FLAGS))
    if spec.userns and spec.network == "host":     # not its network: it may not mount sysfs
        kernel_fs.append(mount(f"mount --rbind /sys {m}/sys", "/sys", f"{m}/sys", None,
                               libc.MS_BIND | libc.MS_REC))
    else:
        kernel_fs.append(mount(f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {m}/sys", "sysfs",
                               f"{m}/sys", "sysfs", security.PROC_FLAGS | libc.MS_RDONLY))
    masks = security.masks(m) if spec.mask_paths else []
    readonly = security.readonly(m) if spec.readonly_paths else []
    hostname = [Step.sethostname(spec.hostname)]
    network = [Step("ip link set lo up", _loopback_up)] if spec.network == "none" else []
    pivot_root = [Step.chdir(m),
                  # the new root on top of the old one, then the old one detached: out of reach
                  Step.pivot_root(".", "."),
                  Step.umount(".", libc.MNT_DETACH),
                  Step.chdir(spec.workdir)]
    return Plan(*map(tuple, (rootfs, kernel_fs, masks, readonly, hostname, network, pivot_root)))


def container(spec: Spec, steps: Plan):
    """What PID 1 of a new container does: the steps (with a user namespace, the launcher,
    root on the host, has made the root filesystem), then ``enter``: the security settings,
    the cgroup, exec."""
    def work(link: Link):
        if spec.userns:    # wait until the parent has written the id maps, then be root
            link.wait_for(b"m")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        else:
            for step in steps.rootfs:
                step()
        for step in steps.setup:
            step()
        enter(spec, link)
    return work


def enter(spec: Spec, link: Link):
    """The last steps before exec, for PID 1 and for each exec: capabilities, no_new_privs, the
    cgroup (the parent puts us in) and a cgroup namespace, the user."""
    security.restrict(spec.drop, spec.no_new_privs)
    link.wait_for(b"g")                     # the parent has put us in the cgroup
    libc.unshare(libc.CLONE_NEWCGROUP)      # its cgroup looks like / from inside
    if spec.user is not None:
        uid, gid = spec.user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc.execve(*spec.exec_args)            # returns only by raising


def joiner(fds, userns: bool):
    """What the launcher of an ``exec`` does first: join the container's namespaces, user
    first, mount last (which also makes the container's root our root)."""
    def before():
        for fd, flag in fds:
            libc.setns(fd, flag)
        if userns:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    return before
