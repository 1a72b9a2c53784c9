"""helpers.cgroups: strict parsing, the v2 code on a fake cgroupfs and on a real one, and real
groups on this machine.

The real tests drive whatever this machine has (here: v1 controllers plus a controller-less
cgroup2). The v2 API is checked twice (the ``v2`` fixture): against ``FakeCgroupfs``, a tree
in a temporary folder that answers mkdir and rmdir the way the kernel's cgroupfs does, and
against the kernel's own cgroup2 where the machine is v2-only with controllers: in the v2
guest (tests/test_v2guest.py boots one and runs this file in it). The ``real_v2`` tests drive
the v2 controllers themselves, so they too run there and are skipped, saying so, elsewhere.
"""
import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import helpers
from helpers import cgroups, ns
from helpers._core import names
from helpers.containers.cgroups import Cgroup, Layout
from helpers.errors import BadInput, LabError, LabTimeout, NotSupported

DATA = Path(__file__).parent / "data" / "cgroupfs-v2"


def _leftovers():
    """This module's kinds of cnlab leftovers (processes of other work may come and go)."""
    return {item for item in helpers.leftovers() if item.startswith(("cgroup",))}


# --- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("64M", 64 << 20), ("1.5G", 3 << 29), ("512K", 512 << 10), ("1T", 1 << 40),
    ("1048576", 1048576), (4096, 4096), (" 64M ", 64 << 20)])
def test_sizes_parse_to_bytes(text, size):
    assert cgroups.parse_size(text) == size


@pytest.mark.parametrize("text", ["64X", "-64M", "0", "0M", "1.5", "64 M", "64m", "M", "", None,
                                  True, -1, 1.5, "64MB", "1e6"])
def test_bad_sizes_say_the_accepted_forms(text):
    with pytest.raises(BadInput) as caught:
        cgroups.parse_size(text)
    assert isinstance(caught.value, ValueError)
    assert "64M" in str(caught.value) and "1.5G" in str(caught.value) and "bytes" in str(caught.value)


@pytest.mark.parametrize("text, cores", [("0.5", 0.5), ("2", 2.0), (0.25, 0.25), (3, 3.0)])
def test_cpu_amounts_parse_to_cores(text, cores):
    assert cgroups.parse_cpus(text) == cores


@pytest.mark.parametrize("text", ["0", 0, 0.0, "-1", -0.5, "half", "1,5", float("inf"),
                                  float("nan"), True, None, "0.5 cores"])
def test_bad_cpu_amounts_say_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"greater than 0 \(0\.5, 2\)"):
        cgroups.parse_cpus(text)


@pytest.mark.parametrize("limits, word", [
    ({"pids": 0}, "pids"), ({"pids": "ten"}, "pids"), ({"cpu_weight": 0}, "cpu_weight"),
    ({"cpu_weight": 10_001}, "cpu_weight"), ({"cpu_period": 10}, "cpu_period"),
    ({"cpus": 0.001}, "smallest quota"), ({"cpuset": "99"}, "cpuset"), ({"cpuset": "0-"}, "cpuset"),
    ({"memory": "64X"}, "memory")])
def test_bad_limits_are_refused_before_anything_is_created(v2, limits, word):
    before = sorted(v2.root.rglob("*"))
    with pytest.raises(BadInput, match=word):
        Cgroup("bad", layout=v2.layout, **limits)
    assert sorted(v2.root.rglob("*")) == before


def test_bad_names_are_refused():
    for name in ("../escape", "a b", "", "x" * 65):
        with pytest.raises(BadInput):
            cgroups._named(name)
    assert cgroups._named("demo") == "cnlab-demo"
    assert cgroups._named("cnlab-demo") == "cnlab-demo"


# --- layout detection -------------------------------------------------------------------------

MOUNTS = {
    "v1": ["32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
           "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
           "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd"],
    "v2": ["31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot"],
    "hybrid": ["35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
               "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"],
}


