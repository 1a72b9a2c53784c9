"""A real virtual machine: Debian's cloud kernel and a busybox initramfs under QEMU.

QEMU runs the guest on KVM where it can (the CPU runs guest code itself and only exits to the
hypervisor for I/O), or on TCG (QEMU translates each block of guest code into host code: no
hardware help, many times slower, works anywhere). ``accel="auto"`` tries KVM for a few
seconds and falls back to TCG, and says why: on the course's machines QEMU with KVM cannot
boot Linux (nested virtualization).

The guest talks on two serial ports: ttyS0 is the kernel's console (kept, to show and to put
in errors) and ttyS1 carries commands and their results. Host folders can be shared into the
guest with virtiofs (Debian's cloud kernel has no 9p at all, but has virtiofs as modules): one
at ``/mnt/host``, or several ``Share``s, each where the guest should mount it::

    with vm.VM() as guest:
        print(guest.accel, guest.fallback_reason)
        print(guest.run("uname -r").output)

Used in: 13-vms-vs-containers, book/virtualization/vms-vs-containers.
"""
import base64
import collections
import contextlib
import dataclasses
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import threading
import time
from os import PathLike
from pathlib import Path
from typing import Any, Self

from helpers.virt import initramfs
from helpers._core import daemon, names, owners, procfs, wait
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool, NeedsRoot
from helpers._core.names import CACHE, STATE

KERNEL = CACHE / "kernel" / "vmlinuz"
MODULES = CACHE / "kernel" / "modules"      # <version>/ as in /lib/modules
QEMU = "qemu-system-x86_64"
VIRTIOFSD = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")  # Debian 13+, Debian 12
KVM_LIMIT = 3.0        # s: a KVM boot that works reaches init in well under a second
MIN_MEMORY = 96        # MiB: 64 panics while the kernel unpacks the initramfs
GUEST_SHARE = "/mnt/host"
MARKER = "cnlab-init:"
SHARE_MODULES = ("virtiofs", "virtio_pci")

