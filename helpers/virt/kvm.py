"""A minimal hypervisor on the KVM API: guest memory, one vCPU, and VM exits handled in Python.

The kernel runs guest instructions until one of them needs the hypervisor (an ``out`` to a
port, a load from an address with no RAM behind it, ``hlt``). Then
``KVM_RUN`` returns with an *exit reason* in the shared ``kvm_run`` page, this module
emulates the device the guest was talking to, and calls ``KVM_RUN`` again. That loop is
the whole of "trap and emulate"::

    with kvm.VM() as vm:
        vm.load(kvm.guest("hello"))
        result = vm.vcpu(mode="real").run(devices=[kvm.Serial()])
    result.output, result.exits          # b'Hello...', Counter({'IO': 22, 'HLT': 1})

Guests are GNU assembly in ``helpers/guests``, assembled with binutils on first use and
cached. No in-kernel interrupt controller is created, so ``hlt`` exits to us. Every fd and
mapping is owned by a context manager; nothing named is created on the machine.

Used in: 11-hypervisor, 12-paravirtualization, book/virtualization/full-virtualization, book/virtualization/paravirtualization.
"""
import collections
import ctypes
import enum
import fcntl
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from helpers.errors import BadInput, LabError, LabTimeout, MissingTool, NotSupported
from helpers._core import names
from helpers._core.names import CACHE

GUESTS = Path(__file__).with_name("guests")

# Guest-physical layout. RAM starts at 0; devices live above it (on a PC, the 640 KiB
# boundary is where the VGA memory and option ROMs begin).
MEMORY = 0xA0000      # default RAM size: the PC's conventional 640 KiB
GDT = 0x1000          # protected and long mode: null, code32, data, code64 descriptors
PAGE_TABLES = 0x2000  # long mode: PML4, PDPT, PD (identity-maps the first 1 GiB, 2 MiB pages)
ENTRY = 0x8000        # where guest code is loaded and starts; the stack grows down from here
_IDENTITY_MAPPED = 1 << 30
_TSS = 0x7FFFD000     # three pages no RAM or device uses, for KVM's real mode on older Intel CPUs


# --- linux/kvm.h and asm/kvm.h, field for field -------------------------------------------------

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
REGISTERS = ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()


class Regs(ctypes.Structure):
    """struct kvm_regs: the general-purpose registers, rip and rflags."""
    _fields_ = [(name, u64) for name in REGISTERS]

    def __repr__(self) -> str:
        shown = " ".join(f"{n}={getattr(self, n):#x}" for n in REGISTERS if getattr(self, n))
        return f"Regs({shown})"


class Segment(ctypes.Structure):
    """struct kvm_segment: a segment register with its hidden (descriptor-cache) part."""
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    """struct kvm_dtable: GDTR or IDTR."""
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    """struct kvm_sregs: segments, descriptor tables, control registers, EFER."""
    _fields_ = ([(name, Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", DTable), ("idt", DTable)]
                + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])


class UserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region: this much of our memory is guest RAM at that address."""
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class _Io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _Mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _Internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _FailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ExitInfo(ctypes.Union):
    _fields_ = [("io", _Io), ("mmio", _Mmio), ("internal", _Internal), ("fail_entry", _FailEntry),
                ("padding", ctypes.c_char * 256)]


class Run(ctypes.Structure):
    """The start of struct kvm_run, the page KVM_RUN shares with us (the union we read)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _ExitInfo)]


_MMIO_DATA = Run.exit.offset + _Mmio.data.offset


def _ioc(direction, nr, struct=None):
    """The ioctl number, as linux/ioctl.h's _IOC builds it: direction, size, type 0xAE, number."""
    size = ctypes.sizeof(struct) if struct else 0
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


