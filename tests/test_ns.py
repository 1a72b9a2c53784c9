"""helpers.ns: every namespace type created for real in a child, joined, listed, and swept.

The test process itself never changes namespace: each test also checks the host side.
"""
import errno
import os
import socket
import subprocess
import tempfile
import time

import pytest

import helpers
from helpers import ns
from helpers.errors import BadInput, LabError, LabTimeout


def _mounts(match):
    """The host's mounts (point, type, source) that mention ``match``."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    found = [(f[4], f[f.index("-") + 1], f[f.index("-") + 2]) for f in fields]
    return sorted(m for m in found if any(match in part for part in m))


def _ids(pid, field):
    """The real uid (or gid) of a process, as the host sees it."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _leftovers():
    """This module's kinds of cnlab leftovers (processes of other work may come and go)."""
    return {item for item in helpers.leftovers() if item.startswith(("netns", "mount"))}


# --- input is checked before anything is forked -----------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"new": ["uts", "bogus"]}, "unknown namespace type 'bogus'"),
    ({"new": ["uts", "uts"]}, "once"),
    ({"hostname": "box"}, 'new=\\["uts"\\]'),
    ({"uid_map": [(0, 1000, 1)]}, "new user namespace"),
    ({"new": ["user"], "uid_map": [(0, -1, 1)]}, "not an id map"),
    ({"new": ["user"], "uid_map": "0 1000 1"}, "not an id map"),
    ({"new": ["time"], "clocks": {"realtime": 5}}, "clocks="),
    ({"clocks": {"boottime": 5}}, "new time namespace"),
    ({"join": ["net"]}, "list of Namespace objects"),
])
def test_bad_options_are_refused_before_forking(monkeypatch, options, words):
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked despite bad input"))
    with pytest.raises(BadInput, match=words) as caught:
        ns.start(os.getpid, **options)
    assert isinstance(caught.value, ValueError)


def test_a_target_must_be_a_callable_or_a_command(monkeypatch):
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked despite bad input"))
    for target in ("ls -l", [], [1, 2], None):
        with pytest.raises(BadInput, match="callable, or a command"):
            ns.start(target)


def test_flags_name_the_valid_types():
    assert ns.flags(["pid", "mnt"]) == ns.NAMESPACES["pid"] | ns.NAMESPACES["mnt"]
    assert ns.flags("net") == 0x40000000
    with pytest.raises(BadInput, match="uts, pid, mnt, net, ipc, user, cgroup, time"):
        ns.flags(["network"])


def test_netns_names_and_addresses_are_checked(monkeypatch):
    for name in ("a b", "../x", "", "x" * 49, 7):
        with pytest.raises(BadInput):
            ns.NetNS(name)
    with pytest.raises(BadInput, match="prefix length"):
        ns.connect(None, None, "10.200.0.1/33", "10.200.0.2/24")


# --- each namespace type, for real ------------------------------------------------------------

@pytest.mark.requires("root")
def test_uts_hostname_changes_inside_only():
    outside = socket.gethostname()
    result = ns.run(socket.gethostname, new=["uts"], hostname="cnlab-box")
    assert result.value == "cnlab-box" and result.ok
    assert socket.gethostname() == outside


@pytest.mark.requires("root")
def test_pid_namespace_makes_pid_1_with_its_own_proc():
    host_procs = _mounts("proc")

    def inside():
        return os.getpid(), sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    result = ns.run(inside, new=["pid", "mnt"])
    assert result.value == (1, [1])
    assert result.pid != 1 and result.pid > 1           # the host sees a normal pid
    assert _mounts("proc") == host_procs                # the new /proc never reached the host


@pytest.mark.requires("root")
def test_a_private_mount_is_invisible_to_the_host(tmp_path):
    command = ["sh", "-c", f"mount -t tmpfs cnlab-private {tmp_path} && touch {tmp_path}/inside "
                           f"&& ls {tmp_path} && grep -c cnlab-private /proc/self/mountinfo"]
    result = ns.run(command, new=["mnt"])
    assert (result.status, result.output) == (0, "inside\n1\n")
    assert list(tmp_path.iterdir()) == []
    assert _mounts(str(tmp_path)) == _mounts("cnlab-private") == []


@pytest.mark.requires("root")
def test_a_new_network_namespace_has_only_a_loopback_that_is_down():
    result = ns.run(socket.if_nameindex, new=["net"])
    assert result.value == [(1, "lo")]
    assert len(socket.if_nameindex()) > 1                 # the host has more
    link = ns.run(["ip", "-o", "link", "show", "lo"], new=["net"])
    assert link.status == 0 and "<LOOPBACK>" in link.output and "state DOWN" in link.output


@pytest.mark.requires("root")
def test_ipc_objects_stay_in_their_namespace():
    count = "ipcmk -Q >/dev/null && ipcs -q | grep -c '^0x'"
    outside_before = subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout
    inside = ns.run(["sh", "-c", count], new=["ipc"])
    assert (inside.status, inside.output) == (0, "1\n")
    assert subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout == outside_before
    assert ns.run(["sh", "-c", "ipcs -q | grep -c '^0x'"], new=["ipc"]).output == "0\n"


