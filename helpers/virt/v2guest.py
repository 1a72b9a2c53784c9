"""A cgroup-v2-only Linux that runs the course's own Python: the v2 path tested for real.

This machine's cgroups are hybrid (controllers on v1), so the v2 code of ``helpers.cgroups``
can only be exercised for real on another kernel: Debian's cloud kernel under QEMU, booted
with ``cgroup_no_v1=all``. No disk image and no systemd: the guest mounts this machine's
root file system read-only (virtiofs), the course checkout read-write over its place in it
(after the guest's own /tmp, so that a checkout under /tmp shows through), its own /proc, /sys, /dev, cgroup2 and tmpfs on /tmp, /run and /var/tmp, HOME (with the
course's CACHE) copy-on-write, enables every controller in the root group's
``cgroup.subtree_control`` (what systemd does at boot), and runs commands with that tree as
their root: the same Python, venv and checkout as here, a different kernel::

    with v2guest.Guest() as guest:
        print(guest.controllers)                          # ['cpuset', 'cpu', 'io', 'memory', ...]
        print(guest.run("python -m pytest tests/test_cgroups.py -q").output)

Nothing in the guest can touch this machine but the checkout: the root share is a read-only
bind mount on the host's side too; /run (the course's STATE) and /tmp are the guest's own
tmpfs, and what it writes in HOME (and CACHE) stays in one; the guest's only NIC is a dummy.
``helpers.cleanup()`` run in the guest sweeps the guest. QEMU and the virtiofsds die with the ``with`` block, with the
process that started them, and are swept by ``vm.sweep()``.

The v2 step of ``make test`` (tests/test_v2guest.py) is what boots it.

Used in: no lab directly.
"""
import os
import shlex
from pathlib import Path
from typing import Self

from helpers.virt import vm
from helpers._core import names
from helpers.errors import LabError

ROOT_AT = "/mnt/host"                 # where the guest mounts this machine's root
CHECKOUT_AT = "/mnt/checkout"         # and the checkout, bound over its place once /tmp is the guest's
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ns.connect's veths, the sandbox's overlay root, iptables-nft, and the guest's eth0
MODULES = ("veth", "overlay", "nf_tables", "dummy")
MARK = "CNLAB_V2GUEST"                # set in the guest's environment: "you are in the v2 guest"

# Run by the initramfs's busybox, before the first command. Each line fails the set-up loudly.
# HOME is this machine's, copy-on-write (an overlay, its changes on a tmpfs): a Jupyter kernel,
# matplotlib and the course's CACHE (~/.cache/cnlab) write there, and paths print as they do
# here. (No mount point may name "cnlab": helpers.cleanup() would take it for one of its own.)
# pid_max and a NIC (eth0, a dummy: it leads nowhere) are what a systemd-booted machine has:
# ps sizes its PID column by pid_max.
SETUP = r"""set -e
r={root}
mkdir -p /rw && mount -t tmpfs tmpfs /rw && mkdir /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=$r{home},upperdir=/rw/upper,workdir=/rw/work $r{home}
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t cgroup2 -o nsdelegate cgroup2 $r/sys/fs/cgroup
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $r/dev/pts
mount -t tmpfs tmpfs $r/dev/shm
for link in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    ln -sf "${{link#*:}}" "$r/dev/${{link%%:*}}"
done
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$r/$d"; done
mkdir -p $r{checkout} && mount --bind {checkout_at} $r{checkout}
echo 4194304 > /proc/sys/kernel/pid_max
ip link set lo up
ip link add eth0 type dummy && ip link set eth0 up
cd $r/sys/fs/cgroup
for c in $(cat cgroup.controllers); do echo "+$c" > cgroup.subtree_control; done
cat cgroup.subtree_control
"""


class Guest:
    """A cgroup-v2-only QEMU guest, set up to run commands in this machine's root; a context
    manager. ``memory`` and ``cpus`` as for ``vm.VM`` (2 GiB: pytest, a Jupyter kernel and the
    tests' cgroups fit; one CPU: with two, QEMU 7.2's multi-threaded TCG reset the guest now and
    then, in 2 of about 8 boots), ``accel`` "auto" (KVM where it boots Linux, else TCG),
    ``timeout`` for the boot. ``controllers`` are those enabled for the root group's children."""

    def __init__(self, *, memory: int | str = "2G", cpus: int = 1, accel: str = "auto",
                 timeout: float = 120.0) -> None:
        self.checkout = names.ROOT
        self.vm = vm.VM(memory=memory, cpus=cpus, accel=accel, append="cgroup_no_v1=all",
                        modules=MODULES, tcg_cpu="max", timeout=timeout,
                        share=[vm.Share(Path("/"), ROOT_AT, readonly=True),
                               vm.Share(self.checkout, CHECKOUT_AT)])
        self.controllers: list[str] = []

    def start(self) -> Self:
        """Boot, mount the guest's own file systems, enable the controllers; killed on failure."""
        self.vm.start()
        try:
            result = self.vm.run(SETUP.format(root=ROOT_AT, home=Path.home(), checkout=self.checkout,
                                              checkout_at=CHECKOUT_AT), timeout=60)
            if result.exit_code != 0:
                raise LabError(f"the v2 guest's set-up failed (status {result.exit_code}): "
                               f"{result.output.strip()}", fix="read the VM's console (guest.vm.console)")
            self.controllers = result.output.split()
        except BaseException:
            self.vm.kill()
            raise
        return self

    def run(self, command: str, *, timeout: float = 600.0) -> vm.Result:
        """Run a shell command chrooted into this machine's root, in the checkout, with a clean
        environment (this HOME and CACHE, the checkout's venv first on PATH, ``MARK`` set)."""
        venv = self.checkout / ".venv" / "bin"
        env = [f"HOME={Path.home()}", f"CNLAB_CACHE={names.CACHE}", f"PATH={venv}:{PATH}",
               "LANG=C.UTF-8", "TERM=dumb", f"{MARK}=1"]
        inner = f"cd {shlex.quote(str(self.checkout))} && {command}"
        # switch_root's move, in a mount namespace of the command's own: this machine's root
        # becomes the namespace's "/" (a plain chroot would leave the initramfs there, and a
        # container's pivot_root inside then fails or shows the initramfs's mounts)
        switch = (f'cd {ROOT_AT} && mount -o move . / && exec chroot . /usr/bin/env -i '
                  f'{" ".join(env)} /bin/sh -c "$0"')
        return self.vm.run(f"unshare -m --propagation private sh -c {shlex.quote(switch)} "
                           f"{shlex.quote(inner)}", timeout=timeout)

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind, value, traceback) -> None:
        self.vm.__exit__(kind, value, traceback)


def inside() -> bool:
    """Whether this process runs in the v2 guest (a test that boots one must not, in there)."""
    return os.environ.get(MARK) == "1"
