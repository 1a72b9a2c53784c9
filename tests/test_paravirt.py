"""helpers.paravirt: the same 4 KiB through an emulated UART and through a ring, and this machine's facts."""
import struct

import pytest

from helpers import BadInput, kvm, paravirt

kvm_only = pytest.mark.requires("kvm")


# --- the job, both ways ------------------------------------------------------------------------------

@kvm_only
def test_emulated_path_is_one_io_exit_per_byte():
    result = paravirt.transfer("emulated")
    assert result.output == paravirt.JOB and len(paravirt.JOB) == 4096
    assert result.exits == {"IO": 4096, "HLT": 1}


@kvm_only
@pytest.mark.parametrize("chunk", [4096, 512, 16])
def test_paravirtual_path_is_one_doorbell_whatever_the_number_of_buffers(chunk):
    result = paravirt.transfer("paravirtual", chunk=chunk)
    assert result.output == paravirt.JOB
    assert result.exits == {"MMIO": 1, "HLT": 1}
    assert result.regs.rax & 0xFFFF == 4096 // chunk     # used.idx, read by the guest after the doorbell


@kvm_only
def test_paravirtual_is_at_least_10x_fewer_exits_and_5x_less_time():
    comparison = paravirt.compare(runs=3)
    assert comparison.exit_ratio == 4097 / 2
    assert comparison.time_ratio >= 5, comparison.seconds


def test_bad_jobs_fail_before_a_vm_exists():
    with pytest.raises(BadInput, match="style='dma'"):
        paravirt.transfer("dma")
    with pytest.raises(BadInput, match="chunk=1000"):
        paravirt.transfer("paravirtual", chunk=1000)
    with pytest.raises(BadInput, match="at most 256"):
        paravirt.transfer("paravirtual", chunk=8)
    with pytest.raises(BadInput, match="payload of 5000 bytes"):
        paravirt.transfer("emulated", payload=b"x" * 5000)


# --- the device, driven from the guest and from the host -----------------------------------------------

@kvm_only
def test_a_driver_probes_the_device_through_mmio():
    with kvm.VM() as vm:
        vm.load(kvm.guest("probe", DEVICE=paravirt.DEVICE))
        device = paravirt.RingConsole(vm)
        result = vm.vcpu().run(devices=[device])
    regs = result.regs
    assert (regs.rax, regs.rbx, regs.rcx) == (int.from_bytes(b"virt", "little"), 2, 3)
    assert device.status == 3
    assert result.exits == {"MMIO": 4, "HLT": 1}


def post(vm, descriptors, heads):
    """Be the guest driver from the host side: fill descriptors, make `heads` available."""
    for index, (addr, length, flags, following) in descriptors.items():
        vm.write(paravirt.DESC + 16 * index, struct.pack("<QIHH", addr, length, flags, following))
    for slot, head in enumerate(heads):
        vm.write(paravirt.AVAIL + 4 + 2 * slot, struct.pack("<H", head))
    vm.write(paravirt.AVAIL + 2, struct.pack("<H", len(heads)))


@kvm_only
def test_the_device_follows_chains_and_fills_the_used_ring():
    with kvm.VM() as vm:
        vm.write(0x9000, b"hello, ring")
        device = paravirt.RingConsole(vm)
        post(vm, {0: (0x9000, 5, device.NEXT, 7), 7: (0x9005, 6, 0, 0), 1: (0x9000, 2, 0, 0)}, heads=[0, 1])
        device.write(device.QUEUE_NOTIFY, 0, 4)
        assert device.output == b"hello, ringhe"
        assert (device.notifications, device.buffers) == (1, 2)
        used_idx, = struct.unpack("<H", vm.read(paravirt.USED + 2, 2))
        assert used_idx == 2
        assert struct.unpack("<IIII", vm.read(paravirt.USED + 4, 16)) == (0, 11, 1, 2)   # (head, bytes) each
        device.write(device.QUEUE_NOTIFY, 0, 4)               # a doorbell with nothing new: nothing happens
        assert device.buffers == 2


