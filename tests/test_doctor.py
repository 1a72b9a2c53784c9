"""The doctor reports this machine as independent checks see it, and explains what is missing."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest

from helpers import cgroups, doctor

HYBRID = """\
30 24 0:26 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/systemd rw,relatime shared:12 - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
"""
V2_ONLY = "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


def test_detects_a_hybrid_layout(tmp_path):
    (tmp_path / "mountinfo").write_text(HYBRID)
    layout = cgroups.detect(tmp_path / "mountinfo")
    assert layout.version == "hybrid"
    assert set(layout.v1) == {"cpu", "memory", "cpuacct"}
    assert str(layout.v1["memory"]) == "/sys/fs/cgroup/memory"
    assert str(layout.v2) == "/sys/fs/cgroup/unified"


def test_detects_v2_only_and_v1_only(tmp_path):
    (tmp_path / "v2").write_text(V2_ONLY)
    (tmp_path / "v1").write_text("".join(l + "\n" for l in HYBRID.splitlines() if "cgroup2" not in l))
    assert cgroups.detect(tmp_path / "v2").version == "v2"
    assert cgroups.detect(tmp_path / "v1").version == "v1"


def test_unmet_names_each_missing_capability_once():
    report = {name: doctor.Check(True, "fine") for name in doctor.probe()}
    report["docker"] = doctor.Check(False, "no engine: start dockerd")
    report["kind"] = doctor.Check(False, "kind not found")
    report["context"] = doctor.Check(False, "CNLAB_CONTEXT is not set")
    assert doctor.unmet(["root", "docker"], report) == ["docker: no engine: start dockerd"]
    assert doctor.unmet(["docker", "swarm", "kind"], report) == [
        "docker: no engine: start dockerd", "kind: kind not found (or: context: CNLAB_CONTEXT is not set)"]
    assert doctor.unmet(["root"], report) == []
    assert "unknown requirement 'gpu'" in doctor.unmet(["gpu"], report)[0]


def test_every_requirement_names_real_capabilities():
    report = doctor.probe()
    for name, capabilities in doctor.REQUIREMENTS.items():
        assert set(capabilities) <= set(report), name
    for name, capabilities in doctor.OR_ELSE.items():
        assert name in doctor.REQUIREMENTS and set(capabilities) <= set(report), name


def test_a_kubernetes_lab_runs_on_the_cluster_cnlab_context_names(monkeypatch):
    """No kind, no Docker: CNLAB_CONTEXT naming a reachable cluster meets a lab's `kind` requirement."""
    monkeypatch.setattr(doctor, "_api_version", lambda context=None: f"v1.36.0 of {context}")
    monkeypatch.setenv("CNLAB_CONTEXT", "prod-like")
    cluster = doctor._cluster()
    assert cluster == doctor.Check(True, "Kubernetes v1.36.0 of prod-like (context prod-like)")
    report = {name: doctor.Check(True, "fine") for name in doctor.probe()}
    report.update(docker=doctor.Check(False, "no Docker engine answers"), kind=doctor.Check(False, "kind not found"),
                  cluster=cluster, context=doctor._context(cluster))
    assert doctor.unmet(["kind"], report) == []
    from helpers import labs
    assert re.search(r"^42-pods +yes ", doctor.render(report, labs.all_labs()), re.M)

    def unreachable(context=None):
        raise ConnectionRefusedError("connection refused")
    monkeypatch.setattr(doctor, "_api_version", unreachable)
    report.update(cluster=doctor._cluster())
    report.update(context=doctor._context(report["cluster"]))
    assert not report["context"].ok and "CNLAB_CONTEXT=prod-like: no cluster reachable" in report["context"].detail
    assert doctor.unmet(["kind"], report)[0] == "docker: no Docker engine answers"
    monkeypatch.delenv("CNLAB_CONTEXT")
    assert doctor._context(doctor.Check(True, "")).ok is False


@pytest.fixture(scope="module")
def cli_report():
    out = subprocess.run([sys.executable, "-m", "helpers", "doctor", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_json_has_one_key_per_capability_each_with_a_reason(cli_report):
    for name, check in cli_report.items():
        assert isinstance(check["ok"], bool), name
        assert check["detail"], f"{name} says nothing"


def test_json_agrees_with_independent_checks(cli_report):
    assert cli_report["root"]["ok"] == (os.geteuid() == 0)
    assert cli_report["kernel"]["detail"] == os.uname().release
    mounts = open("/proc/mounts").read()
    has_v1, has_v2 = " cgroup " in mounts, " cgroup2 " in mounts
    assert cli_report["cgroup"]["version"] == {(1, 1): "hybrid", (1, 0): "v1", (0, 1): "v2"}[(has_v1, has_v2)]
    docker_answers = subprocess.run(["docker", "info"], capture_output=True).returncode == 0 \
        if shutil.which("docker") else False
    assert cli_report["docker"]["ok"] == docker_answers
    # each tool asked for its version, not looked up the way the doctor looks it up
    assert cli_report["kind"]["ok"] == _runs("kind", "version")
    assert cli_report["qemu"]["ok"] == _runs("qemu-system-x86_64", "--version")
    if _runs("etcd", "--version"):
        assert cli_report["etcd"]["ok"]


def _runs(*command):
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, PermissionError):
        return False


@pytest.mark.requires("root")
def test_every_namespace_type_can_be_created_as_root(cli_report):
    for kind in ("uts", "pid", "mnt", "net", "ipc", "user", "cgroup", "time"):
        assert cli_report[f"ns.{kind}"]["ok"], cli_report[f"ns.{kind}"]


def _vm_can_be_created():
    """KVM_CREATE_VM on /dev/kvm with the raw ioctl: the test's own check, not the doctor's."""
    import fcntl
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:            # KVM_GET_API_VERSION: always 12
            return False
        os.close(fcntl.ioctl(fd, 0xAE01, 0))           # KVM_CREATE_VM returns the VM's fd
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_kvm_probe_agrees_with_the_raw_ioctl(cli_report):
    assert cli_report["kvm"]["ok"] == _vm_can_be_created(), cli_report["kvm"]
    if cli_report["kvm"]["ok"]:
        assert cli_report["kvm"]["detail"].startswith("a VM was created")


def test_table_lists_every_lab_and_why_it_cannot_run():
    from helpers import labs
    report = dict(doctor.probe(), docker=doctor.Check(False, "no Docker engine answers"))
    text = doctor.render(report, labs.all_labs())
    for lab in labs.all_labs():
        assert lab.name in text
    assert re.search(r"^docker +NO +no Docker engine answers$", text, re.M)