@pytest.mark.parametrize("version", MOUNTS)
def test_detect_reads_the_layout_from_mountinfo(tmp_path, version):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join(["23 1 0:21 / /sys rw - sysfs sysfs rw", *MOUNTS[version]]) + "\n")
    layout = cgroups.detect(mountinfo=mountinfo)
    assert layout.version == version
    if version == "v1":
        assert layout.v1 == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
                             "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
                             "memory": Path("/sys/fs/cgroup/memory")}
    if version == "hybrid":
        assert layout.v2 == Path("/sys/fs/cgroup/unified") and layout.where("memory") == "v1"


def test_comounted_v1_controllers_share_one_directory(tmp_path):
    root = tmp_path / "cpu,cpuacct"
    root.mkdir()
    group = Cgroup("x", layout=Layout(v1={"cpu": root, "cpuacct": root}))
    assert group.paths == {"cpu": root / "cnlab-x", "cpuacct": root / "cnlab-x"}
    assert group.dirs == [root / "cnlab-x"] and (root / "cnlab-x").is_dir()
    group.remove()
    assert not (root / "cnlab-x").exists()


# --- v2 on a fake cgroupfs --------------------------------------------------------------------

class FakeCgroupfs:
    """A cgroup2 hierarchy in a temporary folder. mkdir gives a group the interface files of
    the controllers its parent enabled (tests/data/cgroupfs-v2); rmdir removes a group with
    its files, or fails with EBUSY while it has processes or sub-groups, like the kernel."""

    def __init__(self, root, controllers=("cpu", "memory", "pids", "cpuset")):
        self.root = root
        shutil.copytree(DATA / "root", root, dirs_exist_ok=True)
        (root / "cgroup.controllers").write_text(" ".join(controllers) + "\n")
        self.layout = Layout(v2=root, v2_controllers=tuple(controllers))
        self.busy = {}                    # path -> how many more rmdirs answer EBUSY

    def __getattr__(self, name):          # everything but mkdir and rmdir is the real os
        return getattr(os, name)

    def mkdir(self, path, mode=0o777):
        path = Path(path)
        os.mkdir(path, mode)
        enabled = [c.lstrip("+") for c in (path.parent / "cgroup.subtree_control").read_text().split()]
        for part in ["core", *enabled]:
            shutil.copytree(DATA / part, path, dirs_exist_ok=True)
        (path / "cgroup.controllers").write_text(" ".join(enabled) + "\n")

    def rmdir(self, path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if self.busy.get(path, 0) > 0 or (path / "cgroup.procs").read_text().strip() \
                or any(p.is_dir() for p in path.iterdir()):
            self.busy[path] = self.busy.get(path, 0) - 1
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        shutil.rmtree(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fs = FakeCgroupfs(tmp_path / "cgroup")
    monkeypatch.setattr(cgroups, "os", fs)
    return fs


V2_CONTROLLERS = {"memory", "cpu", "pids", "cpuset"}


def _not_v2():
    """Why this machine's kernel cannot run the v2 tests, or None."""
    layout = cgroups.detect()
    if layout.version != "v2" or not V2_CONTROLLERS <= set(layout.v2_controllers):
        return (f"needs a cgroup v2 machine with the {', '.join(sorted(V2_CONTROLLERS))} controllers "
                f"(this one is {layout.version}): runs in the v2 guest step (tests/test_v2guest.py)")
    if os.geteuid() != 0:
        return "needs root, to make cgroups"
    return None


class KernelCgroupfs:
    """The kernel's cgroup2 hierarchy, where the tests of the fake one run too. What a test made
    in it is removed after it (the fake tree goes with its temporary folder)."""

    def __init__(self):
        self.layout = cgroups.detect()
        self.root = self.layout.v2
        self.before = set(self.root.iterdir())

    def remove_new(self):
        """The course's groups only: on a v2 laptop, others (systemd's) may come and go meanwhile."""
        made = [p for p in self.root.iterdir()
                if p.is_dir() and p not in self.before and p.name.startswith(names.PREFIX)]
        cgroups.remove_dirs(made)


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.requires("root"))])
def v2(request):
    """A cgroup2 hierarchy with the memory, cpu, pids and cpuset controllers: the fake tree, then
    the kernel's (only on a v2-only machine: elsewhere skipped with the reason)."""
    if request.param == "fake":
        return request.getfixturevalue("fake")
    why = _not_v2()
    if why:
        pytest.skip(why)
    tree = KernelCgroupfs()
    request.addfinalizer(tree.remove_new)
    return tree


