"""Paravirtualization, measured: the same job through an emulated device and through a ring.

The job: a guest has 4 KiB in its memory and writes them to a device.

- *Emulated*: the guest drives a 16550 UART (``kvm.Serial``), one ``out`` per byte, and
  every ``out`` is a VM exit. The guest needs no special driver; it pays 4096 exits.
- *Paravirtual*: the guest knows it is virtual. It puts descriptors of its buffers in a
  ring in shared memory and rings a doorbell once; the host reads the bytes straight from
  guest memory. That is virtio's split virtqueue (descriptor table, available ring, used
  ring) with a virtio-mmio style register window, simplified: one queue, the ring address
  agreed in advance instead of negotiated, and no interrupt back to the guest.

Then the other direction: is *this* machine a guest, and what paravirtual features does
its hypervisor offer? (CPUID, the clocksource, virtio devices.)

Used in: 12-paravirtualization, book/virtualization/paravirtualization.
"""
import collections
import ctypes
import mmap
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.virt import kvm
from helpers.errors import BadInput

# Guest-physical layout, shared by the guest programs (as --defsym symbols) and the device.
# Everything sits below 64 KiB so that a real-mode guest reaches it with ds = 0.
PAYLOAD = 0x9000      # the 4 KiB the guest writes
QUEUE_SIZE = 256      # descriptors in the ring (virtio's usual size)
DESC = 0xA000         # descriptor table: QUEUE_SIZE x {u64 addr, u32 len, u16 flags, u16 next}
AVAIL = 0xB000        # available ring (guest -> host): u16 flags, u16 idx, u16 ring[QUEUE_SIZE]
USED = 0xC000         # used ring (host -> guest): u16 flags, u16 idx, {u32 id, u32 len}[QUEUE_SIZE]
DEVICE = 0xD0000      # the device's register window, above the VM's 640 KiB of RAM
JOB = b"".join(f"line {i:02d}: the same 4 KiB to a device, byte by byte or in a batch"
               .ljust(63)[:63].encode() + b"\n" for i in range(64))
STYLES = ("emulated", "paravirtual")


class RingConsole:
    """A console the guest feeds through a ring in shared memory, with one doorbell per batch.

    Registers (virtio-mmio offsets): 0x000 MagicValue "virt", 0x004 Version, 0x008 DeviceID
    (3, console), 0x050 QueueNotify (write: the doorbell), 0x070 Status (read/write).
    """
    MAGIC, VERSION, DEVICE_ID, QUEUE_NOTIFY, STATUS = 0x000, 0x004, 0x008, 0x050, 0x070
    NEXT = 1              # descriptor flag: the buffer continues in descriptor `next`

    def __init__(self, vm: kvm.VM, *, base: int = DEVICE) -> None:
        self.vm = vm
        self.mmio = range(base, base + 0x200)
        self.output = bytearray()
        self.status = 0
        self.notifications = 0    # doorbells rung
        self.buffers = 0          # buffers (descriptor chains) consumed
        self._last_avail = 0      # the next available-ring entry the device has not consumed

    def read(self, offset: int, size: int) -> int:
        registers = {self.MAGIC: int.from_bytes(b"virt", "little"), self.VERSION: 2,
                     self.DEVICE_ID: 3, self.STATUS: self.status}
        if offset not in registers:
            raise kvm.DeviceError(f"RingConsole has no readable register at offset {offset:#x}")
        return registers[offset]

    def write(self, offset: int, value: int, size: int) -> None:
        if offset == self.STATUS:
            self.status = value
        elif offset == self.QUEUE_NOTIFY:
            self.notifications += 1
            self._drain()
        else:
            raise kvm.DeviceError(f"RingConsole has no writable register at offset {offset:#x}")

    def _u16(self, address):
        return int.from_bytes(self.vm.read(address, 2), "little")

    def _drain(self):
        """Consume every buffer the guest made available since the last doorbell."""
        avail_idx = self._u16(AVAIL + 2)
        while self._last_avail != avail_idx:
            head = self._u16(AVAIL + 4 + 2 * (self._last_avail % QUEUE_SIZE))
            length = self._consume_chain(head)
            used_idx = self._u16(USED + 2)
            slot = USED + 4 + 8 * (used_idx % QUEUE_SIZE)
            self.vm.write(slot, struct.pack("<II", head, length))
            self.vm.write(USED + 2, struct.pack("<H", (used_idx + 1) & 0xFFFF))
            self._last_avail = (self._last_avail + 1) & 0xFFFF
            self.buffers += 1

    def _consume_chain(self, index):
        """Copy out one chain of descriptors; never trust a pointer or a length from the guest."""
        total = 0
        for _ in range(QUEUE_SIZE):
            if index >= QUEUE_SIZE:
                raise kvm.DeviceError(f"descriptor index {index} is outside the ring of {QUEUE_SIZE}")
            addr, length, flags, following = struct.unpack("<QIHH", self.vm.read(DESC + 16 * index, 16))
            try:
                self.output += self.vm.read(addr, length)
            except BadInput as e:
                raise kvm.DeviceError(f"descriptor {index} points at {length} bytes at {addr:#x}, "
                                      "outside guest RAM") from e
            total += length
            if not flags & self.NEXT:
                return total
            index = following
        raise kvm.DeviceError(f"descriptor chain longer than the ring ({QUEUE_SIZE}): a loop")