_NONE, _WRITE, _READ = 0, 1, 2
KVM_GET_API_VERSION = _ioc(_NONE, 0x00)
KVM_CREATE_VM = _ioc(_NONE, 0x01)
KVM_CHECK_EXTENSION = _ioc(_NONE, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _ioc(_NONE, 0x04)
KVM_CREATE_VCPU = _ioc(_NONE, 0x41)
KVM_SET_USER_MEMORY_REGION = _ioc(_WRITE, 0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _ioc(_NONE, 0x47)
KVM_RUN = _ioc(_NONE, 0x80)
KVM_GET_REGS = _ioc(_READ, 0x81, Regs)
KVM_SET_REGS = _ioc(_WRITE, 0x82, Regs)
KVM_GET_SREGS = _ioc(_READ, 0x83, Sregs)
KVM_SET_SREGS = _ioc(_WRITE, 0x84, Sregs)
KVM_CAP_SET_TSS_ADDR = 4


class Exit(enum.IntEnum):
    """Why KVM_RUN returned (KVM_EXIT_* in linux/kvm.h; the ones an x86 guest can cause here)."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30


INTERNAL_ERRORS = {1: "EMULATION (KVM could not emulate an instruction)",
                   2: "SIMUL_EX (an exception while delivering another)",
                   3: "DELIVERY_EV (an event could not be delivered)",
                   4: "UNEXPECTED_EXIT_REASON"}


_EXIT_NAMES = {reason.value: reason.name for reason in Exit}


def _exit_name(number):
    return _EXIT_NAMES.get(number, f"EXIT_{number}")


# --- errors ---------------------------------------------------------------------------------------

class GuestError(LabError):
    """The guest stopped in a way the hypervisor cannot carry on from.

    ``reason`` is the exit reason, ``regs`` the guest registers at that moment, ``exits`` the
    exits counted so far. A device raises one with only a message; ``run()`` fills in the rest.
    """

    def __init__(self, message: str, *, reason: str | None = None, regs: Regs | None = None,
                 exits: collections.Counter | None = None, fix: str | None = None) -> None:
        self.reason, self.regs, self.exits = reason, regs, exits
        super().__init__(message, fix=fix)

    def __str__(self) -> str:
        where = ""
        if self.regs is not None:
            where = " at " + " ".join(f"{n}={getattr(self.regs, n):#x}" for n in
                                      ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rflags"))
        head = f"{self.reason}: {self.message}" if self.reason else self.message
        return head + where + (f": {self.fix}" if self.fix else "")


class UnhandledExit(GuestError):
    """An exit no device or rule here handles: a port or an address nobody claims, or a new reason."""


class TripleFault(GuestError):
    """KVM_EXIT_SHUTDOWN: a fault while handling a fault while handling a fault; a real CPU resets."""


class InternalError(GuestError):
    """KVM_EXIT_INTERNAL_ERROR: KVM itself could not go on (most often: an instruction it cannot emulate)."""


class EntryFailed(GuestError):
    """KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest with this register state."""


class DeviceError(GuestError):
    """A device refused what the guest asked of it (a bad descriptor, an impossible access)."""


class TooManyExits(GuestError, LabTimeout):
    """The guest kept exiting without halting: probably a loop around an ``out``."""


# --- guest programs -------------------------------------------------------------------------------

def guest(name: str, *, at: int = ENTRY, **symbols: int) -> bytes:
    """Machine code of ``helpers/guests/<name>.S``; ``symbols`` become ``--defsym NAME=value``."""
    path = GUESTS / f"{name}.S"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GUESTS.glob("*.S")))
        raise BadInput(f"no guest program {name!r}", fix=f"use one of: {known}")
    return assemble(path.read_text(), at=at, name=name, **symbols)


def assemble(source: str, *, at: int = ENTRY, name: str = "guest", **symbols: int) -> bytes:
    """Assemble GNU ``as`` source into a flat binary that runs at guest-physical ``at``.

    The result is cached under ``CACHE/guests`` by a hash of everything that goes in.
    """
    for key, value in symbols.items():
        if not key.isidentifier() or not isinstance(value, int):
            raise BadInput(f"symbol {key}={value!r} is not NAME=integer")
    for tool in ("as", "ld"):
        if not shutil.which(tool):
            raise MissingTool(tool, package="binutils")
    defsyms = [f"--defsym={key}={value}" for key, value in sorted(symbols.items())]
    digest = hashlib.sha256("\0".join([source, hex(at), *defsyms]).encode()).hexdigest()[:16]
    cached = CACHE / "guests" / f"{name}-{digest}.bin"
    if cached.is_file():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="guest-") as tmp:
        src, obj, out = (Path(tmp, f"{name}{ext}") for ext in (".S", ".o", ".bin"))
        src.write_text(source)
        for command in (["as", "--64", *defsyms, "-o", obj, src],
                        ["ld", f"-Ttext={at:#x}", f"-e{at:#x}", "--oformat=binary", "-o", out, obj]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise BadInput(f"{command[0]} rejected guest {name!r}:\n{done.stderr.strip()}",
                               fix="fix the assembly source")
        code = out.read_bytes()
    names.publish(cached, code)
    return code


def disassemble(code: bytes, *, mode: str = "real", at: int = ENTRY) -> str:
    """objdump's reading of guest machine code: one ``address: bytes  instruction`` line each."""
    if mode not in _OBJDUMP:
        raise BadInput(f"mode={mode!r}: use one of {', '.join(_OBJDUMP)}")
    if not shutil.which("objdump"):
        raise MissingTool("objdump", package="binutils")
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(code)
        f.flush()
        done = subprocess.run(["objdump", "-D", "-b", "binary", "-m", _OBJDUMP[mode],
                               f"--adjust-vma={at:#x}", f.name], capture_output=True, text=True, check=True)
    lines = [line.strip().replace("\t", "  ") for line in done.stdout.splitlines() if ":\t" in line]
    return "\n".join(lines)


_OBJDUMP = {"real": "i8086", "protected": "i386", "long": "i386:x86-64"}


# --- devices --------------------------------------------------------------------------------------

class Serial:
    """COM1, the part of a 16550 UART a simple guest uses: write a byte, read a byte, poll status.

    Every access is one trapped ``in``/``out``: this is full emulation of a real device.
    ``output`` collects what the guest wrote; ``input`` is what it will read.
    """
    THR = RBR = 0    # transmit (write) / receive (read) buffer
    LSR = 5          # line status: bit 0 data ready, bits 5-6 transmitter empty
    ports = range(0x3F8, 0x400)

    def __init__(self, input: bytes = b"") -> None:
        self.output = bytearray()
        self.input = collections.deque(input)
        self._registers = bytearray(8)   # IER, FCR, LCR, MCR, scratch: kept, not acted on

    def write(self, offset: int, value: int, size: int) -> None:
        if offset == self.THR:
            self.output.append(value & 0xFF)
        else:
            self._registers[offset] = value & 0xFF

    def read(self, offset: int, size: int) -> int:
        if offset == self.RBR:
            return self.input.popleft() if self.input else 0
        if offset == self.LSR:
            return 0x60 | (1 if self.input else 0)
        return self._registers[offset]


class _Bus:
    """Which device answers a port or a guest-physical address. Checked before the guest runs.

    A device is any object with ``ports`` (a range of I/O ports) or ``mmio`` (a range of
    guest-physical addresses above RAM), ``read(offset, size) -> int`` and
    ``write(offset, value, size)``, offsets counted from the start of its range.
    """

    def __init__(self, devices, ram):
        self.ports, self.mmio = [], []
        for device in devices:
            for space, claim in (("ports", self.ports), ("mmio", self.mmio)):
                window = getattr(device, space, None)
                if not window:
                    continue
                for other, taken in claim:
                    if window.start < taken.stop and taken.start < window.stop:
                        raise BadInput(f"{type(device).__name__} and {type(other).__name__} both "
                                       f"claim {space} {window.start:#x}-{window.stop - 1:#x}")
                if space == "mmio" and window.start < ram:
                    raise BadInput(f"{type(device).__name__} at {window.start:#x} is inside guest RAM "
                                   f"(0-{ram - 1:#x}): the guest would read memory, never the device",
                                   fix="put MMIO devices above the VM's memory")
                claim.append((device, window))

    @staticmethod
    def find(claim, address):
        for device, window in claim:
            if address in window:
                return device, address - window.start
        return None, None


# --- the VM and its vCPU --------------------------------------------------------------------------

def _ioctl(fd, request, arg=0, what=""):
    if fd is None:
        raise BadInput(f"{what or hex(request)}: this VM or vCPU is closed")
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise OSError(e.errno, f"{what or hex(request)}: {e.strerror}", "/dev/kvm") from e


@dataclass
class Result:
    """What one ``run()`` did: exits by reason, what the guest wrote, the final registers.

    ``output`` joins the ``output`` of every device that has one (the serial port, a ring).
    """
    exits: collections.Counter
    output: bytes
    regs: Regs
    seconds: float


class VM:
    """A virtual machine: /dev/kvm, a VM fd, ``memory`` bytes of RAM at guest-physical 0.

    A context manager; closing it closes its vCPUs, unmaps its memory and closes every fd.
    """

    def __init__(self, memory: int = MEMORY) -> None:
        if not isinstance(memory, int) or memory < 0x10000 or memory % mmap.PAGESIZE \
                or memory > _IDENTITY_MAPPED:
            raise BadInput(f"memory={memory!r}: give a multiple of {mmap.PAGESIZE} bytes "
                           f"between 64 KiB and 1 GiB")
        self.memory_size = memory
        self._vcpus, self._kvm, self._fd, self._memory = [], None, None, None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        try:
            self._kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            fix = ("run as root, or join the group that owns /dev/kvm" if isinstance(e, PermissionError) else
                   "load kvm_intel or kvm_amd (VT-x/AMD-V on in the firmware; on a cloud VM, a machine "
                   "type with nested virtualization)")
            raise NotSupported(f"cannot open /dev/kvm: {e.strerror}", fix=fix) from e
        if (api := _ioctl(self._kvm, KVM_GET_API_VERSION)) != 12:
            raise NotSupported(f"KVM API version {api}, this hypervisor speaks 12")
        self._fd = _ioctl(self._kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        if _ioctl(self._kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR):
            _ioctl(self._fd, KVM_SET_TSS_ADDR, _TSS, "KVM_SET_TSS_ADDR")
        self._memory = mmap.mmap(-1, self.memory_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        region = UserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=self.memory_size,
                                       userspace_addr=address)
        _ioctl(self._fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self._vcpu_mmap_size = _ioctl(self._kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def _span(self, address, size):
        if address < 0 or size < 0 or address + size > self.memory_size:
            raise BadInput(f"{size} bytes at {address:#x} are outside guest RAM "
                           f"(0-{self.memory_size - 1:#x})")
        return slice(address, address + size)

    def load(self, code: bytes, at: int = ENTRY) -> None:
        """Copy guest code (or data) into guest RAM at guest-physical ``at``."""
        self.write(at, code)

    def write(self, address: int, data: bytes) -> None:
        self._memory[self._span(address, len(data))] = bytes(data)

    def read(self, address: int, size: int) -> bytes:
        return bytes(self._memory[self._span(address, size)])

    def vcpu(self, *, mode: str = "real", entry: int = ENTRY) -> "VCPU":
        """A new vCPU, its registers set up to start at ``entry`` in ``mode``."""
        if mode not in _MODES:
            raise BadInput(f"mode={mode!r}: use one of {', '.join(_MODES)}")
        cpu = VCPU(self, len(self._vcpus))
        self._vcpus.append(cpu)
        try:
            cpu.reset(mode=mode, entry=entry)
        except BaseException:
            cpu.close()
            raise
        return cpu

    def close(self) -> None:
        for cpu in self._vcpus:
            cpu.close()
        if self._memory is not None:
            self._memory.close()
        for fd in (self._fd, self._kvm):
            if fd is not None:
                os.close(fd)
        self._fd = self._kvm = self._memory = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VCPU:
    """A virtual CPU: its fd, the kvm_run page it shares with the kernel, and the exit loop."""

    def __init__(self, vm: VM, index: int) -> None:
        self.vm = vm
        self._fd = _ioctl(vm._fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            self._page = mmap.mmap(self._fd, vm._vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def regs(self) -> Regs:
        regs = Regs()
        _ioctl(self._fd, KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    @regs.setter
    def regs(self, regs: Regs) -> None:
        _ioctl(self._fd, KVM_SET_REGS, regs, "KVM_SET_REGS")

    @property
    def sregs(self) -> Sregs:
        sregs = Sregs()
        _ioctl(self._fd, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    @sregs.setter
    def sregs(self, sregs: Sregs) -> None:
        _ioctl(self._fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def reset(self, *, mode: str = "real", entry: int = ENTRY) -> None:
        sregs = self.sregs
        _MODES[mode](self.vm, sregs)
        self.sregs = sregs
        self.regs = Regs(rip=entry, rsp=entry, rflags=0x2)   # bit 1 of rflags is always set

    def run(self, devices: Iterable[Any] | None = None, *, max_exits: int = 100_000) -> Result:
        """Run until the guest halts; handle its exits with ``devices`` (default: one Serial).

        Raises a ``GuestError`` naming the exit reason and the registers for anything else,
        and ``TooManyExits`` after ``max_exits`` exits without a ``hlt``. Interrupting the
        kernel (Ctrl-C) stops a guest that loops without exiting.
        """
        if not isinstance(max_exits, int) or max_exits < 1:
            raise BadInput(f"max_exits={max_exits!r}: give a positive number")
        devices = [Serial()] if devices is None else list(devices)
        bus = _Bus(devices, self.vm.memory_size)
        exits = collections.Counter()
        start = time.perf_counter()
        for _ in range(max_exits):
            self._enter()
            run = Run.from_buffer_copy(self._page[:ctypes.sizeof(Run)])   # a copy: no pointer into the page
            reason = _exit_name(run.exit_reason)
            exits[reason] += 1
            if run.exit_reason == Exit.HLT:
                break
            try:
                self._handle(run, bus)
            except GuestError as e:        # raised by us or by a device: say where the guest was
                e.reason, e.regs, e.exits = e.reason or reason, self.regs, exits
                raise
        else:
            raise TooManyExits(f"{max_exits} exits and no hlt", reason=reason, regs=self.regs, exits=exits,
                               fix="raise max_exits, or look for a loop around an exit in the guest")
        seconds = time.perf_counter() - start
        output = b"".join(bytes(d.output) for d in devices if hasattr(d, "output"))
        return Result(exits=exits, output=output, regs=self.regs, seconds=seconds)

    def _enter(self):
        """KVM_RUN: run the guest until it exits. A signal (Ctrl-C) also returns here."""
        while True:
            try:
                return _ioctl(self._fd, KVM_RUN, 0, "KVM_RUN")
            except InterruptedError:   # a signal whose handler did not raise: just go back in
                continue

    def _handle(self, run, bus):
        reason, info = run.exit_reason, run.exit
        if reason == Exit.IO:
            self._io(info.io, bus)
        elif reason == Exit.MMIO:
            self._mmio(info.mmio, bus)
        elif reason == Exit.SHUTDOWN:
            raise TripleFault("the guest triple-faulted (a fault with no usable IDT to handle it)",
                              fix="look at the instruction at rip")
        elif reason == Exit.INTERNAL_ERROR:
            what = INTERNAL_ERRORS.get(info.internal.suberror, f"suberror {info.internal.suberror}")
            data = " ".join(f"{d:#x}" for d in info.internal.data[:min(info.internal.ndata, 16)])
            raise InternalError(f"KVM internal error {what}" + (f", data {data}" if data else ""),
                                fix="the guest did something KVM cannot emulate; look at rip")
        elif reason == Exit.FAIL_ENTRY:
            raise EntryFailed("the CPU refused to enter the guest, hardware reason "
                              f"{info.fail_entry.hardware_entry_failure_reason:#x}",
                              fix="check the segment and control registers set by reset()")
        else:
            raise UnhandledExit("this hypervisor does not handle this exit")

    def _io(self, io, bus):
        out = io.direction == 1
        device, offset = bus.find(bus.ports, io.port)
        if device is None:
            raise UnhandledExit(f"{'out to' if out else 'in from'} port {io.port:#x}: no device claims it",
                                fix="give run() a device for that port, or fix the guest")
        # A string instruction (rep outsb / insb) is one exit for `count` items in the page.
        for i in range(io.count):
            at = io.data_offset + i * io.size
            if out:
                device.write(offset, int.from_bytes(self._page[at:at + io.size], "little"), io.size)
            else:
                self._page[at:at + io.size] = (device.read(offset, io.size) & ((1 << 8 * io.size) - 1)) \
                    .to_bytes(io.size, "little")

    def _mmio(self, mmio, bus):
        device, offset = bus.find(bus.mmio, mmio.phys_addr)
        if device is None:
            raise UnhandledExit(f"{'write to' if mmio.is_write else 'read from'} {mmio.phys_addr:#x}: "
                                "no RAM and no device there", fix="give run() a device at that address, "
                                "or fix the guest's pointer")
        if mmio.is_write:
            device.write(offset, int.from_bytes(bytes(mmio.data)[:mmio.len], "little"), mmio.len)
        else:   # the answer goes into kvm_run.mmio.data; the next KVM_RUN completes the load
            value = device.read(offset, mmio.len) & ((1 << 8 * mmio.len) - 1)
            self._page[_MMIO_DATA:_MMIO_DATA + mmio.len] = value.to_bytes(mmio.len, "little")

    def close(self) -> None:
        if self._fd is None:
            return
        self._page.close()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- CPU modes: what a bootloader would have set up before jumping to the guest -----------------

def _flat(segment, selector, *, code, long=False):
    """A segment covering all 4 GiB, like the GDT descriptor we wrote for it."""
    segment.base, segment.limit, segment.selector = 0, 0xFFFFFFFF, selector
    segment.type = 0xB if code else 0x3          # execute/read or read/write, accessed
    segment.present, segment.dpl, segment.s, segment.g = 1, 0, 1, 1
    segment.l, segment.db = (1, 0) if long else (0, 1)


# null, code32 (0x08), data (0x10), code64 (0x18): base 0, limit 4 GiB, ring 0
_DESCRIPTORS = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF)
CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_LMA = 1, 1 << 31, 1 << 5, 1 << 8, 1 << 10


def _real(vm, sregs):
    for segment in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        segment.base = segment.selector = 0


def _protected(vm, sregs, *, long=False):
    vm.load(b"".join(d.to_bytes(8, "little") for d in _DESCRIPTORS), at=GDT)
    sregs.gdt.base, sregs.gdt.limit = GDT, 8 * len(_DESCRIPTORS) - 1
    _flat(sregs.cs, 0x18 if long else 0x08, code=True, long=long)
    for segment in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat(segment, 0x10, code=False)
    sregs.cr0 |= CR0_PE


def _long(vm, sregs):
    pml4, pdpt, pd = PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000
    present_writable, huge = 0x3, 0x80
    vm.load((pdpt | present_writable).to_bytes(8, "little"), at=pml4)
    vm.load((pd | present_writable).to_bytes(8, "little"), at=pdpt)
    vm.load(b"".join(((i << 21) | present_writable | huge).to_bytes(8, "little") for i in range(512)), at=pd)
    _protected(vm, sregs, long=True)
    sregs.cr3, sregs.cr4 = pml4, sregs.cr4 | CR4_PAE
    sregs.cr0 |= CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA


_MODES = {"real": _real, "protected": _protected, "long": _long}
MODES = tuple(_MODES)


_HELLO = {"real": "hello", "protected": "protected", "long": "long"}


@functools.cache
def refused(mode: str) -> str | None:
    """None if this machine's KVM runs ``mode`` guests, else why not (for skips and notebooks).

    Only the hypervisor's refusals count: an ioctl it fails, or an entry it rejects. A triple
    fault or an unhandled exit is the guest program's own fault, and raises.
    """
    try:
        with VM() as vm:
            vm.load(guest(_HELLO[mode]))
            vm.vcpu(mode=mode).run(max_exits=1000)
    except (EntryFailed, OSError, NotSupported) as e:
        return f"{mode} mode refused by this machine's KVM: {e}"
    return None


@dataclass(frozen=True)
class Backend:
    """Who implements /dev/kvm here: a kernel module, and the CPU extension it relies on (if any)."""
    module: str | None        # kvm_intel, kvm_amd, or kvm_pvm (no hardware extension needed)
    extension: str | None     # "vmx" (Intel VT-x), "svm" (AMD-V), or None


def backend(modules: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo") -> Backend:
    module = next((m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(modules, m).is_dir()), None)
    flags = set()
    with open(cpuinfo) as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    return Backend(module, next((x for x in ("vmx", "svm") if x in flags), None))
