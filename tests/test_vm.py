"""helpers.vm and helpers.initramfs: a real QEMU guest, its accelerator fallback, its cleanup."""
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import LabTimeout, NotSupported, compare, initramfs, resources, vm
from helpers.errors import BadInput


# -- the initramfs (unit) ----------------------------------------------------------------
def _fake_module(folder, name, depends=""):
    path = folder / "kernel" / f"{name}.ko"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=" + name.encode() + b"\0")
    return path


def test_modules_come_with_their_dependencies_first(tmp_path):
    for name, depends in [("virtiofs", "fuse,virtio"), ("fuse", ""), ("virtio", "virtio_ring"),
                          ("virtio_ring", ""), ("virtio_pci", "virtio,virtio_ring")]:
        _fake_module(tmp_path, name, depends)
    (tmp_path / "modules.order").write_text("".join(f"kernel/{n}.ko\n" for n in
                                                    ("fuse", "virtiofs", "virtio", "virtio_ring", "virtio_pci")))
    names = [p.stem for p in initramfs.modules(["virtiofs", "virtio_pci"], tmp_path)]
    assert names == ["fuse", "virtio_ring", "virtio", "virtiofs", "virtio_pci"]
    with pytest.raises(NotSupported, match="9p"):
        initramfs.modules(["9p"], tmp_path)


@pytest.mark.skipif(not shutil.which("cpio") or not shutil.which("busybox"), reason="needs cpio and busybox")
def test_initramfs_is_a_newc_archive_that_cpio_reads_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(initramfs, "CACHE", tmp_path / "cache")
    module = _fake_module(tmp_path, "fuse")
    path = initramfs.build("#!/bin/sh\necho hello\n", modules=[module])
    assert initramfs.build("#!/bin/sh\necho hello\n", modules=[module]) == path   # cached by content
    assert path.parent == tmp_path / "cache" / "initramfs"
    archive = gzip.decompress(path.read_bytes())
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True).stdout.decode()
    names = {line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()}
    assert {"init", "bin/busybox", "bin/sh", "lib/modules/fuse.ko", "lib/modules/order"} <= names
    assert "bin/sh -> busybox" in listing
    out = subprocess.run(["cpio", "-i", "--to-stdout", "init", "lib/modules/order"], input=archive,
                         capture_output=True, check=True).stdout
    assert out == b"#!/bin/sh\necho hello\nfuse.ko\n"
    extracted = tmp_path / "root"
    extracted.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=extracted, check=True)
    assert os.access(extracted / "init", os.X_OK)
    assert (extracted / "bin" / "busybox").read_bytes() == Path(shutil.which("busybox")).read_bytes()


# -- the accelerator choice (unit, with a fake QEMU) -----------------------------------------
class FakeQemu:
    """Stands in for VM._launch: KVM behaves as told, TCG always boots."""

    def __init__(self, kvm):
        self.kvm, self.calls = kvm, []

    def __call__(self, accel, limit):
        self.calls.append((accel, limit))
        if accel == "kvm" and self.kvm == "hangs":
            raise LabTimeout("the guest did not reach its init")
        if accel == "kvm" and self.kvm == "aborts":
            raise vm.BootFailed(-6, "error: failed to set MSR 0x10a to 0x69")


@pytest.fixture
def fresh_verdict(monkeypatch):
    monkeypatch.setattr(vm, "_kvm_verdict", {})
    monkeypatch.setattr(vm, "_kvm_unusable", lambda: None)


def test_auto_falls_back_to_tcg_when_kvm_hangs_and_tries_kvm_only_once(fresh_verdict):
    qemu = FakeQemu(kvm="hangs")
    why = vm._boot(qemu, "auto", 60)
    assert qemu.calls == [("kvm", vm.KVM_LIMIT), ("tcg", 60)]
    assert f"did not reach the guest's init within {vm.KVM_LIMIT:g} s" in why
    assert vm._boot(qemu, "auto", 60) == why                  # the verdict is remembered
    assert qemu.calls[2:] == [("tcg", 60)]


def test_auto_says_what_qemu_said_when_kvm_exits(fresh_verdict):
    qemu = FakeQemu(kvm="aborts")
    why = vm._boot(qemu, "auto", 30)
    assert why == "QEMU with KVM exited (status -6) before the guest's init: error: failed to set MSR 0x10a to 0x69"
    assert [accel for accel, _ in qemu.calls] == ["kvm", "tcg"]


def test_auto_uses_kvm_where_it_boots_and_explicit_choices_are_obeyed(fresh_verdict):
    qemu = FakeQemu(kvm="works")
    assert vm._boot(qemu, "auto", 60) is None
    assert vm._boot(qemu, "auto", 60) is None
    assert vm._boot(qemu, "tcg", 60) is None
    assert qemu.calls == [("kvm", vm.KVM_LIMIT), ("kvm", 60), ("tcg", 60)]


def test_auto_does_not_try_kvm_without_dev_kvm(fresh_verdict, monkeypatch):
    monkeypatch.setattr(vm, "_kvm_unusable", lambda: "this machine has no /dev/kvm")
    qemu = FakeQemu(kvm="works")
    assert vm._boot(qemu, "auto", 60) == "this machine has no /dev/kvm"
    assert qemu.calls == [("tcg", 60)]


@pytest.mark.parametrize("options", [{"memory": "lots"}, {"memory": 32}, {"memory": "100T"},
                                     {"accel": "xen"}, {"share": "/nonexistent"}, {"timeout": 0},
                                     {"append": "a\nb"}, {"share": [vm.Share(Path("/"), "mnt")]},
                                     {"share": [vm.Share(Path("/"), "/a b")]}, {"cpus": 0},
                                     {"cpus": 999}, {"modules": "veth"}, {"tcg_cpu": "max;x"}])