def _check(style, payload, chunk):
    if style not in STYLES:
        raise BadInput(f"style={style!r}: use one of {', '.join(STYLES)}")
    if not 0 < len(payload) <= DESC - PAYLOAD:
        raise BadInput(f"payload of {len(payload)} bytes: give 1 to {DESC - PAYLOAD} bytes")
    if chunk <= 0 or len(payload) % chunk or len(payload) // chunk > QUEUE_SIZE:
        raise BadInput(f"chunk={chunk}: it must divide the {len(payload)}-byte payload into at most "
                       f"{QUEUE_SIZE} pieces")


def prepare(vm: kvm.VM, style: str, *, payload: bytes = JOB, chunk: int = 512) -> kvm.Serial | RingConsole:
    """Load the payload and the guest program for ``style`` into ``vm``; return the device to give run().

    ``chunk``: bytes per descriptor on the paravirtual path (all posted before one doorbell).
    """
    _check(style, payload, chunk)
    symbols = dict(PAYLOAD=PAYLOAD, LENGTH=len(payload))
    if style == "paravirtual":
        symbols.update(CHUNK=chunk, DESC=DESC, AVAIL=AVAIL, USED=USED, DEVICE=DEVICE)
    vm.load(payload, at=PAYLOAD)
    vm.load(kvm.guest(style, **symbols))
    return kvm.Serial() if style == "emulated" else RingConsole(vm)


def transfer(style: str, *, payload: bytes = JOB, chunk: int = 512) -> kvm.Result:
    """Do the job once in a fresh real-mode VM, ``emulated`` or ``paravirtual``; return the ``kvm.Result``."""
    _check(style, payload, chunk)        # bad input fails before a VM exists
    with kvm.VM() as vm:
        device = prepare(vm, style, payload=payload, chunk=chunk)
        return vm.vcpu(mode="real").run(devices=[device])


@dataclass
class Comparison:
    """Both styles of the same job: exits of the last run, median seconds over ``runs`` runs."""
    exits: dict            # style -> Counter of exits (the guests are deterministic: same every run)
    seconds: dict          # style -> median seconds
    runs: int

    @property
    def exit_ratio(self) -> float:
        return self.exits["emulated"].total() / self.exits["paravirtual"].total()

    @property
    def time_ratio(self) -> float:
        return self.seconds["emulated"] / self.seconds["paravirtual"]


def compare(runs: int = 5, **options: Any) -> Comparison:
    """Run each style ``runs`` times (interleaved, so both see the same machine load)."""
    exits, times = {}, collections.defaultdict(list)
    for _ in range(runs):
        for style in STYLES:
            result = transfer(style, **options)
            if result.output != options.get("payload", JOB):
                raise kvm.DeviceError(f"the {style} device received {len(result.output)} bytes "
                                      "that are not the payload")
            exits[style] = result.exits
            times[style].append(result.seconds)
    return Comparison(exits, {s: statistics.median(t) for s, t in times.items()}, runs)


# --- is this machine a guest? --------------------------------------------------------------------