def _text(path):
    """A cgroup file's value: the kernel ends each with a newline, the fake tree does not."""
    return path.read_text().strip()


def test_v2_limits_go_to_the_v2_files(v2):
    group = Cgroup("web", layout=v2.layout, memory="64M", cpus=0.5, cpu_weight=200, pids=20,
                   cpuset="0")
    path = v2.root / "cnlab-web"
    assert group.paths == {"v2": path}
    enabled = {c.lstrip("+") for c in _text(v2.root / "cgroup.subtree_control").split()}
    assert V2_CONTROLLERS <= enabled                     # the kernel lists them without the +
    assert group.settings == {str(path / name): _text(path / name) for name in
                              ("memory.max", "memory.swap.max", "cpu.max", "cpu.weight", "pids.max",
                               "cpuset.cpus")}
    assert {name: _text(path / name) for name in
            ("memory.max", "memory.swap.max", "cpu.max", "cpu.weight", "pids.max", "cpuset.cpus")} == {
        "memory.max": "67108864", "memory.swap.max": "0", "cpu.max": "50000 100000",
        "cpu.weight": "200", "pids.max": "20", "cpuset.cpus": "0"}


def test_v2_quota_uses_the_given_period(v2):
    Cgroup("p", layout=v2.layout, cpus="1.5", cpu_period=20_000)
    assert _text(v2.root / "cnlab-p" / "cpu.max") == "30000 20000"


def test_v2_stats_are_read_from_the_kernel_files(fake):
    group = Cgroup("s", layout=fake.layout)
    path = group.paths["v2"]
    (path / "memory.current").write_text("1048576\n")
    (path / "memory.peak").write_text("33554432\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 0\n")
    (path / "cpu.stat").write_text("usage_usec 250000\nuser_usec 200000\nsystem_usec 50000\n"
                                   "nr_periods 10\nnr_throttled 8\nthrottled_usec 700000\n")
    (path / "pids.current").write_text("3\n")
    (path / "pids.events").write_text("max 81\n")
    assert group.stats() == cgroups.Stats(
        memory_current=1048576, memory_peak=33554432, oom_kills=1, cpu_usage_us=250000,
        cpu_periods=10, cpu_throttled=8, cpu_throttled_us=700000, pids_current=3, pids_refused=81)


def test_limit_files_of_any_process_s_folders(v2):
    """What of_process finds for a container on a v2-only machine: one folder, v2 files."""
    group = Cgroup("c", layout=v2.layout, memory="512M", cpus=0.5, cpu_weight=20)
    folders = {"v2": group.paths["v2"]}
    files = {path.name: text for path, text in cgroups.limit_files(folders).items()}
    assert files == {"memory.max": "536870912", "cpu.max": "50000 100000", "cpu.weight": "20",
                     "pids.max": "max"}
    assert cgroups.limits_in(folders) == {"memory": 512 << 20, "cpus": 0.5, "pids": None}


def test_stats_of_any_process_s_folders(fake):
    group = Cgroup("c", layout=fake.layout, memory="512M", cpus=0.5, cpu_weight=20)
    folders = {"v2": group.paths["v2"]}
    (group.paths["v2"] / "cpu.stat").write_text("usage_usec 5\nnr_periods 3\nnr_throttled 2\n"
                                                 "throttled_usec 9\n")
    assert cgroups.stats_in(folders, fake.layout) == group.stats()
    assert group.stats().cpu_throttled == 2


def test_sample_reads_every_group_over_time(fake):
    groups = [Cgroup("a", layout=fake.layout), Cgroup("b", layout=fake.layout)]
    (groups[1].paths["v2"] / "cpu.stat").write_text("usage_usec 7\n")
    samples = cgroups.sample(groups, seconds=0.2, every=0.05)
    assert 4 <= len(samples) <= 6 and samples[0][0] < 0.05 and samples[-1][0] >= 0.2
    assert [[s.cpu_usage_us for s in stats] for _, stats in samples] == [[0, 7]] * len(samples)