@pytest.mark.requires("root")
def test_root_inside_a_user_namespace_is_unprivileged_outside():
    with ns.start(["sleep", "30"], new=["user"], uid_map=[(0, 100_000, 65_536)]) as child:
        assert (_ids(child.pid, "Uid"), _ids(child.pid, "Gid")) == (100_000, 100_000)
        with open(f"/proc/{child.pid}/uid_map") as f:
            assert f.read().split() == ["0", "100000", "65536"]
    with tempfile.TemporaryDirectory() as shared:        # in /tmp: reachable by any uid
        os.chmod(shared, 0o777)
        inside = ns.run(["sh", "-c", f"id -u; touch {shared}/made-by-root; cat /etc/shadow"],
                        new=["user"])
        assert inside.status == 1 and inside.output.startswith("0\n")
        assert "Permission denied" in inside.output      # root in there is nobody special here
        assert os.stat(f"{shared}/made-by-root").st_uid == 100_000


@pytest.mark.requires("root")
def test_user_namespace_with_other_namespaces_owned_by_it():
    def inside():
        return os.getuid(), os.getpid(), socket.gethostname()
    result = ns.run(inside, new=["user", "uts", "pid", "mnt"], hostname="cnlab-u")
    assert result.value == (0, 1, "cnlab-u")


@pytest.mark.requires("root")
def test_cgroup_namespace_makes_the_current_group_the_root():
    class Here:                      # joins nothing: the namespace's root is where we already are
        def add(self, pid=0):
            pass
    inside = ns.run(["cat", "/proc/self/cgroup"], new=["cgroup"], cgroup=Here()).output
    assert all(line.endswith(":/") for line in inside.splitlines())


@pytest.mark.requires("root")
def test_time_namespace_offsets_boottime():
    day, outside = 86_400, time.clock_gettime(time.CLOCK_BOOTTIME)
    inside = ns.run(time.clock_gettime, time.CLOCK_BOOTTIME, new=["time"],
                    clocks={"boottime": day}).value
    assert day <= inside - outside < day + 5


# --- running: results, output, errors ---------------------------------------------------------

@pytest.mark.requires("root")
def test_a_command_reports_status_and_output():
    result = ns.run(["sh", "-c", "echo out; echo err >&2; exit 3"], new=["uts"])
    assert (result.status, result.signal, result.output, result.value) == (3, None, "out\nerr\n", None)


@pytest.mark.requires("root")
def test_print_in_a_callable_is_captured_and_exit_codes_pass_through():
    def talk():
        print("hello from the child")
        raise SystemExit(4)
    result = ns.run(talk, new=["pid"])
    assert (result.status, result.output) == (4, "hello from the child\n")


@pytest.mark.requires("root")
def test_an_exception_in_the_child_is_raised_here_with_its_traceback():
    def fails():
        raise KeyError("inside")
    with pytest.raises(KeyError, match="inside") as caught:
        ns.run(fails, new=["pid"])
    assert "raised in the child" in caught.value.__notes__[0]
    assert "fails" in caught.value.__notes__[0]


@pytest.mark.requires("root")
def test_a_missing_command_is_file_not_found():
    with pytest.raises(FileNotFoundError):
        ns.run(["cnlab-no-such-program"])
    with pytest.raises(FileNotFoundError):      # by start() itself, as subprocess.Popen does
        ns.start(["cnlab-no-such-program"], new=["pid", "mnt"])


@pytest.mark.requires("root")
@pytest.mark.parametrize("new", [[], ["user", "pid", "mnt"]])
def test_start_returns_once_the_command_runs(new):
    # /proc shows the command, not the Python that was forked to run it (the fork-to-exec window
    # is short: repeated, a start that returns early is seen at least once)
    for _ in range(20):
        with ns.start(["sleep", "30"], new=new) as child:
            assert os.path.basename(os.readlink(f"/proc/{child.pid}/exe")) == "sleep"


@pytest.mark.requires("root")
def test_a_syscall_error_names_the_namespace():
    def nested_user_namespace_in_a_chroot():
        os.chroot("/usr")                  # a chrooted process may not create a user namespace
        ns.unshare("user")
    with pytest.raises(PermissionError) as caught:
        ns.run(nested_user_namespace_in_a_chroot)
    assert caught.value.errno == errno.EPERM and caught.value.filename == "user"
    assert "cannot create a new user namespace" in str(caught.value)

    with ns.Namespace.of("self", "user") as mine:
        with pytest.raises(OSError, match=r"cannot join user namespace user:\[\d+\]") as caught:
            ns.run(os.getpid, join=[mine])     # setns into the namespace it is already in
    assert caught.value.errno == errno.EINVAL


@pytest.mark.requires("root")
def test_a_timeout_kills_the_child_and_everything_it_started():
    start = time.monotonic()
    with pytest.raises(LabTimeout, match="did not finish within 0.5 s"):
        ns.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 5
    assert not subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True).stdout


@pytest.mark.requires("root")
def test_children_lists_what_is_still_running():
    assert ns.children() == []
    with ns.start(["sleep", "30"]) as child:
        assert ns.children() == [child.pid]
    assert ns.children() == []


