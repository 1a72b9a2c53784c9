"""helpers.containerd (the course's own containerd) and helpers.cri (the CRI spoken by hand).

One containerd instance serves the whole module (a module-scoped fixture); the last test
"crashes" on purpose and checks that sweep() leaves no pod, container, task, snapshot,
mount, network namespace, bridge, cgroup or process behind. Docker's containerd is never touched.
"""
import os
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

import helpers
from helpers import cgroups, containerd, cri
from helpers.errors import BadInput, LabTimeout

SERVER = ["sh", "-c", "mkdir -p /www && echo hello from the server > /www/index.html "
                      "&& exec httpd -f -p 127.0.0.1:8080 -h /www"]
SIDECAR = ["sh", "-c", "trap 'exit 0' TERM; until wget -qO- http://127.0.0.1:8080/; do sleep 0.1; done; "
                       "while :; do sleep 1 & wait; done"]


# --- without a runtime ------------------------------------------------------------------------

def test_cri_log_lines_are_parsed_and_partial_lines_joined():
    text = ("2026-01-01T00:00:00.1Z stdout F hello world\n"
            "2026-01-01T00:00:00.2Z stderr P a long li\n"
            "2026-01-01T00:00:00.3Z stderr F ne, split\n"
            "2026-01-01T00:00:00.4Z stdout F \n")
    assert cri.parse_log(text) == [
        cri.LogLine("2026-01-01T00:00:00.1Z", "stdout", "hello world"),
        cri.LogLine("2026-01-01T00:00:00.3Z", "stderr", "a long line, split"),
        cri.LogLine("2026-01-01T00:00:00.4Z", "stdout", "")]


@pytest.mark.parametrize("line", ["hello", "2026-01-01T00:00:00Z stdin F x", "2026-01-01T00:00:00Z stdout X y"])
def test_a_line_that_is_not_cri_log_format_is_bad_input(line):
    with pytest.raises(BadInput, match="not a CRI log line"):
        cri.parse_log(line)


def test_nothing_on_the_socket_is_runtime_unavailable():
    with cri.Client("/run/cnlab/nothing.sock", timeout=5) as client:
        with pytest.raises(cri.RuntimeUnavailable, match="nothing.sock.*Containerd"):
            client.version()


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "", "x" * 64, None])
def test_pod_and_container_names_are_dns_labels(name):
    with cri.Client("/run/cnlab/nothing.sock") as client:      # refused before any call
        with pytest.raises(BadInput, match="DNS label"):
            cri.Pod(client, name)


def test_the_config_keeps_everything_under_cnlab(monkeypatch):
    monkeypatch.setattr(containerd, "_cni_bin", lambda: "/usr/lib/cni")
    config = tomllib.loads(containerd.config("overlayfs"))
    home = str(containerd.HOME)
    assert config["root"].startswith(home) and config["state"].startswith(home)
    assert config["grpc"]["address"] == str(containerd.SOCKET) != "/run/containerd/containerd.sock"
    assert config["ttrpc"]["address"].startswith(home)
    plugin = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert plugin["restrict_oom_score_adj"] is True and plugin["sandbox_image"] == containerd.PAUSE
    assert plugin["cni"]["conf_dir"].startswith(home) and plugin["cni"]["bin_dir"] == "/usr/lib/cni"
    assert plugin["containerd"]["runtimes"]["runc"]["options"]["Root"].startswith(home)
    network = containerd.conflist()["plugins"][0]
    assert network["ipMasq"] is False and network["ipam"]["ranges"] == [[{"subnet": "10.88.77.0/24"}]]
    assert network["ipam"]["dataDir"].startswith(home) and "cnlab" in network["bridge"]


# --- one containerd for the rest --------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon():
    with containerd.Containerd() as d:
        yield d


@pytest.fixture
def client(daemon):
    with cri.Client(daemon.address) as c:
        yield c


def _leftovers(daemon):
    """What containerd, ctr and the host still hold for pods: all must be empty after a pod."""
    state = containerd.HOME / "state"
    return {
        "pods": daemon.ctr("containers", "ls", "-q").split(),
        "tasks": daemon.ctr("tasks", "ls", "-q").split(),
        "active snapshots": [l for l in daemon.ctr("snapshots", "ls").splitlines() if "Active" in l],
        "mounts": [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                   if l.split()[4].startswith(str(containerd.HOME))],
        "netns": sorted(os.listdir(state / "io.containerd.grpc.v1.cri" / "netns"))
        if (state / "io.containerd.grpc.v1.cri" / "netns").is_dir() else [],
        "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob("*/cnlab-pod-*")],
        "logs": os.listdir(cri.LOGS) if cri.LOGS.is_dir() else []}