def test_v2_without_controllers_still_counts_cpu_time(tmp_path, monkeypatch):
    fs = FakeCgroupfs(tmp_path / "unified", controllers=())
    monkeypatch.setattr(cgroups, "os", fs)
    group = Cgroup("bare", layout=fs.layout)
    assert (fs.root / "cgroup.subtree_control").read_text() == ""
    (group.paths["v2"] / "cpu.stat").write_text("usage_usec 42\nuser_usec 40\nsystem_usec 2\n")
    stats = group.stats()
    assert stats.cpu_usage_us == 42
    assert stats.memory_current is stats.oom_kills is stats.pids_current is stats.cpu_throttled is None


def test_a_limit_without_its_controller_is_not_supported(tmp_path, monkeypatch):
    fs = FakeCgroupfs(tmp_path / "unified", controllers=("pids",))
    monkeypatch.setattr(cgroups, "os", fs)
    for limits in ({"memory": "64M"}, {"cpus": 1}, {"cpu_weight": 50}):
        with pytest.raises(NotSupported, match="no (memory|cpu) controller"):
            Cgroup("n", layout=fs.layout, **limits)
    assert not (fs.root / "cnlab-n").exists()
    Cgroup("n", layout=fs.layout, pids=5)
    assert (fs.root / "cnlab-n" / "pids.max").read_text() == "5"


def test_a_setting_the_kernel_lacks_is_an_error_not_a_no_op(fake):
    original = fake.mkdir                    # a kernel without CPU bandwidth control


    def mkdir_without_bandwidth(path, mode=0o777):
        original(path, mode)
        (Path(path) / "cpu.max").unlink()
    fake.mkdir = mkdir_without_bandwidth
    with pytest.raises(NotSupported, match="cpu.max does not exist"):
        Cgroup("nobw", layout=fake.layout, cpus=1)
    assert not (fake.root / "cnlab-nobw").exists()     # the half-made group was removed


def test_an_existing_group_is_not_silently_reused(v2):
    Cgroup("twice", layout=v2.layout)
    with pytest.raises(LabError, match="already exists"):
        Cgroup("twice", layout=v2.layout)