# PID 1 of the guest. The kernel has opened /dev/console (ttyS0) as its stdin/stdout already.
INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo; echo "cnlab-init: up $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m"; done
# each cnlab.share=<tag>:<mount point>:<ro|rw> on the kernel command line, in order
for share in $(cat /proc/cmdline); do case "$share" in cnlab.share=*)
    share=${share#cnlab.share=}; tag=${share%%:*}; mode=${share##*:}; at=${share#*:}; at=${at%:*}
    mkdir -p "$at"
    mount -t virtiofs -o "$mode" "$tag" "$at" || { echo "cnlab: $at did not mount"; poweroff -f; } ;;
esac; done
# ttyS1: one base64 command per line in; its output (base64) and exit status out.
exec 3<>/dev/ttyS1
stty raw -echo <&3
echo cnlab-ready >&3
while read -r line <&3 && [ "$line" != poweroff ]; do
    echo "$line" | base64 -d > /tmp/command
    sh /tmp/command </dev/null >/tmp/output 2>&1
    status=$?
    { echo cnlab-output; base64 /tmp/output; echo "cnlab-exit $status"; } >&3
done
poweroff -f
"""

_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")
_kvm_verdict = {}      # "kvm" -> None (KVM boots Linux) or why not; tried once per process


class MissingKernel(MissingTool):
    def __init__(self, path: str | PathLike[str]) -> None:
        LabError.__init__(self, f"{path} is missing (Debian's cloud kernel, for the VM labs)",
                          fix="run `make test` as root: its set-up extracts it (it is never "
                              "installed as this machine's kernel)")


class BootFailed(LabError):
    """QEMU exited before the guest's init ran (a kernel panic, or QEMU refused to start)."""

    def __init__(self, status: int | None, why: str) -> None:
        self.status, self.why = status, why
        super().__init__(f"QEMU exited (status {status}) before the guest's init: {why}",
                         fix="read the VM's console (guest.console) and QEMU's messages")


@dataclasses.dataclass(frozen=True)
class Share:
    """A host folder the guest mounts with virtiofs at ``at``; ``readonly`` for the guest's mount.

    A read-only share is read-only on the host's side too: virtiofsd serves a read-only bind
    mount of the folder, made in a mount namespace of its own (so it is nothing on the host to
    sweep). That bind is not recursive: it shares the folder's own file system, not the ones
    mounted beneath it (sharing "/" does not share the host's /proc, /sys or /dev). It is also
    cached by the guest (virtiofsd's ``cache=always``): the guest may keep what it read, which
    makes imports from a shared Python many times faster. A writable share is not cached
    (``cache=none``): what either side writes, the other sees at once.
    """
    folder: Path
    at: str = GUEST_SHARE
    readonly: bool = False


def _shares(share):
    """``share=`` as a list of Shares: a folder is one writable Share at /mnt/host."""
    if share is None:
        return []
    given = [share] if isinstance(share, (str, PathLike, Share)) else list(share)
    shares = [s if isinstance(s, Share) else Share(Path(s)) for s in given]
    for s in shares:
        if not Path(s.folder).is_dir():
            raise BadInput(f"share={s.folder!r} is not a folder", fix="give an existing host folder")
        if not re.fullmatch(r"/[^\s:]*", s.at):
            raise BadInput(f"the mount point {s.at!r} is not an absolute guest path",
                           fix="give a path like /mnt/host, without spaces or ':'")
    return [dataclasses.replace(s, folder=Path(s.folder).resolve()) for s in shares]


@dataclasses.dataclass(frozen=True)
class Result:
    """A command run in the guest, and the VM it ran on."""
    command: str
    output: str
    exit_code: int
    accel: str                    # "kvm" or "tcg"
    fallback_reason: str | None   # why not KVM, when KVM was wanted ("auto") and not used
    init_seconds: float           # from starting QEMU to the guest's init
    peak_memory: int              # bytes: QEMU's peak RSS so far (see VM.peak_memory)


def _mebibytes(memory):
    match = re.fullmatch(r"(\d+)([MG])?i?B?", str(memory).strip(), re.IGNORECASE)
    if not match:
        raise BadInput(f"memory={memory!r} is not a size", fix='give MiB or a string like "256M" or "1G"')
    mib = int(match[1]) * (1024 if (match[2] or "M").upper() == "G" else 1)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    if not MIN_MEMORY <= mib <= total:
        raise BadInput(f"memory={memory!r} is {mib} MiB",
                       fix=f"give between {MIN_MEMORY} MiB and this machine's {total} MiB")
    return mib


def kernel_version(path: str | PathLike[str] = KERNEL) -> str:
    """The version string a bzImage carries in its header (where ``file`` reads it too)."""
    with open(path, "rb") as f:
        f.seek(0x20E)
        offset, = struct.unpack("<H", f.read(2))
        f.seek(offset + 0x200)
        return f.read(256).split(b"\0", 1)[0].split()[0].decode()


def _kvm_unusable():
    if not os.path.exists("/dev/kvm"):
        return "this machine has no /dev/kvm (no hardware virtualization)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm (needs root or the kvm group)"
    return None


def _boot(launch, accel, timeout):
    """Boot with ``launch(accel, limit)``; return why KVM was not used when it was wanted.

    ``"auto"`` tries KVM once per process, for at most ``KVM_LIMIT`` seconds, and remembers
    the verdict: the next boots go straight to the accelerator that works. The verdict is not
    kept on disk: it costs at most 3 s once per process, and a stale verdict (a machine that
    gained working nested KVM, or lost it) would be wrong without saying so.
    """
    if accel != "auto":
        launch(accel, timeout)
        return None
    if "kvm" not in _kvm_verdict:
        why = _kvm_unusable()
        if why is None:
            try:
                launch("kvm", KVM_LIMIT)
                _kvm_verdict["kvm"] = None
                return None
            except LabTimeout:
                why = (f"QEMU with KVM did not reach the guest's init within {KVM_LIMIT:g} s "
                       "(it hangs, as under nested virtualization)")
            except BootFailed as e:
                why = f"QEMU with KVM exited (status {e.status}) before the guest's init: {e.why}"
        _kvm_verdict["kvm"] = why
    if _kvm_verdict["kvm"] is None:
        launch("kvm", timeout)
        return None
    launch("tcg", timeout)
    return _kvm_verdict["kvm"]


class VM:
    """A QEMU guest with a busybox userland, to run shell commands in; a context manager.

    Keyword-only options: ``memory`` (MiB or "256M"), ``accel`` ("auto", "kvm" or "tcg"),
    ``append`` (more kernel command line, e.g. "cgroup_no_v1=all"), ``share`` (a host folder,
    mounted at ``/mnt/host`` in the guest, or a list of ``Share``s, mounted in that order;
    needs root for virtiofsd), ``cpus`` (virtual CPUs; under TCG each is a host thread),
    ``modules`` (more of the guest kernel's modules to load at boot, e.g. "veth", "overlay"),
    ``tcg_cpu`` (the CPU model TCG emulates: "max" has every instruction set extension it can do,
    which programs built for newer CPUs need, e.g. numpy; the default is QEMU's baseline qemu64),
    ``timeout`` (seconds for the boot to reach init).

    While it runs, QEMU is ``-name cnlab-vm-<id>`` and its sockets live in
    ``/run/cnlab/vm/<id>``: ``sweep()`` finds both after a crash.
    """

    def __init__(self, *, memory: int | str = "256M", accel: str = "auto", append: str = "",
                 share: str | PathLike[str] | Share | list[Share] | None = None, cpus: int = 1,
                 modules: tuple[str, ...] = (), tcg_cpu: str | None = None,
                 timeout: float = 60.0) -> None:
        self.mib = _mebibytes(memory)
        if accel not in ("auto", "kvm", "tcg"):
            raise BadInput(f"accel={accel!r} is not an accelerator", fix='use "auto", "kvm" or "tcg"')
        if not isinstance(append, str) or "\n" in append:
            raise BadInput(f"append={append!r} is not a kernel command line", fix="give one line of text")
        self.shares = _shares(share)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= (os.cpu_count() or 1):
            raise BadInput(f"cpus={cpus!r} is not a number of virtual CPUs",
                           fix=f"give 1 to this machine's {os.cpu_count()}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise BadInput(f"timeout={timeout!r} is not a positive number of seconds")
        if isinstance(modules, str) or not all(isinstance(m, str) and m.isidentifier() for m in modules):
            raise BadInput(f"modules={modules!r} is not a list of module names", fix='e.g. ("veth", "overlay")')
        if tcg_cpu is not None and not re.fullmatch(r"[\w.-]+", str(tcg_cpu)):
            raise BadInput(f"tcg_cpu={tcg_cpu!r} is not a CPU model", fix='e.g. "max" (see qemu-system-x86_64 -cpu help)')
        self.wanted, self.append, self.cpus, self.timeout = accel, append, cpus, float(timeout)
        self.tcg_cpu = tcg_cpu
        self.modules = tuple(modules) + (SHARE_MODULES if self.shares else ())
        # known once started: the accelerator used ("kvm" or "tcg"), why not KVM, QEMU's name, folder
        # and argv, and the seconds to the guest's init (from starting QEMU, and as the guest saw it)
        self.accel: str | None = None
        self.fallback_reason: str | None = None
        self.name: str | None = None
        self.dir: Path | None = None
        self.argv: list[str] | None = None
        self.init_seconds: float | None = None
        self.guest_init_seconds: float | None = None
        self.console = collections.deque(maxlen=500)   # the kernel console's last lines
        self._proc = self._serial = self._console = self._reader = None
        self._virtiofsds: list[daemon.Daemon] = []
        self._status = self._rusage = None

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> Self:
        """Boot the guest until its init answers; on any failure nothing is left behind."""
        if not KERNEL.is_file():
            raise MissingKernel(KERNEL)
        moddir = MODULES / kernel_version()
        if not moddir.is_dir():
            raise MissingKernel(moddir)
        if shutil.which(QEMU) is None:
            raise MissingTool(QEMU, package="qemu-system-x86")
        if self.shares and os.geteuid() != 0:
            raise NeedsRoot("sharing a folder into a VM (virtiofsd)")
        self._initrd = initramfs.build(INIT, modules=initramfs.modules(self.modules, moddir))
        self.fallback_reason = _boot(self._launch, self.wanted, self.timeout)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: object) -> None:
        if kind is None:
            self.close()
        else:
            self.kill()

    def close(self) -> None:
        """Ask init to power off, wait for QEMU to exit (kill it after 10 s), remove its files."""
        try:
            if self._serial is not None and self._poll() is None:
                self._serial.sendall(b"poweroff\n")
                self._exited(10)
        except OSError:
            pass   # QEMU is gone already: kill() reaps it
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop QEMU (and virtiofsd) now and remove the VM's folder; safe to call twice."""
        if self._proc is not None:
            if self._poll() is None:
                self._proc.kill()
                self._poll(block=True)
        while self._virtiofsds:
            self._virtiofsds.pop().kill()
        for conn in (self._serial, self._console):
            if conn is not None:
                with contextlib.suppress(OSError):   # wakes the console thread's recv()
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._serial = self._console = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _poll(self, *, block: bool = False):
        """QEMU's exit status, or None while it runs (``block``: wait until it has ended). Reaps
        it with wait4 to keep its rusage."""
        if self._status is None and self._proc.returncode is not None:
            self._status = self._proc.returncode     # reaped by Popen already: no rusage
        if self._status is None:
            try:
                pid, status, usage = os.wait4(self._proc.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:     # reaped by a sweep (procfs.kill), which killed it
                self._status = self._proc.returncode = -signal.SIGKILL
                return self._status
            if pid:
                self._status = self._proc.returncode = os.waitstatus_to_exitcode(status)
                self._rusage = usage
        return self._status

    def _exited(self, timeout):
        """Give QEMU ``timeout`` seconds to exit on its own; True if it did."""
        with contextlib.suppress(LabTimeout):
            return wait.until(lambda: self._poll() is not None, timeout, "QEMU to exit", interval=0.01)
        return False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited (0 after a clean power-off), else None."""
        return self._poll() if self._proc is not None else None

    @property
    def peak_memory(self) -> int | None:
        """QEMU's peak resident memory in bytes, as the kernel tracks it (not sampled).

        While QEMU runs this is ``VmHWM`` from /proc/<pid>/status; once it has exited it is
        ``ru_maxrss`` from wait4(), the same high-water mark. It counts the guest RAM that
        the guest touched, QEMU's own heap and TCG's translated code, and QEMU's libraries.
        """
        if self._proc is None:
            return None
        if self._poll() is not None:
            return self._rusage.ru_maxrss * 1024 if self._rusage else None
        status = procfs.read_text(f"/proc/{self._proc.pid}/status") or ""
        return next((int(line.split()[1]) * 1024 for line in status.splitlines()
                     if line.startswith("VmHWM:")), None)

    # -- booting ------------------------------------------------------------------------
    def _launch(self, accel, limit):
        """Start QEMU with ``accel`` and wait for init's "ready"; clean up and raise if not."""
        self.kill()
        self._proc = self._status = self._rusage = self._reader = self.accel = None
        self.init_seconds = self.guest_init_seconds = None
        self.console.clear()
        vmid = secrets.token_hex(4)
        self.name, self.dir = names.name("vm", vmid), names.state_dir("vm", vmid)
        try:
            listeners = {}
            for channel in ("console", "serial"):
                listeners[channel] = socket.socket(socket.AF_UNIX)
                listeners[channel].bind(str(self.dir / f"{channel}.sock"))
                listeners[channel].listen(1)
            self.argv = self._argv(accel)
            started = time.monotonic()
            self._proc = daemon.Daemon(self.argv, log=self.dir / "qemu.log", what="QEMU").start().process
            marker = threading.Event()

            def booted():
                """QEMU connects its serial ports to our sockets as it starts; then init speaks."""
                self._check()
                for channel, listener in list(listeners.items()):
                    if not select.select([listener], [], [], 0)[0]:
                        continue
                    with listeners.pop(channel):
                        conn = listener.accept()[0]
                    if channel == "serial":
                        self._serial = conn
                    else:
                        self._console = conn
                        self._reader = threading.Thread(target=self._read_console, daemon=True,
                                                        args=(conn, started, marker))
                        self._reader.start()
                return marker.is_set()
            wait.until(booted, limit, f"the guest to reach its init ({accel})", interval=0.005,
                       detail=lambda: "last console lines: "
                                      + (" | ".join(list(self.console)[-5:]) or "(none)"),
                       fix="give it a longer timeout=, or read the console for a kernel panic")
            deadline = started + limit
            self._buffer = b""
            while self._readline(deadline) != "cnlab-ready":
                pass
            self.accel = accel
        except BaseException:
            for listener in listeners.values():
                listener.close()
            self.kill()
            raise

    def _argv(self, accel):
        cmdline = ["console=ttyS0", "quiet", "panic=-1"]
        argv = [QEMU, "-name", self.name, "-nodefaults", "-nographic", "-no-reboot",
                "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else
                                   ["-cpu", self.tcg_cpu] if self.tcg_cpu else []),
                "-smp", str(self.cpus), "-m", f"{self.mib}M", "-kernel", str(KERNEL),
                "-initrd", str(self._initrd)]
        for channel in ("console", "serial"):   # ttyS0, ttyS1, in this order
            argv += ["-chardev", f"socket,id={channel},path={self.dir / channel}.sock",
                     "-serial", f"chardev:{channel}"]
        if self.shares:
            argv += self._virtiofs()
            cmdline += [f"cnlab.share=host{i}:{s.at}:{'ro' if s.readonly else 'rw'}"
                        for i, s in enumerate(self.shares)]
        return argv + ["-append", " ".join(cmdline + self.append.split())]

    def _virtiofs(self):
        """Start a virtiofsd for each shared folder; return QEMU's arguments for their devices.

        vhost-user lets virtiofsd read and write the guest's RAM directly, so that RAM must
        be a shared memory file (memfd) rather than QEMU's private memory.
        """
        program = next((p for p in VIRTIOFSD if os.access(p, os.X_OK)), None)
        if program is None:
            raise MissingTool("virtiofsd", package="virtiofsd")
        argv = []
        for i, share in enumerate(self.shares):
            path, source, wrap = self.dir / f"fs{i}.sock", share.folder, []
            if share.readonly:      # a read-only bind of it, in a mount namespace of virtiofsd's own
                source = self.dir / f"fs{i}"
                source.mkdir()
                wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"',
                        "sh", str(share.folder), str(source)]
            self._virtiofsds.append(daemon.Daemon(
                [*wrap, program, f"--socket-path={path}", "-o", f"source={source}",
                 "-o", f"cache={'always' if share.readonly else 'none'}"],
                log=self.dir / f"virtiofsd{i}.log", what="virtiofsd"))
            self._virtiofsds[-1].start(path.exists, timeout=5)
            argv += ["-chardev", f"socket,id=fs{i},path={path}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag=host{i}"]
        return argv + ["-object", f"memory-backend-memfd,id=mem,size={self.mib}M,share=on",
                       "-machine", "memory-backend=mem"]

    def _check(self):
        """Raise if QEMU has exited: BootFailed while booting, LabError once init was up."""
        if self._poll() is None:
            return
        if self._reader is not None:
            self._reader.join(timeout=1)     # the console's last words, e.g. a kernel panic
        console = " | ".join(list(self.console)[-5:])
        if self.accel is not None:
            raise LabError(f"QEMU exited (status {self._status}); last console lines: {console}")
        log = (self.dir / "qemu.log").read_text(errors="replace").splitlines()
        errors = [line.removeprefix(f"{QEMU}: ") for line in log if "warning:" not in line]
        raise BootFailed(self._status, errors[0] if errors else console)

    def _read_console(self, conn, started, marker):
        """Keep the console's lines; note when init's marker appears (runs in a thread)."""
        def add(raw, now):
            line = _ANSI.sub("", raw.decode(errors="replace")).strip()
            if line:
                self.console.append(line)
            if MARKER in line and not marker.is_set():   # it may follow firmware text
                self.init_seconds = now - started
                self.guest_init_seconds = float(line.split(MARKER)[1].split()[1])
                marker.set()

        pending = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    add(raw, time.monotonic())
        add(pending, time.monotonic())

    def _readline(self, deadline):
        """One line from ttyS1, waiting until ``deadline``."""
        while b"\n" not in self._buffer:
            self._check()
            remaining = wait.remaining(deadline)
            if remaining <= 0:
                raise LabTimeout("the guest did not answer in time")
            self._serial.settimeout(min(remaining, 0.2))
            with contextlib.suppress(TimeoutError):
                chunk = self._serial.recv(65536)
                if not chunk:   # QEMU closed the port as it exits: wait to say why
                    self._exited(2)
                    self._check()
                    raise LabError("the guest's serial port closed, and QEMU still runs")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip("\r")

    # -- using it -----------------------------------------------------------------------
    def run(self, command: str, *, timeout: float = 60.0) -> Result:
        """Run a shell command in the guest; its output (stdout and stderr) and exit status.

        Each command runs in a fresh ``sh`` (a ``cd`` does not carry over). If it does not
        finish within ``timeout`` seconds the VM is killed: the serial line is out of step.
        """
        if not isinstance(command, str):
            raise BadInput(f"command={command!r} is not a string", fix="give one shell command line")
        encoded = base64.b64encode(command.encode())
        if len(encoded) > 4000:    # the guest tty's input buffer holds 4095 bytes
            raise BadInput(f"the command is {len(command)} bytes long",
                           fix="keep it under 3000 bytes, or put a script in the shared folder")
        if self._serial is None or self._poll() is not None:
            raise LabError("the VM is not running", fix="use it inside `with vm.VM() as guest:`")
        deadline = time.monotonic() + timeout
        try:
            self._serial.sendall(encoded + b"\n")
            while self._readline(deadline) != "cnlab-output":
                pass
            encoded_output = []
            while not (line := self._readline(deadline)).startswith("cnlab-exit "):
                encoded_output.append(line)
        except LabTimeout as e:
            self.kill()
            raise LabTimeout(f"`{command}` did not finish within {timeout:g} s in the guest",
                             fix="the VM was stopped; start a new one") from e
        except BaseException:
            self.kill()     # interrupted mid-answer: the protocol is out of step
            raise
        output = base64.b64decode("".join(encoded_output)).decode(errors="replace")
        return Result(command, output, int(line.split()[1]), self.accel, self.fallback_reason,
                      self.init_seconds, self.peak_memory)


def run(command: str, *, timeout: float = 60.0, **options: Any) -> Result:
    """Boot a VM, run one shell command, shut it down; the Result has QEMU's final peak memory."""
    with VM(**options) as guest:
        result = guest.run(command, timeout=timeout)
    return dataclasses.replace(result, peak_memory=guest.peak_memory)


@owners.sweeper(owners.WORKLOADS)
def sweep() -> None:
    """Kill the QEMUs and virtiofsds a crash left (their arguments name /run/cnlab/vm/...) and
    remove their folders. Idempotent: nothing to do is success."""
    root = STATE / "vm"
    daemon.strays(lambda p: os.path.basename(p.argv[0]) in (QEMU, "virtiofsd")
                  and any(f"{root}/" in arg for arg in p.argv))
    if root.is_dir():
        for folder in root.iterdir():
            shutil.rmtree(folder, ignore_errors=True)