@pytest.mark.requires("containerd")
def test_the_runtime_is_ready_with_the_course_images(daemon, client):
    assert client.version()["runtime_name"] == "containerd"
    assert client.version()["runtime_api_version"] == "v1"
    assert client.status() == {"RuntimeReady": True, "NetworkReady": True}
    assert {containerd.PAUSE, containerd.BUSYBOX} <= set(client.images())
    assert daemon.snapshotter in ("overlayfs", "native")
    assert containerd.pid() == daemon.process.pid
    assert containerd.HOME.as_posix() in " ".join(Path(f"/proc/{containerd.pid()}/cmdline")
                                                  .read_text().split("\0"))


@pytest.mark.requires("containerd")
def test_a_pod_of_two_containers_sharing_localhost(daemon, client):
    with cri.Pod(client, "web") as pod:
        status = pod.status()
        assert status["state"] == "SANDBOX_READY" and status["ip"].startswith("10.88.77.")
        assert status["namespaces"] == {"network": "POD", "pid": "CONTAINER", "ipc": "POD"}
        pod.add("server", containerd.BUSYBOX, SERVER)
        pod.add("sidecar", containerd.BUSYBOX, SIDECAR)
        assert pod.exec("sidecar", ["wget", "-qO-", "http://127.0.0.1:8080/"]) == \
            cri.ExecResult(0, "hello from the server\n", "")
        deadline = time.monotonic() + 10
        while "hello" not in pod.logs("sidecar") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pod.logs("sidecar") == "hello from the server\n"
        nets = {name: pod.exec(name, ["readlink", "/proc/self/ns/net"]).stdout for name in pod.containers}
        pids = {name: pod.exec(name, ["readlink", "/proc/self/ns/pid"]).stdout for name in pod.containers}
        assert nets["server"] == nets["sidecar"] and pids["server"] != pids["sidecar"]
        sandbox_pid = status["pid"]
        assert os.readlink(f"/proc/{sandbox_pid}/ns/net") == nets["server"].strip()   # pause holds it
        listed = {c.name: c for c in client.containers(pod.id)}
        assert {n: c.state for n, c in listed.items()} == {"server": "CONTAINER_RUNNING",
                                                            "sidecar": "CONTAINER_RUNNING"}
        assert [p.name for p in client.pods(cri.OWNER)] == ["web"]
        ctr = daemon.ctr("containers", "ls")
        assert ctr.count(containerd.BUSYBOX) == 2 and ctr.count(containerd.PAUSE) == 1
        assert daemon.ctr("tasks", "ls").count("RUNNING") == 3
    assert client.pods() == [] and client.containers() == []
    assert not any(_leftovers(daemon).values()), _leftovers(daemon)


@pytest.mark.requires("containerd")
def test_limits_asked_through_the_cri_are_in_the_container_s_cgroup(client):
    with cri.Pod(client, "limits") as pod:
        pod.add("box", containerd.BUSYBOX, ["sleep", "60"], memory="32M", cpus=0.25)
        folders = cgroups.of_process(pod.status("box")["pid"])
        assert all(pod.cgroup in str(folder) for folder in folders.values())
        limits = cgroups.limits_in(folders)
        assert (limits["memory"], limits["cpus"]) == (32 << 20, 0.25)


def test_cpu_requests_become_shares_as_the_kubelet_makes_them():
    assert [cri.shares(c) for c in (0.5, 1, 2, 0.001)] == [512, 1024, 2048, 2]