def test_v2_freeze_waits_for_the_kernel_to_report_frozen(fake):
    group = Cgroup("f", layout=fake.layout)
    path = group.paths["v2"]
    with pytest.raises(LabTimeout, match="freeze"):
        group.freeze(timeout=0.05)                     # nobody flips cgroup.events here
    assert (path / "cgroup.freeze").read_text() == "1"
    (path / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    group.freeze()
    assert group.frozen
    group.thaw()
    assert (path / "cgroup.freeze").read_text() == "0"


def test_v2_kill_writes_cgroup_kill(fake):
    group = Cgroup("k", layout=fake.layout)
    group.kill()
    assert (group.paths["v2"] / "cgroup.kill").read_text() == "1"


def test_remove_goes_bottom_up_retries_ebusy_and_can_be_repeated(fake):
    group = Cgroup("top", layout=fake.layout, pids=10)
    child = Cgroup("sub", parent=group)
    grandchild = Cgroup("leaf", parent=child)
    assert grandchild.paths["v2"] == fake.root / "cnlab-top" / "cnlab-sub" / "cnlab-leaf"
    assert (group.paths["v2"] / "cgroup.subtree_control").read_text() == "+memory +cpu +cpuset +pids"
    fake.busy[group.paths["v2"]] = 3                   # the kernel is still tearing a task down
    group.remove()
    assert not group.paths["v2"].exists() and fake.busy[group.paths["v2"]] == 0
    group.remove()                                     # already gone counts as removed
    grandchild.remove()


def test_remove_gives_up_on_a_group_that_stays_busy(fake):
    group = Cgroup("stuck", layout=fake.layout)
    fake.busy[group.paths["v2"]] = 10**6
    start = time.monotonic()
    with pytest.raises(LabError, match="cannot remove cgroup .*cnlab-stuck: Device or resource busy"):
        group.remove(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2
    fake.busy.clear()
    group.remove()


# --- real groups on this machine --------------------------------------------------------------

def hog():
    """Touch memory until the kernel says no."""
    chunks = []
    while True:
        chunks.append(b"\1" * (1 << 20))


def burn(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def fork_bomb(attempts):
    """A bounded fork bomb: try ``attempts`` forks, count the refusals, then clean up."""
    children, refused = [], 0
    for _ in range(attempts):
        try:
            pid = os.fork()
        except BlockingIOError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return len(children), refused


def spawner(n):
    """Start n sleeping children and sleep with them: a group under load."""
    for _ in range(n):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    time.sleep(60)


def _gone(group):
    return not any(p.exists() for p in group.paths.values())


@pytest.fixture
def real():
    return cgroups.detect()


@pytest.mark.requires("root")
def test_oom_kill_is_seen_in_the_events_and_exits_137(real):
    with Cgroup("oom", memory="32M") as group:
        result = ns.run(hog, cgroup=group, timeout=30)
        stats = group.stats()
    assert (result.status, result.signal) == (137, 9)
    assert stats.oom_kills == 1
    assert 16 << 20 < stats.memory_peak <= 32 << 20
    assert _gone(group)


@pytest.mark.requires("root")
def test_cpu_quota_throttles(real):
    with Cgroup("quota", cpus=0.2) as group:
        ns.run(burn, 1.0, cgroup=group)
        stats = group.stats()
    assert 0.1e6 < stats.cpu_usage_us < 0.35e6           # about 0.2 s of CPU in 1 s
    assert stats.cpu_periods >= 8 and stats.cpu_throttled >= stats.cpu_periods - 2
    assert stats.cpu_throttled_us > 0.5e6


@pytest.mark.requires("root")
def test_pids_limit_stops_a_fork_bomb(real):
    with Cgroup("bomb", pids=20) as group:
        made, refused = ns.run(fork_bomb, 100, cgroup=group).value
        assert (made, refused) == (19, 81)               # the bomb itself is the 20th
        assert group.stats().pids_refused == 81


@pytest.mark.requires("root")
def test_cpu_weights_share_one_core(real):
    with Cgroup("light", cpu_weight=100, cpuset="0") as light, \
            Cgroup("heavy", cpu_weight=300, cpuset="0") as heavy:
        with ns.start(burn, 1.5, cgroup=light) as a, ns.start(burn, 1.5, cgroup=heavy) as b:
            a.wait(10), b.wait(10)
        ratio = heavy.stats().cpu_usage_us / light.stats().cpu_usage_us
    assert 2 < ratio < 4.5                               # 300:100 weights -> about 3x the CPU


@pytest.mark.requires("root")
def test_weight_and_cpuset_land_in_the_files_of_this_layout(real):
    with Cgroup("files", cpu_weight=300, cpuset="0", pids=7) as group:
        assert len(group.settings) == 3
        assert all(Path(f).read_text().strip() == v for f, v in group.settings.items())
        cpu = group._dir("cpu")
        if real.where("cpu") == "v1":
            assert (cpu / "cpu.shares").read_text().strip() == "3072"
        else:
            assert (cpu / "cpu.weight").read_text().strip() == "300"
        assert (group._dir("cpuset") / "cpuset.cpus").read_text().strip() == "0"
        assert (group._dir("pids") / "pids.max").read_text().strip() == "7"


@pytest.mark.requires("root")
def test_controller_less_v2_features_for_real(real):
    if real.v2 is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    v2 = Layout(v2=real.v2, v2_controllers=real.v2_controllers)
    with Cgroup("unified", layout=v2) as group:
        path = group.paths["v2"]
        child = ns.start(spawner, 3, cgroup=group)
        cgroups._until(lambda: len(group.procs()) == 4, 5, "the spawner's children")
        assert child.pid in group.procs()
        assert (path / "cgroup.procs").read_text().split()[0] == str(child.pid)
        assert "populated 1" in (path / "cgroup.events").read_text()
        group.freeze()
        assert "frozen 1" in (path / "cgroup.events").read_text() and group.frozen
        group.thaw()
        assert not group.frozen
        group.kill()
        assert group.procs() == [] and "populated 0" in (path / "cgroup.events").read_text()
        assert child.wait(5).status == 137
    assert not path.exists()


@pytest.fixture
def real_v2():
    """This machine's layout, if it is v2-only with controllers (the v2 guest); else a skip."""
    why = _not_v2()
    if why:
        pytest.skip(why)
    return cgroups.detect()


def fork_until_refused(limit):
    """Fork sleeping children until the kernel refuses one: (children made, the fork's errno)."""
    children = []
    try:
        for _ in range(limit + 5):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        return len(children), None
    except OSError as e:
        return len(children), e.errno
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.requires("root")
def test_real_v2_memory_max_oom_kills(real_v2):
    with Cgroup("v2-oom", memory="32M") as group:
        path = group.paths["v2"]
        assert _text(path / "memory.max") == str(32 << 20)
        result = ns.run(hog, cgroup=group, timeout=60)
        events = cgroups._keyed(path / "memory.events")
    assert (result.status, result.signal) == (137, 9)
    assert events["oom_kill"] == 1 and events["max"] > 0    # it hit memory.max, then was killed


@pytest.mark.requires("root")
def test_real_v2_cpu_max_quota_throttles(real_v2):
    with Cgroup("v2-quota", cpus=0.2) as group:
        path = group.paths["v2"]
        assert _text(path / "cpu.max") == "20000 100000"
        before = cgroups._keyed(path / "cpu.stat")
        ns.run(burn, 1.0, cgroup=group, timeout=60)
        after = cgroups._keyed(path / "cpu.stat")
    assert before["nr_throttled"] == 0 and after["nr_throttled"] >= 5   # of about 10 periods
    assert after["nr_throttled"] <= after["nr_periods"] and after["throttled_usec"] > 0
    assert after["usage_usec"] < 0.5e6                  # about 0.2 s of CPU in 1 s, not 1 s


@pytest.mark.requires("root")
def test_real_v2_pids_max_stops_a_fork(real_v2):
    with Cgroup("v2-pids", pids=5) as group:
        assert _text(group.paths["v2"] / "pids.max") == "5"
        made, error = ns.run(fork_until_refused, 5, cgroup=group, timeout=60).value
        events = cgroups._keyed(group.paths["v2"] / "pids.events")
    assert (made, error) == (4, errno.EAGAIN)           # the forking process itself is the 5th
    assert events["max"] == 1


@pytest.mark.requires("root")
def test_real_v2_cgroup_kill_kills_every_process(real_v2):
    with Cgroup("v2-kill") as group:
        path = group.paths["v2"]
        child = ns.start(spawner, 3, cgroup=group)
        cgroups._until(lambda: len(group.procs()) == 4, 10, "the spawner's children")
        (path / "cgroup.kill").write_text("1")          # the kernel kills them all, forks included
        cgroups._until(lambda: "populated 0" in (path / "cgroup.events").read_text(), 10,
                       "the group to empty")
        assert group.procs() == []
        assert child.wait(10).status == 137


@pytest.mark.requires("root")
def test_real_v2_a_group_with_sub_groups_holds_no_processes(real_v2):
    with Cgroup("v2-parent") as parent, Cgroup("leaf", parent=parent, pids=5):
        with pytest.raises(LabError, match="add it to a sub-group"):
            ns.run(lambda: None, cgroup=parent)


@pytest.mark.requires("root")
def test_real_v2_cgroup_freeze_stops_then_thaws(real_v2):
    with Cgroup("v2-freeze") as group:
        path = group.paths["v2"]
        used = lambda: cgroups._keyed(path / "cpu.stat")["usage_usec"]  # noqa: E731
        child = ns.start(burn, 60, cgroup=group)
        cgroups._until(lambda: used() > 50_000, 20, "the burner to run")
        group.freeze()
        assert cgroups._keyed(path / "cgroup.events")["frozen"] == 1 and group.frozen
        frozen_at = used()
        time.sleep(0.5)
        assert used() - frozen_at < 20_000               # frozen: no CPU time, though it burns
        group.thaw()
        cgroups._until(lambda: cgroups._keyed(path / "cgroup.events")["frozen"] == 0, 10, "the thaw")
        cgroups._until(lambda: used() - frozen_at > 100_000, 20, "the burner to run again")
        group.kill()
        assert child.wait(10).status == 137


@pytest.mark.requires("root")
def test_v1_freeze_and_kill_without_cgroup_kill(real):
    if not real.v1:
        pytest.skip("no cgroup v1 hierarchy mounted")
    v1 = Layout(v1=real.v1)
    with Cgroup("v1", layout=v1, memory="64M") as group:
        assert "v2" not in group.paths
        child = ns.start(spawner, 3, cgroup=group)
        cgroups._until(lambda: len(group.procs()) == 4, 5, "the spawner's children")
        group.freeze()
        assert (group.paths["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
        group.kill()                                     # thaws, then SIGKILLs pid by pid
        assert group.procs() == []
        assert child.wait(5).status == 137


@pytest.mark.requires("root")
def test_remove_under_load_kills_and_removes_sub_groups_twice(real):
    group = Cgroup("load")
    sub = Cgroup("sub", parent=group, pids=50)
    child = ns.start(spawner, 5, cgroup=sub)
    cgroups._until(lambda: len(sub.procs()) == 6, 5, "the spawner's children")
    group.remove()
    assert _gone(group) and _gone(sub)
    group.remove()
    sub.remove()
    assert child.wait(5).status == 137


@pytest.mark.requires("root")
def test_a_test_that_fails_midway_leaves_nothing(real):
    before = _leftovers()
    with pytest.raises(RuntimeError, match="midway"):
        with Cgroup("midway", memory="64M", pids=10) as group:
            child = ns.start(spawner, 2, cgroup=group)    # not in a with: the group must kill it
            raise RuntimeError("midway")
    assert child.wait(5).status == 137
    assert _gone(group)
    assert _leftovers() <= before and ns.children() == []


@pytest.mark.requires("root")
def test_sweep_kills_and_removes_what_a_crash_left(real):
    group = Cgroup("crashed", cpus=0.5)
    inner = Cgroup("inner", parent=group)
    child = ns.start(spawner, 2, cgroup=inner)          # v2: a group with sub-groups holds none
    cgroups.sweep(prefix="cnlab-crashed")               # only ours: others may be running
    assert _gone(group)
    assert child.wait(5).status == 137
    cgroups.sweep(prefix="cnlab-crashed")               # nothing left: still fine


@pytest.mark.requires("root")
def test_a_limit_this_machine_cannot_apply_is_refused_for_real(real):
    if real.v2 is None or "memory" in real.v2_controllers:
        pytest.skip("needs a cgroup2 hierarchy without the memory controller")
    with pytest.raises(NotSupported, match="no memory controller"):
        Cgroup("nomem", layout=Layout(v2=real.v2, v2_controllers=real.v2_controllers), memory="64M")
    assert not (real.v2 / "cnlab-nomem").exists()


def test_held_says_the_same_on_v1_and_v2(fake, tmp_path):
    """A limit read back is in the course's units whichever files hold it: v2's here, and v1's
    (cpu.shares 4096 is weight 400) in a folder laid out like a v1 group."""
    group = Cgroup("held", layout=fake.layout, memory="64M", cpus=0.25, cpu_weight=400, pids=16)
    v2 = cgroups.held(group.paths)
    v1 = tmp_path / "v1"
    v1.mkdir()
    for name, text in {"memory.limit_in_bytes": "67108864", "cpu.cfs_quota_us": "25000",
                       "cpu.cfs_period_us": "100000", "cpu.shares": "4096", "pids.max": "16"}.items():
        (v1 / name).write_text(text + "\n")
    assert v2 == cgroups.held({"memory": v1, "cpu": v1, "pids": v1}) == {
        "memory": 64 << 20, "cpus": 0.25, "pids": 16, "cpu_weight": 400}
    assert cgroups.held({"v2": Cgroup("free", layout=fake.layout).paths["v2"]}) == {
        "memory": None, "cpus": None, "pids": None, "cpu_weight": 100}