@pytest.mark.requires("root")
def test_an_exception_in_the_with_block_kills_and_reaps_the_child():
    with pytest.raises(RuntimeError, match="midway"):
        with ns.start(["sleep", "30"], new=["pid", "net"]) as child:
            raise RuntimeError("midway")
    assert child.wait().status == 137 and child.pid > 1
    assert not os.path.exists(f"/proc/{child.pid}")


# --- joining and listing ----------------------------------------------------------------------

@pytest.mark.requires("root")
def test_join_a_running_process_like_nsenter():
    with ns.start(["sleep", "30"], new=["uts", "net", "pid", "mnt"], hostname="cnlab-joined") as child:
        def inside():
            return socket.gethostname(), socket.if_nameindex(), os.getpid() > 1
        assert ns.run(inside, join=child.pid).value == ("cnlab-joined", [(1, "lo")], True)
        with ns.Namespace.of(child.pid, "uts") as uts:
            assert ns.run(socket.gethostname, join=[uts]).value == "cnlab-joined"


@pytest.mark.requires("root")
def test_namespace_objects_own_an_fd_and_compare_by_inode():
    with ns.start(["sleep", "30"], new=["net"]) as child:
        theirs, mine = ns.Namespace.of(child.pid, "net"), ns.Namespace.of("self", "net")
        assert theirs.kind == "net" and theirs != mine
        assert theirs == ns.Namespace(f"/proc/{child.pid}/ns/net")
        assert f"net:[{theirs.inode}]" == os.readlink(f"/proc/{child.pid}/ns/net")
        theirs.close(), mine.close()
        assert theirs.fd == -1
    with pytest.raises(OSError, match="is not a namespace") as caught:
        ns.Namespace("/etc/hostname")
    assert caught.value.filename == "/etc/hostname"


@pytest.mark.requires("root")
def test_listing_agrees_with_lsns():
    with ns.start(["sleep", "30"], new=["uts", "ipc", "net", "pid", "mnt", "cgroup"]) as child:
        listing = {n.kind: n for n in ns.namespaces(child.pid)}
        assert set(listing) == set(ns.NAMESPACES)
        lsns = {n["kind"]: n for n in ns.lsns(child.pid)}
        assert {k: n.inode for k, n in listing.items()} == {k: n["inode"] for k, n in lsns.items()}
        assert listing["pid"].pids == (child.pid,) and lsns["pid"]["nprocs"] == 1
        # the leader that forked this PID 1 waits outside the new PID namespace, in the others
        for kind in ("uts", "ipc", "net", "mnt", "cgroup"):
            assert len(listing[kind].pids) == lsns[kind]["nprocs"] == 2
            assert child.pid in listing[kind].pids
        assert listing["user"].inode == ns.namespaces()[list(ns.NAMESPACES).index("user")].inode


# --- named network namespaces -----------------------------------------------------------------

@pytest.mark.requires("root")
def test_two_network_namespaces_ping_over_veth():
    with ns.NetNS("test-a") as a, ns.NetNS("test-b") as b:
        assert (a.name, a.path) == ("cnlab-test-a", "/run/netns/cnlab-test-a")
        ns.connect(a, b, "10.200.0.1/24", "10.200.0.2/24")
        assert a.links() == {"lo": "up", "veth0": "up"} and b.links() == {"lo": "up", "veth1": "up"}
        result = ns.ping(a, "10.200.0.2", count=2)
        assert result.ok and "2 packets transmitted, 2 packets received" in result.output
        assert ns.ping(b, "10.200.0.1", count=1).ok
        assert not ns.ping(a, "10.200.0.3", count=1).ok      # nobody there, nowhere else to go
    assert not (ns.NETNS_DIR / "cnlab-test-a").exists()
    a.remove()                                               # twice is fine


@pytest.mark.requires("root")
def test_a_failure_with_netns_and_veth_leaves_nothing():
    before = _leftovers()
    with pytest.raises(RuntimeError, match="midway"):
        with ns.NetNS("fail-a") as a, ns.NetNS("fail-b") as b:
            ns.connect(a, b, "10.201.0.1/30", "10.201.0.2/30")
            with ns.start(["sleep", "30"], join=[a]):
                raise RuntimeError("midway")
    assert _leftovers() <= before and ns.children() == []
    assert not (ns.NETNS_DIR / "cnlab-fail-a").exists() and not (ns.NETNS_DIR / "cnlab-fail-b").exists()
    # the pair was made inside the namespaces and went with them: no end of it is in the host's
    assert {"veth0", "veth1"}.isdisjoint(n for _, n in socket.if_nameindex())


@pytest.mark.requires("root")
def test_an_existing_netns_is_not_reused_and_sweep_removes_leftovers():
    crashed = ns.NetNS("sweepme")                            # as if the kernel died before remove()
    with pytest.raises(LabError, match="already exists"):
        ns.NetNS("sweepme")
    ns.sweep(prefix="cnlab-sweepme")
    assert not (ns.NETNS_DIR / "cnlab-sweepme").exists()
    ns.sweep(prefix="cnlab-sweepme")
    crashed.remove()
