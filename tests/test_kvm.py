"""helpers.kvm: the KVM ABI as ctypes sees it, the guest programs, and every exit the loop handles."""
import ctypes
import os

import pytest

from helpers import BadInput, LabError, LabTimeout, kvm

kvm_only = pytest.mark.requires("kvm")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def skip_refused(mode):
    if why := kvm.refused(mode):
        pytest.skip(why)


class Recorder:
    """A device that answers with fixed values and remembers every access."""

    def __init__(self, *, ports=range(0), mmio=range(0), answer=0):
        self.ports, self.mmio, self.answer, self.log = ports, mmio, answer, []

    def read(self, offset, size):
        self.log.append(("read", offset, size))
        return self.answer

    def write(self, offset, value, size):
        self.log.append(("write", offset, value, size))


def run(source, *, mode="real", devices=None, **options):
    with kvm.VM() as vm:
        vm.load(kvm.assemble(source))
        return vm.vcpu(mode=mode).run(devices=devices, **options)


# --- the ABI: sizes and offsets from linux/kvm.h and asm/kvm.h (x86-64), checked with offsetof() ---

def test_struct_layouts_match_the_kernel_headers():
    assert ctypes.sizeof(kvm.Regs) == 144
    assert ctypes.sizeof(kvm.Segment) == 24
    assert ctypes.sizeof(kvm.DTable) == 16
    assert ctypes.sizeof(kvm.Sregs) == 312
    assert (kvm.Sregs.gdt.offset, kvm.Sregs.cr0.offset, kvm.Sregs.efer.offset) == (192, 224, 264)
    assert ctypes.sizeof(kvm.UserspaceMemoryRegion) == 32
    assert (kvm.Run.exit_reason.offset, kvm.Run.exit.offset) == (8, 32)
    mmio = kvm.Run.exit.offset + kvm._Mmio.len.offset, kvm.Run.exit.offset + kvm._Mmio.is_write.offset
    assert mmio == (48, 52)


def test_ioctl_numbers_match_the_kernel_headers():
    assert (kvm.KVM_GET_API_VERSION, kvm.KVM_CREATE_VM) == (0xAE00, 0xAE01)
    assert kvm.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert (kvm.KVM_CREATE_VCPU, kvm.KVM_RUN) == (0xAE41, 0xAE80)
    assert kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert (kvm.KVM_GET_REGS, kvm.KVM_SET_REGS) == (0x8090AE81, 0x4090AE82)
    assert (kvm.KVM_GET_SREGS, kvm.KVM_SET_SREGS) == (0x8138AE83, 0x4138AE84)


# --- guest programs ---------------------------------------------------------------------------------

def test_hello_assembles_to_16_bit_code_with_its_message():
    code = kvm.guest("hello")
    assert code.startswith(bytes([0xBA, 0xF8, 0x03]))          # mov $0x3f8, %dx (16-bit immediate)
    assert code.endswith(b"Hello from real mode!\n\0")
    assert bytes([0xEE]) in code and bytes([0xF4]) in code      # out %al,(%dx) and hlt


def test_every_guest_program_assembles():
    symbols = dict(PAYLOAD=0x9000, LENGTH=4096, CHUNK=512, DESC=0xA000, AVAIL=0xB000, USED=0xC000,
                   DEVICE=0xD0000)
    for source in sorted(kvm.GUESTS.glob("*.S")):
        assert kvm.guest(source.stem, **symbols), source.name


def test_symbols_reach_the_assembler_and_the_cache_keeps_each_build(tmp_path, monkeypatch):
    monkeypatch.setattr(kvm, "CACHE", tmp_path)
    short = kvm.guest("emulated", PAYLOAD=0x9000, LENGTH=16)
    long = kvm.guest("emulated", PAYLOAD=0x9000, LENGTH=4096)
    assert short != long
    assert (16).to_bytes(2, "little") in short and (4096).to_bytes(2, "little") in long
    assert len(list((tmp_path / "guests").glob("emulated-*.bin"))) == 2
    assert kvm.guest("emulated", PAYLOAD=0x9000, LENGTH=16) == short


def test_assembler_errors_and_bad_names_are_bad_input():
    with pytest.raises(BadInput, match="rejected guest"):
        kvm.assemble(".code16\n movq %rax, %dx\n")
    with pytest.raises(BadInput, match="no guest program 'nope'.*hello"):
        kvm.guest("nope")
    with pytest.raises(BadInput, match="NAME=integer"):
        kvm.guest("emulated", LENGTH="4096")