# A host function (not a guest!) ``void cpuid(u32 leaf, u32 subleaf, u32 out[4])``, SysV ABI:
_CPUID = bytes([
    0x53,                    # push %rbx           (rbx is callee-saved; cpuid overwrites it)
    0x89, 0xF8,              # mov  %edi,%eax      leaf
    0x89, 0xF1,              # mov  %esi,%ecx      subleaf
    0x49, 0x89, 0xD0,        # mov  %rdx,%r8       out
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov  %eax,(%r8)
    0x41, 0x89, 0x58, 0x04,  # mov  %ebx,4(%r8)
    0x41, 0x89, 0x48, 0x08,  # mov  %ecx,8(%r8)
    0x41, 0x89, 0x50, 0x0C,  # mov  %edx,12(%r8)
    0x5B,                    # pop  %rbx
    0xC3,                    # ret
])


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """Execute CPUID on this machine's CPU (natively, in this process); return eax, ebx, ecx, edx.

    Inside a VM the hypervisor intercepts CPUID, so what comes back is what it chose to say.
    """
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        page.write(_CPUID)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                    ctypes.POINTER(ctypes.c_uint32 * 4))(address)
        out = (ctypes.c_uint32 * 4)()
        function(leaf, subleaf, ctypes.byref(out))
        del function
        return tuple(out)
    finally:
        page.close()


# KVM_FEATURE_* bits of CPUID 0x40000001 eax (asm/kvm_para.h)
KVM_FEATURES = {0: "clocksource", 1: "nop_io_delay", 2: "mmu_op", 3: "clocksource2", 4: "async_pf",
                5: "steal_time", 6: "pv_eoi", 7: "pv_unhalt", 9: "pv_tlb_flush", 10: "async_pf_vmexit",
                11: "pv_send_ipi", 12: "poll_control", 13: "pv_sched_yield", 14: "async_pf_int",
                15: "msi_ext_dest_id", 16: "hc_map_gpa_range", 17: "migration_control",
                24: "clocksource_stable"}
# virtio device IDs (the virtio spec, "Device Types")
VIRTIO_TYPES = {1: "net", 2: "block", 3: "console", 4: "entropy (rng)", 5: "memory balloon", 9: "9p",
                16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 26: "fs", 27: "pmem", 41: "sound"}


@dataclass(frozen=True)
class Machine:
    """What this machine tells about being a virtual machine."""
    hypervisor_bit: bool       # CPUID leaf 1, ecx bit 31: "you are running under a hypervisor"
    vendor: str                # CPUID leaf 0x40000000 ebx,ecx,edx: "KVMKVMKVM", "Microsoft Hv", ...
    max_leaf: int              # the highest hypervisor leaf
    features: tuple            # paravirtual features the hypervisor offers (KVM only)
    clocksource: str
    clocksources: tuple        # the ones available
    virtio: tuple              # (name, device type, driver) for each virtio device


def machine(sysfs: str = "/sys") -> Machine:
    hypervisor = bool(cpuid(1)[2] >> 31 & 1)
    vendor, max_leaf = "", 0
    features: tuple[str, ...] = ()
    if hypervisor:
        max_leaf, *signature = cpuid(0x40000000)
        vendor = b"".join(r.to_bytes(4, "little") for r in signature).rstrip(b"\0").decode(errors="replace")
        if vendor == "KVMKVMKVM" and max_leaf >= 0x40000001:
            eax = cpuid(0x40000001)[0]
            features = tuple(name for bit, name in sorted(KVM_FEATURES.items()) if eax >> bit & 1)
    clock = Path(sysfs, "devices/system/clocksource/clocksource0")
    current = (clock / "current_clocksource").read_text().strip() if clock.is_dir() else ""
    available = tuple((clock / "available_clocksource").read_text().split()) if clock.is_dir() else ()
    devices = []
    bus = Path(sysfs, "bus/virtio/devices")
    for dev in sorted(bus.iterdir()) if bus.is_dir() else ():
        kind = int((dev / "device").read_text(), 16)
        driver = (dev / "driver").resolve().name if (dev / "driver").exists() else None
        devices.append((dev.name, VIRTIO_TYPES.get(kind, f"type {kind}"), driver))
    return Machine(hypervisor, vendor, max_leaf, features, current, available, tuple(devices))
