"""What a sandbox's process may not do, runc's and Docker's defaults (lab 24, "a container from
scratch"): a capability bounding set of Docker's 14, no_new_privs, masked and read-only paths
in /proc and /sys, and a devices cgroup. Each can be turned off, to see what it protects.
"""
import functools
import os
import struct
from pathlib import Path

from helpers._core import libc, procfs
from helpers.containers import cgroups
from helpers.errors import BadInput

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
PROC_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC   # /proc, /sys and the masks

_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38


# --- capabilities -----------------------------------------------------------------------------

def caps(names) -> set[str]:
    """Capability names (``cap_net_admin``, ``NET_ADMIN``, or ``ALL``), checked, as CAPABILITIES' spelling."""
    names = [names] if isinstance(names, str) else list(names)
    wanted = {str(n).upper().removeprefix("CAP_") for n in names}
    if "ALL" in wanted:
        return set(CAPABILITIES)
    unknown = sorted(wanted - set(CAPABILITIES))
    if unknown:
        raise BadInput(f"unknown capabilities {', '.join(unknown)}",
                       fix="use names from sandbox.CAPABILITIES, e.g. NET_ADMIN or SYS_ADMIN")
    return wanted


def dropped(added: set[str], *, drop_caps: bool, privileged: bool, no_mknod: bool) -> tuple[int, ...]:
    """The numbers of the capabilities to drop from the bounding set: all but DEFAULT_CAPS and
    ``added``, none when privileged. ``no_mknod``: MKNOD goes too (a devices cgroup was wanted,
    and there is none to stop a node's use: then making one is forbidden)."""
    keep = set(CAPABILITIES) if privileged or not drop_caps else set(DEFAULT_CAPS) | added
    if no_mknod and not privileged:
        keep.discard("MKNOD")
    return tuple(i for i, name in enumerate(CAPABILITIES[:_last_cap() + 1]) if name not in keep)


@functools.cache
def _last_cap() -> int:
    text = procfs.read_text("/proc/sys/kernel/cap_last_cap")
    return int(text) if text and text.strip().isdigit() else len(CAPABILITIES) - 1


def setcap(path, names: list[str] | str) -> None:
    """Give a file capabilities, like ``setcap cap_dac_override+ep path``: whoever execs it gets
    them (within the bounding set), unless no_new_privs is set."""
    bits = sum(1 << CAPABILITIES.index(name) for name in caps(names))
    data = struct.pack("<5I", 0x02000000 | 0x1,          # VFS_CAP_REVISION_2, effective
                       bits & 0xFFFFFFFF, 0, bits >> 32, 0)
    os.setxattr(path, "security.capability", data)


def restrict(drop: tuple[int, ...], no_new_privs: bool) -> None:
    """In the container's process, before exec: shrink the bounding set, set no_new_privs."""
    for cap in drop:
        libc.prctl(_PR_CAPBSET_DROP, cap)
    if no_new_privs:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)


# --- masked and read-only paths: mount steps on the container's root ``merged`` ----------------

def masks(merged: str) -> list[libc.Call]:
    """Hide MASKED: which of them exist is this kernel's, so the host's /proc and /sys say."""
    steps = []
    for path in MASKED:
        if os.path.isdir(path):
            steps.append(libc.Call.mount(f"mount -t tmpfs -o ro,size=0 tmpfs {merged}{path}", "tmpfs",
                                         merged + path, "tmpfs", PROC_FLAGS | libc.MS_RDONLY, "size=0"))
        elif os.path.lexists(path):
            steps.append(libc.Call.mount(f"mount --bind /dev/null {merged}{path}", "/dev/null",
                                         merged + path, None, libc.MS_BIND))
    return steps


def readonly(merged: str) -> list[libc.Call]:
    """Make READONLY read-only: bind each onto itself, then remount the bind read-only."""
    steps = []
    for path in READONLY:
        if os.path.lexists(path):
            target = merged + path
            steps += [libc.Call.mount(f"mount --rbind {target} {target}", target, target, None,
                                      libc.MS_BIND | libc.MS_REC),
                      libc.Call.mount(f"mount -o remount,bind,ro {target}", None, target, None,
                                      libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | PROC_FLAGS)]
    return steps


# --- the devices cgroup -----------------------------------------------------------------------

class DevicesGroup:
    """A v1 devices cgroup that lets its processes open only DEVICES (runc makes the same, or an
    eBPF program on v2). ``helpers.cgroups.Cgroup`` leaves the devices controller out: it is
    security, not a limit. Made now; ``remove()`` removes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        os.mkdir(self.path)
        try:
            cgroups.write(self.path / "devices.deny", "a")
            cgroups.write(self.path / "devices.allow", *DEVICES)
        except BaseException:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        cgroups.write(self.path / "cgroup.procs", pid)

    def remove(self) -> None:
        cgroups.remove_dirs([self.path])