def test_disassemble_reads_back_what_was_assembled():
    text = kvm.disassemble(kvm.guest("hello"))
    assert text.splitlines()[0].split() == ["8000:", "ba", "f8", "03", "mov", "$0x3f8,%dx"]
    assert "out    %al,(%dx)" in text and "hlt" in text


# --- errors and checks that need no KVM ---------------------------------------------------------------

def test_guest_error_names_reason_and_registers():
    error = kvm.TripleFault("boom", reason="SHUTDOWN", regs=kvm.Regs(rip=0x8007, rax=0x42))
    assert isinstance(error, LabError)
    assert str(error).startswith("SHUTDOWN: boom at rip=0x8007 rsp=0x0 rax=0x42")


def test_bad_input_fails_before_anything_is_opened():
    before = open_fds()
    for memory in (0, 1000, 3 << 30, "1M"):
        with pytest.raises(BadInput):
            kvm.VM(memory=memory)
    assert open_fds() == before


def test_devices_are_checked_before_the_guest_runs():
    with pytest.raises(BadInput, match="both claim ports"):
        kvm._Bus([kvm.Serial(), Recorder(ports=range(0x3FD, 0x3FE))], ram=kvm.MEMORY)
    with pytest.raises(BadInput, match="inside guest RAM"):
        kvm._Bus([Recorder(mmio=range(0x9000, 0x9100))], ram=kvm.MEMORY)


def forged_exit(reason, **fields):
    """A kvm_run as KVM would fill it, for exits this machine cannot be made to produce."""
    run = kvm.Run(exit_reason=reason)
    for name, value in fields.items():
        setattr(run.exit.fail_entry, name, value)
    return run


def test_fail_entry_and_unknown_exits_are_typed_errors():
    # FAIL_ENTRY comes from a hardware VM entry (VMX/SVM) refusing the guest state. This
    # machine's KVM (kvm_pvm) accepted every invalid state we tried, so the kvm_run is forged.
    bus = kvm._Bus([], ram=kvm.MEMORY)
    with pytest.raises(kvm.EntryFailed, match="hardware reason 0x80000021"):
        run = forged_exit(kvm.Exit.FAIL_ENTRY, hardware_entry_failure_reason=0x80000021)
        kvm.VCPU._handle(None, run, bus)
    with pytest.raises(kvm.UnhandledExit, match="does not handle"):
        kvm.VCPU._handle(None, forged_exit(37), bus)
    assert kvm._exit_name(37) == "EXIT_37" and kvm._exit_name(2) == "IO"


# --- guests that exit through every reason the loop handles -------------------------------------------

@kvm_only
@pytest.mark.parametrize("mode, program, greeting", [
    ("real", "hello", b"Hello from real mode!\n"),
    ("protected", "protected", b"Hello from 32-bit protected mode!\n"),
    ("long", "long", b"Hello from 64-bit long mode!\n"),
])
def test_hello_in_each_mode_exits_once_per_byte_then_halts(mode, program, greeting):
    skip_refused(mode)
    with kvm.VM() as vm:
        vm.load(kvm.guest(program))
        result = vm.vcpu(mode=mode).run(devices=[kvm.Serial()])
    assert result.output == greeting
    assert result.exits == {"IO": len(greeting), "HLT": 1}
    if mode == "protected":
        assert result.regs.rax & kvm.CR0_PE                # the guest read CR0 itself
    if mode == "long":
        assert result.regs.rax == 0x1122334455667788       # a 64-bit register


@kvm_only
def test_io_in_reads_what_the_serial_port_answers():
    with kvm.VM() as vm:
        vm.load(kvm.guest("echo"))
        result = vm.vcpu().run(devices=[kvm.Serial(input=b"ping\n")])
    assert result.output == b"ping\n"
    assert result.exits == {"IO": 3 * 5 + 1, "HLT": 1}    # per byte: status, data in, data out; last status


@kvm_only
def test_io_of_two_bytes_and_string_io():
    device = Recorder(ports=range(0x10, 0x12), answer=0xBEEF)
    result = run(".code16\n mov $0x1234, %ax\n out %ax, $0x10\n in $0x10, %ax\n hlt", devices=[device])
    assert device.log == [("write", 0, 0x1234, 2), ("read", 0, 2)]
    assert result.regs.rax & 0xFFFF == 0xBEEF
    # rep outsb: KVM may report several bytes in one exit (count > 1) or one each; same bytes either way
    result = run(".code16\n mov $0x3f8, %dx\n mov $text, %si\n mov $5, %cx\n cld\n rep outsb\n hlt\n"
                 "text: .ascii \"abcde\"", devices=[kvm.Serial()])
    assert result.output == b"abcde" and result.exits["HLT"] == 1