def test_bad_input_fails_before_anything_starts(options):
    with pytest.raises(BadInput):
        vm.VM(**options)


def test_memory_sizes():
    assert [vm._mebibytes(m) for m in (256, "256M", "1G", "512MiB")] == [256, 256, 1024, 512]


# -- a real guest ------------------------------------------------------------------------
def _qemu_alive(name):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def guest():
    """One guest for the tests that only run commands: a cgroup-v2-only kernel, as most students have."""
    with vm.VM(append="cgroup_no_v1=all") as machine:
        yield machine


@pytest.mark.requires("qemu")
def test_a_command_runs_in_the_guest_with_its_output_and_exit_status(guest):
    result = guest.run("uname -r; echo oops >&2; exit 3")
    assert result.output == f"{vm.kernel_version()}\noops\n"
    assert result.exit_code == 3
    assert guest.run("true").exit_code == 0
    assert guest.run("cat /proc/1/cmdline").output == "/bin/sh\0/init\0"   # PID 1: our init
    assert result.accel in ("kvm", "tcg")
    assert (result.fallback_reason is not None) == (result.accel == "tcg")
    assert 0 < guest.guest_init_seconds < result.init_seconds < 60
    assert result.peak_memory > 50 * 2**20                      # QEMU holds the guest's RAM
    assert any(vm.MARKER in line for line in guest.console)


@pytest.mark.requires("qemu")
def test_qemu_is_named_and_keeps_its_files_where_sweep_looks(guest):
    args = Path(f"/proc/{guest.pid}/cmdline").read_bytes().split(b"\0")
    assert args[args.index(b"-name") + 1].decode() == guest.name
    assert guest.name.startswith("cnlab-vm-")
    assert guest.dir.parent == resources.STATE / "vm"
    assert any(guest.name in item for item in helpers.leftovers())


@pytest.mark.requires("qemu")
def test_a_cgroup_v2_only_guest_has_the_controllers_this_machine_lacks(guest):
    result = guest.run("mount -t cgroup2 none /sys/fs/cgroup && cat /sys/fs/cgroup/cgroup.controllers"
                       " && grep -c cgroup /proc/mounts")
    controllers, mounts = result.output.split("\n")[:2]
    assert {"memory", "cpu", "pids"} <= set(controllers.split())
    assert mounts == "1"                                         # no v1 hierarchy anywhere


@pytest.mark.requires("qemu")
def test_a_boot_that_times_out_leaves_no_process_and_no_files():
    machine = vm.VM(accel="tcg", timeout=0.3)
    with pytest.raises(LabTimeout, match=r"init \(tcg\): not within 0.3 s \(last console lines"):
        machine.start()
    assert machine.dir is None
    assert not (resources.STATE / "vm" / machine.name.removeprefix("cnlab-vm-")).exists()
    assert not _qemu_alive(machine.name)
    with pytest.raises(ChildProcessError):
        os.waitpid(machine.pid, os.WNOHANG)                      # reaped, not a zombie


@pytest.mark.requires("qemu")
def test_a_command_that_times_out_stops_the_vm():
    with vm.VM(accel="tcg") as machine:
        folder = machine.dir
        with pytest.raises(LabTimeout, match="did not finish within 0.5 s"):
            machine.run("sleep 30", timeout=0.5)
        assert not folder.exists() and not _qemu_alive(machine.name)


@pytest.mark.requires("qemu")
def test_sweep_kills_a_forgotten_vm_and_removes_its_folder(tmp_path, monkeypatch):
    state = tmp_path / "cnlab"      # its own STATE: the sweep must not stop the module's guest
    monkeypatch.setattr(resources, "STATE", state)
    monkeypatch.setattr(vm, "STATE", state)
    machine = vm.VM(accel="tcg").start()
    folder = machine.dir
    assert folder.parent == state / "vm"
    vm.sweep()
    assert not folder.exists() and not _qemu_alive(machine.name)
    vm.sweep()          # idempotent
    machine.kill()      # the owner finds it gone: fine


@pytest.mark.requires("qemu")
def test_one_shot_run_reports_peak_memory_after_qemu_exited():
    result = vm.run("echo $((6 * 7))", accel="tcg")
    assert (result.output, result.exit_code, result.accel) == ("42\n", 0, "tcg")
    assert result.peak_memory > 50 * 2**20


@pytest.mark.requires("qemu", "root")
@pytest.mark.skipif(not any(os.access(p, os.X_OK) for p in vm.VIRTIOFSD),
                    reason="needs virtiofsd (Debian 12: qemu-system-common; 13 and later: virtiofsd)")
def test_a_host_folder_is_shared_both_ways_with_virtiofs(tmp_path):
    (tmp_path / "from-host.txt").write_text("hello guest\n")
    with vm.VM(share=tmp_path, accel="tcg") as machine:
        result = machine.run(f"cat {vm.GUEST_SHARE}/from-host.txt && uname -n > {vm.GUEST_SHARE}/from-guest.txt")
    assert result.output == "hello guest\n"
    assert (tmp_path / "from-guest.txt").read_text() == "(none)\n"   # the guest's hostname


@pytest.mark.requires("docker")
def test_a_container_start_is_measured_and_removed():
    start = compare.start_container()
    assert 0 < start.seconds < 30
    assert start.memory["container cgroup peak"] > 0 and start.memory["containerd shim RSS"] > 0
    assert start.total_memory == sum(start.memory.values())