@kvm_only
@pytest.mark.parametrize("descriptors, complaint", [
    ({0: (0x9_0000_0000, 16, 0, 0)}, "outside guest RAM"),
    ({0: (0x9000, 16, 1, 0)}, "a loop"),
    ({0: (0x9000, 16, 1, 300)}, "outside the ring"),
])
def test_the_device_never_trusts_a_descriptor(descriptors, complaint):
    with kvm.VM() as vm:
        device = paravirt.RingConsole(vm)
        post(vm, descriptors, heads=[0])
        with pytest.raises(kvm.DeviceError, match=complaint):
            device.write(device.QUEUE_NOTIFY, 0, 4)


@kvm_only
def test_a_bad_descriptor_from_a_guest_stops_it_with_its_registers():
    source = f""".code16
        movl $0x100000, {paravirt.DESC}     # desc[0].addr: above the VM's RAM
        movl $16, {paravirt.DESC + 8}       # desc[0].len
        movw $1, {paravirt.AVAIL + 2}       # avail.idx = 1 (avail.ring[0] = 0 already)
        mov $0xd000, %ax
        mov %ax, %es
        movl $0, %es:0x50                   # the doorbell
        hlt"""
    with kvm.VM() as vm:
        vm.load(kvm.assemble(source))
        with pytest.raises(kvm.DeviceError) as caught:
            vm.vcpu().run(devices=[paravirt.RingConsole(vm)])
    assert caught.value.reason == "MMIO" and caught.value.exits == {"MMIO": 1}
    assert str(caught.value).startswith(
        "MMIO: descriptor 0 points at 16 bytes at 0x100000, outside guest RAM at rip=")


@kvm_only
def test_unknown_registers_are_refused():
    with kvm.VM() as vm:
        device = paravirt.RingConsole(vm)
        with pytest.raises(kvm.DeviceError, match="no readable register at offset 0x50"):
            device.read(device.QUEUE_NOTIFY, 4)
        with pytest.raises(kvm.DeviceError, match="no writable register at offset 0x0"):
            device.write(device.MAGIC, 1, 4)


# --- is this machine a guest? ------------------------------------------------------------------------

def test_cpuid_runs_natively():
    max_leaf, ebx, ecx, edx = paravirt.cpuid(0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode()
    assert max_leaf >= 1
    assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls", "  Shanghai  ")


def test_machine_reads_clocksource_and_virtio_from_sysfs(tmp_path, monkeypatch):
    leaves = {1: (0, 0, 1 << 31, 0), 0x40000000: (0x40000001, *(int.from_bytes(b, "little") for b in
                                                                  (b"KVMK", b"VMKV", b"M\0\0\0"))),
              0x40000001: ((1 << 3) | (1 << 5), 0, 0, 0)}
    monkeypatch.setattr(paravirt, "cpuid", lambda leaf, subleaf=0: leaves[leaf])
    clock = tmp_path / "devices/system/clocksource/clocksource0"
    clock.mkdir(parents=True)
    (clock / "current_clocksource").write_text("kvm-clock\n")
    (clock / "available_clocksource").write_text("kvm-clock tsc \n")
    for name, kind, driver in (("virtio0", "0x0001", "virtio_net"), ("virtio1", "0x0063", None)):
        dev = tmp_path / "bus/virtio/devices" / name
        dev.mkdir(parents=True)
        (dev / "device").write_text(kind + "\n")
        if driver:
            (tmp_path / "drivers" / driver).mkdir(parents=True)
            (dev / "driver").symlink_to(tmp_path / "drivers" / driver)
    machine = paravirt.machine(sysfs=tmp_path)
    assert machine.hypervisor_bit and machine.vendor == "KVMKVMKVM" and machine.max_leaf == 0x40000001
    assert machine.features == ("clocksource2", "steal_time")
    assert (machine.clocksource, machine.clocksources) == ("kvm-clock", ("kvm-clock", "tsc"))
    assert machine.virtio == (("virtio0", "net", "virtio_net"), ("virtio1", "type 99", None))


def test_on_bare_metal_there_is_no_vendor_leaf(tmp_path, monkeypatch):
    monkeypatch.setattr(paravirt, "cpuid", lambda leaf, subleaf=0: (0, 0, 0, 0))
    machine = paravirt.machine(sysfs=tmp_path)
    assert (machine.hypervisor_bit, machine.vendor, machine.features, machine.virtio) == (False, "", (), ())