@kvm_only
@pytest.mark.parametrize("mode", kvm.MODES)
def test_mmio_reads_and_writes_reach_the_device(mode):
    skip_refused(mode)
    device = Recorder(mmio=range(0xD0000, 0xD1000), answer=0x74726976)
    source = {"real": ".code16\n mov $0xd000, %ax\n mov %ax, %es\n mov %es:4, %eax\n movw $7, %es:0x50\n hlt",
              "protected": ".code32\n mov 0xd0004, %eax\n movw $7, 0xd0050\n hlt",
              "long": ".code64\n mov 0xd0004, %eax\n movw $7, 0xd0050\n hlt"}[mode]
    result = run(source, mode=mode, devices=[device])
    assert device.log == [("read", 4, 4), ("write", 0x50, 7, 2)]
    assert result.regs.rax == 0x74726976
    assert result.exits == {"MMIO": 2, "HLT": 1}


@kvm_only
def test_triple_fault_is_a_typed_error_with_registers():
    skip_refused("protected")
    # No usable IDT: ud2 raises #UD, delivering it faults (#GP), then #DF, then the CPU gives up.
    with pytest.raises(kvm.TripleFault) as caught:
        run(".code32\n lidt idt\n ud2\n hlt\nidt: .word 0\n .long 0", mode="protected")
    assert caught.value.reason == "SHUTDOWN" and caught.value.exits == {"SHUTDOWN": 1}
    assert caught.value.regs.rip == 0x8007                  # the ud2, after the 7-byte lidt
    assert "SHUTDOWN" in str(caught.value) and "rip=0x8007" in str(caught.value)


@kvm_only
def test_internal_error_when_kvm_cannot_fetch_the_next_instruction():
    # A jump to an address with no RAM: KVM has to emulate the fetch and cannot.
    with pytest.raises(kvm.InternalError, match="EMULATION") as caught:
        run(".code16\n ljmp $0xd000, $0\n")
    assert caught.value.reason == "INTERNAL_ERROR" and caught.value.exits == {"INTERNAL_ERROR": 1}


@kvm_only
def test_port_or_address_nobody_claims_is_an_unhandled_exit():
    with pytest.raises(kvm.UnhandledExit, match=r"^IO: out to port 0x80: no device claims it at rip=0x8004") \
            as io:
        run(".code16\n mov $0x2a, %al\n out %al, $0x80\n hlt")
    assert io.value.regs.rax == 0x2A
    with pytest.raises(kvm.UnhandledExit, match=r"^MMIO: read from 0xe0000: no RAM and no device"):
        run(".code16\n mov $0xe000, %ax\n mov %ax, %es\n mov %es:0, %al\n hlt")


@kvm_only
def test_a_guest_that_never_halts_is_stopped_after_max_exits():
    with pytest.raises(kvm.TooManyExits) as caught:
        run(".code16\n mov $0x3f8, %dx\nagain: out %al, %dx\n jmp again", max_exits=100)
    assert isinstance(caught.value, LabTimeout)
    assert caught.value.exits == {"IO": 100}


@kvm_only
def test_nothing_stays_open_after_runs_and_errors():
    before = open_fds()
    with kvm.VM() as vm:
        vm.load(kvm.guest("hello"))
        cpu = vm.vcpu()
        assert open_fds() >= before + 3                    # /dev/kvm, the VM, the vCPU (and its mapping)
        cpu.run()
    with pytest.raises(kvm.UnhandledExit):
        run(".code16\n out %al, $0x80\n")
    with kvm.VM() as vm:
        cpu = vm.vcpu()
        cpu.close()
        with pytest.raises(BadInput, match="closed"):
            cpu.run()
    assert open_fds() == before


@kvm_only
def test_guest_memory_is_bounds_checked():
    with kvm.VM(memory=0x10000) as vm:
        vm.write(0xFFF0, b"x" * 16)
        assert vm.read(0xFFF0, 16) == b"x" * 16
        with pytest.raises(BadInput, match="outside guest RAM"):
            vm.load(b"x" * 17, at=0xFFF0)
        with pytest.raises(BadInput, match="mode='v86'"):
            vm.vcpu(mode="v86")