def test_no_swap_is_the_memory_limit_where_the_kernel_accounts_swap(tmp_path):
    # the kubelet's NoSwap: memory + swap = memory. A v1 kernel without swap accounting
    # (no memory.memsw.*) would make runc fail, so it is left unset there, as the kubelet does
    v2 = cgroups.Layout(v2=tmp_path, v2_controllers=("memory",))
    v1 = cgroups.Layout(v1={"memory": tmp_path})
    assert cri.no_swap(512 << 20, v2) == 512 << 20 and cri.no_swap(0, v2) == 0
    assert cri.no_swap(512 << 20, v1) == 0
    (tmp_path / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    assert cri.no_swap(512 << 20, v1) == 512 << 20


def test_a_request_above_the_limit_is_refused_before_any_call():
    with cri.Client("/run/cnlab/nothing.sock") as client:       # nothing answers: no call made
        pod = cri.Pod(client, "bad")
        with pytest.raises(BadInput, match="more than the limit"):
            pod.add("box", containerd.BUSYBOX, ["true"], cpus=0.5, cpu_request=1)
        with pytest.raises(BadInput, match="cpu_request"):
            pod.add("box", containerd.BUSYBOX, ["true"], cpus=0.5, cpu_request="half")


@pytest.mark.requires("containerd")
def test_half_a_core_and_512_mib_are_written_and_enforced(client):
    """The article's "0.5 核 512M": the spec containerd hands runc, the cgroup files runc wrote,
    a busy loop held to half a core and a hog OOM-killed at 512 MiB."""
    with cri.Pod(client, "small") as pod:
        pod.add("busy", containerd.BUSYBOX, ["sh", "-c", "while :; do :; done"], memory="512M", cpus=0.5)
        spec = pod.status("busy")["spec"]["linux"]["resources"]
        assert spec["cpu"] == {"shares": 512, "quota": 50_000, "period": 100_000}
        assert spec["memory"]["limit"] == spec["memory"]["swap"] == 512 << 20   # memory + swap: no swap
        got = pod.resources("busy")
        assert (got.memory, got.cpus, got.cpu_quota_us, got.cpu_period_us) == (512 << 20, 0.5, 50_000, 100_000)
        assert got.cpu_shares == 512 if got.cpu_weight is None else 1 <= got.cpu_weight < 100
        assert all(pod.cgroup in str(path) for path in got.files)
        use = pod.cpu_use("busy", seconds=2)
        assert 0.2 <= use.cores <= 0.6, use                    # generous: the machine is shared
        assert use.throttled > 0 and use.throttled_seconds > 0, use
        pod.add("hog", containerd.BUSYBOX, ["sh", "-c", "head -c 700m /dev/zero | tail"], memory="512M")
        ended = pod.wait_exit("hog")
        assert (ended["exit_code"], ended["reason"]) == (137, "OOMKilled")
        with pytest.raises(cri.CriError, match="hog is CONTAINER_EXITED, not running"):
            pod.resources("hog")
        with pytest.raises(BadInput, match="seconds"):
            pod.cpu_use("busy", seconds=0)


@pytest.mark.requires("containerd")
def test_an_exited_container_has_its_status_and_logs(client):
    with cri.Pod(client, "job") as pod:
        pod.add("once", containerd.BUSYBOX, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        deadline = time.monotonic() + 10
        while pod.status("once")["state"] != "CONTAINER_EXITED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (pod.status("once")["state"], pod.status("once")["exit_code"]) == ("CONTAINER_EXITED", 3)
        assert pod.logs("once", "stdout") == "out\n" and pod.logs("once", "stderr") == "err\n"
        with pytest.raises(cri.CriError, match="CONTAINER_EXITED"):
            pod.exec("once", ["true"])


@pytest.mark.requires("containerd")
def test_missing_things_are_not_found_naming_them(daemon, client):
    with pytest.raises(cri.NotFound, match="container nope"):
        client.container_status("nope")
    with pytest.raises(cri.NotFound, match="pod sandbox nope"):
        client.stop_pod("nope")
    with cri.Pod(client, "missing") as pod:
        with pytest.raises(cri.NotFound, match="image localhost/cnlab/nothing:1.*import it"):
            pod.add("x", "localhost/cnlab/nothing:1", ["true"])
        with pytest.raises(BadInput, match="memory"):
            pod.add("y", containerd.BUSYBOX, ["true"], memory="lots")
        with pytest.raises(cri.NotFound, match="no container 'x'"):
            pod.exec("x", ["true"])
        assert pod.containers == {} and client.containers(pod.id) == []
    with pytest.raises(LabTimeout):
        with cri.Pod(client, "slow") as pod:
            pod.add("box", containerd.BUSYBOX, ["sleep", "60"])
            pod.exec("box", ["sleep", "5"], timeout=1)
    assert client.pods() == [] and not any(_leftovers(daemon).values())


@pytest.mark.requires("containerd")
def test_a_second_instance_is_refused(daemon):
    with pytest.raises(containerd.ContainerdError, match="already running"):
        containerd.Containerd().start()
    assert containerd.pid() == daemon.process.pid


@pytest.mark.requires("containerd")
def test_sweep_after_a_crash_leaves_nothing(daemon, client):
    """Last: pods left running, as if the kernel died; then the sweeps of both modules."""
    for name in ("crashed", "crashed-too"):
        pod = cri.Pod(client, name).start()
        pod.add("box", containerd.BUSYBOX, ["sleep", "60"])               # never removed
    assert any(_leftovers(daemon).values())
    shims = [a for a in helpers.leftovers() if "containerd-shim" in a]
    assert shims
    containerd.sweep_pods()
    assert client.pods() == [] and daemon.ctr("tasks", "ls", "-q").split() == []
    containerd.sweep()
    containerd.sweep()                                                    # twice is fine
    assert containerd.pid() is None and not containerd.HOME.exists()
    assert not [a for a in helpers.leftovers() if "containerd" in a or "cnlab-pod" in a]
    assert containerd.BRIDGE not in subprocess.run(["ip", "-br", "link"], capture_output=True,
                                                   text=True).stdout
    assert not list(Path("/sys/fs/cgroup").glob("*/cnlab-pod-*"))
