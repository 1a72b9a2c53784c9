"""helpers.sandbox: a container from scratch, its limits, its security defaults, and that it
leaves nothing behind: no cgroup, mount, upper directory or process, even when it fails."""
import random
import socket
import time
from pathlib import Path

import pytest

from helpers import BadInput, LabError, ns, resources, rootfs, sandbox

root = pytest.mark.requires("root")


# --- pure input checks (no root needed: they fail before anything is looked up) -------------

@pytest.mark.parametrize("options, word", [
    (dict(memory="64X"), "size"), (dict(memory=0), "more than 0"), (dict(cpus="lots"), "CPU"),
    (dict(pids=0), "out of range"), (dict(hostname="-bad"), "host name"),
    (dict(hostname="a" * 64), "host name"), (dict(network="bridge"), "network mode"),
    (dict(cap_add=["NOPE"]), "NOPE"), (dict(user="root"), "user id"),
    (dict(env={"A B": "x"}), "environment"), (dict(workdir="tmp"), "absolute"),
])
def test_bad_options_are_refused_before_anything_is_made(options, word):
    with pytest.raises(BadInput, match=word):
        sandbox.Spec.parse("true", **options)


@pytest.mark.parametrize("command", ["", "   ", [], [""], 5, ["ls", None]])
def test_a_command_must_be_a_string_or_a_list_of_strings(command):
    with pytest.raises(BadInput):
        sandbox.Spec.parse(command)


def test_capabilities_are_docker_s_default_set_unless_asked():
    assert {"SYS_ADMIN", "NET_ADMIN", "SYS_MODULE"}.isdisjoint(sandbox.DEFAULT_CAPS)
    assert len(sandbox.DEFAULT_CAPS) == 14 and sandbox.DEFAULT_CAPS <= set(sandbox.CAPABILITIES)
    assert sandbox.security.caps(["cap_net_admin", "SYS_TIME"]) == {"NET_ADMIN", "SYS_TIME"}
    assert sandbox.security.caps("ALL") == set(sandbox.CAPABILITIES)


def test_the_command_line_and_the_magic_share_one_parser():
    parser = sandbox.add_options(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--memory", "64M", "--cpus", "0.5", "--pids", "32", "-H", "box",
                              "-e", "A=1", "--cap-add", "NET_ADMIN", "--unmask"])
    options = sandbox.options(args)
    assert options["memory"] == "64M" and options["hostname"] == "box" and options["env"] == {"A": "1"}
    assert options["cap_add"] == ["NET_ADMIN"] and options["drop_caps"] and not options["mask_paths"]
    assert sandbox.options(parser.parse_args(["--cap-add", "all"]))["drop_caps"] is False
    with pytest.raises(BadInput, match="KEY=VALUE"):
        sandbox.options(parser.parse_args(["-e", "novalue"]))


def test_main_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        sandbox.main(["run", "--memory", "64M"])
    assert e.value.code == 2 and "no command" in capsys.readouterr().err


# --- helpers for the machine tests ----------------------------------------------------------

def _groups():
    return {str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{resources.name('sandbox')}*")}


def _state():
    base = rootfs.STATE
    return {p.name for p in base.iterdir() if p.name not in ("scratch", "layers")} if base.is_dir() else set()


def _host_mounts():
    """This machine's mount table, less the mounts other helpers' tests come and go with."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if not _not_ours(line)]


@pytest.fixture
def clean():
    """Nothing of ours before; nothing of ours after."""
    before = (_groups(), _state(), _host_mounts())
    yield
    assert ns.children() == []
    assert (_groups(), _state(), _host_mounts()) == before


# --- a container, from both sides ------------------------------------------------------------

@root
def test_a_container_has_its_own_hostname_pids_mounts_and_network(clean):
    r = sandbox.run("hostname; echo $$; ps -o pid | wc -l; ip -o link | cut -d: -f2; "
                    "grep -c . /proc/self/mountinfo; cat /proc/self/cgroup | cut -d: -f3 | sort -u",
                    hostname="box", memory="64M", cpus=0.5, pids=32)
    lines = r.output.split()
    assert r.ok and r.status == 0 and r.signal is None, r.output
    assert lines[:4] == ["box", "1", "4", "lo"]          # header, PID 1, ps and wc
    assert 5 <= int(lines[4]) <= 15                      # its own few mounts, not the host's
    assert lines[5:] == ["/"]                            # its cgroup is the root of its view
    assert socket.gethostname() != "box"
    assert r.pid > 1 and r.memory_peak > 0 and r.cpu_seconds >= 0 and r.seconds > r.startup > 0
    assert not (r.oom_killed or r.pids_limited or r.throttled or r.timed_out)


@root
def test_the_rootfs_is_never_written_to_and_the_old_root_is_gone(clean):
    r = sandbox.run("echo changed > /etc/hostname; rm /etc/group; ls /etc; ls /proc/1/root/work 2>&1;"
                    " ls / | tr '\\n' ' '")
    assert "changed" not in (rootfs.busybox_rootfs() / "etc" / "hostname").read_text()
    assert (rootfs.busybox_rootfs() / "etc" / "group").exists()
    assert "group" not in r.output.split() and "No such file" in r.output
    assert r.output.splitlines()[-1].split() == ["bin", "dev", "etc", "home", "proc", "root", "sys",
                                                 "tmp", "var"]


@root
def test_exit_status_output_and_a_missing_command(clean):
    assert sandbox.run(["sh", "-c", "echo out; echo err >&2; exit 7"]).output == "out\nerr\n"
    assert sandbox.run(["sh", "-c", "exit 7"]).status == 7
    r = sandbox.run("exec nonexistent")
    assert r.status == 127 and "not found" in r.output
    with pytest.raises(sandbox.CommandNotFound, match="nonexistent"):
        sandbox.run(["nonexistent", "x"])
    with pytest.raises(BadInput, match="not a root filesystem"):
        sandbox.run(["true"], rootfs="/tmp")


@root
def test_a_start_that_fails_midway_leaves_nothing_behind(clean):
    with pytest.raises(sandbox.StartError, match="No such file"):
        sandbox.run(["true"], workdir="/no/such/dir", memory="16M", pids=8, host_upper=True)


@root
def test_oom_pids_throttling_and_timeout_are_reported(clean):
    oom = sandbox.run("dd if=/dev/zero of=/dev/null bs=64M count=1", memory="16M")
    assert oom.oom_killed and oom.status == 137 and oom.signal == 9, oom
    bomb = sandbox.run("for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1 & done 2>/dev/null; exit 0", pids=4)
    assert bomb.pids_limited and not bomb.oom_killed, bomb
    busy = sandbox.run("timeout 0.5 sh -c 'while :; do :; done'; true", cpus=0.1)
    assert busy.throttled and busy.cpu_seconds < 0.3, busy
    slow = sandbox.run(["sleep", "10"], timeout=0.2)
    assert slow.timed_out and slow.status == 137 and slow.seconds < 5
    assert "timed out" in slow.summary() and "OOM-killed" in oom.summary()


# --- the security defaults, each turned off to show what it stops ----------------------------

@root
@pytest.mark.parametrize("script, option, refused", [
    ("hostname other && hostname", dict(drop_caps=False), "Operation not permitted"),
    ("ip link set lo down && echo down", dict(cap_add=["NET_ADMIN"]), "Operation not permitted"),
    ("echo changed > /proc/sys/kernel/hostname && hostname", dict(readonly_paths=False),
     "Read-only file system"),
    ("mknod /dev/kmsg c 1 11 && echo 'cnlab: test_sandbox' > /dev/kmsg && echo written",
     dict(devices=False), "Operation not permitted"),
])
def test_each_default_stops_something(clean, script, option, refused):
    default, off = sandbox.run(script), sandbox.run(script, **option)
    assert default.status != 0 and refused in default.output, default
    assert off.ok, off


@root
def test_masks_and_no_new_privs(clean):
    script = "wc -c < /proc/keys; ls /sys/firmware | wc -l; grep NoNewPrivs /proc/self/status"
    masked = sandbox.run(script).output.split()
    unmasked = sandbox.run(script, mask_paths=False, no_new_privs=False).output.split()
    assert masked == ["0", "0", "NoNewPrivs:", "1"]
    assert int(unmasked[0]) > 0 and int(unmasked[1]) > 0 and unmasked[2:] == ["NoNewPrivs:", "0"]


@root
def test_file_capabilities_work_only_without_no_new_privs(clean, tmp_path):
    layer = tmp_path / "layer"
    (layer / "usr" / "local" / "bin").mkdir(parents=True)
    cat = layer / "usr" / "local" / "bin" / "cat"
    cat.write_bytes((rootfs.busybox_rootfs() / "bin" / "busybox").read_bytes())
    cat.chmod(0o755)
    sandbox.setcap(cat, ["DAC_OVERRIDE"])
    (layer / "secret").write_text("the host's secret\n")
    (layer / "secret").chmod(0o600)
    stack = [rootfs.busybox_rootfs(), layer]
    blocked = sandbox.run(["/usr/local/bin/cat", "/secret"], rootfs=stack, user="65534")
    allowed = sandbox.run(["/usr/local/bin/cat", "/secret"], rootfs=stack, user="65534",
                          no_new_privs=False)
    assert blocked.status == 1 and "Permission denied" in blocked.output
    assert allowed.output == "the host's secret\n"


@root
def test_a_user_namespace_maps_root_inside_to_an_unprivileged_uid(clean):
    r = sandbox.run("cat /proc/self/uid_map; id -u; touch /tmp/x && echo wrote; cat /dev/null && echo ok",
                    userns=True)
    assert r.output.split() == ["0", "100000", "65536", "0", "wrote", "ok"], r.output


# --- a long-lived container ------------------------------------------------------------------

@root
def test_exec_joins_the_running_container(clean):
    with sandbox.Sandbox(hostname="box", memory="64M", pids=16, host_upper=True) as box:
        assert box.running and box.pid > 1
        first = box.exec("echo hi > /tmp/note; rm /etc/group; ps -o pid,comm")
        assert first.output.splitlines()[1].split() == ["1", "sleep"]
        assert box.exec(["cat", "/tmp/note"]).output == "hi\n"
        assert box.exec("hostname").output == "box\n"
        assert box.exec("exit 3").status == 3
        assert box.exec(["id", "-u"], user="65534").output == "65534\n"
        assert rootfs.changes(box.upper) == {"etc/group": "deleted", "tmp/note": "changed"}
        assert box.exec("sleep 5", timeout=0.1).timed_out
        with pytest.raises(sandbox.CommandNotFound):
            box.exec(["nonexistent"])
        assert box.pid in box.cgroup.procs()
        upper = box.upper
    assert not box.running and not upper.exists()
    with pytest.raises(LabError, match="not running"):
        box.exec("true")


@root
def test_a_sandbox_with_a_command_is_waited_for(clean):
    with sandbox.Sandbox(["sh", "-c", "sleep 0.1; echo done"], pids=8) as box:
        result = box.wait(timeout=10)
    assert result.output == "done\n" and result.ok
    with pytest.raises(LabError, match="tmpfs"):
        box.upper  # noqa: B018


@root
def test_the_command_line_returns_the_container_s_status(clean, capsys):
    assert sandbox.main(["run", "--memory", "64M", "--hostname", "box", "--", "sh", "-c",
                         "hostname; exit 3"]) == 3
    out = capsys.readouterr()
    assert out.out == "box\n" and "exit status 3" in out.err
    assert sandbox.main(["run", "--", "nonexistent"]) == 127
    assert sandbox.main(["run", "--memory", "lots", "--", "true"]) == 125


@root
def test_sweep_removes_what_a_crash_left(clean):
    box = sandbox.Sandbox(memory="32M", host_upper=True)      # never closed: "the kernel died"
    assert _groups() and box.upper.exists()
    sandbox.sweep()
    assert not _groups() and not box.upper.parent.exists()
    box.close()                                                   # reaps it; nothing left to do
    sandbox.sweep()                                               # twice is fine


# --- done when: 200 runs, some OOM-killed, some timed out, some failing to start -------------

@root
def test_200_runs_leave_nothing_behind(clean):
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    kinds = ["ok"] * 110 + ["oom"] * 30 + ["timeout"] * 20 + ["missing"] * 20 + ["midway"] * 20
    random.Random(7).shuffle(kinds)
    seen = dict.fromkeys(kinds, 0)
    started = time.monotonic()
    for i, kind in enumerate(kinds):
        if kind == "ok":
            r = sandbox.run(["true"], memory="16M", pids=8, cpus=0.5, host_upper=i % 2 == 0)
            seen[kind] += r.ok
        elif kind == "oom":
            r = sandbox.run("dd if=/dev/zero of=/dev/null bs=32M count=1", memory="8M",
                            host_upper=i % 2 == 0)
            seen[kind] += r.oom_killed
        elif kind == "timeout":
            seen[kind] += sandbox.run(["sleep", "5"], timeout=0.05, pids=4).timed_out
        elif kind == "missing":
            with pytest.raises(sandbox.CommandNotFound):
                sandbox.run(["no-such-command"], memory="8M")
            seen[kind] += 1
        else:
            with pytest.raises(sandbox.StartError):
                sandbox.run(["true"], workdir="/missing", memory="8M", host_upper=i % 2 == 0)
            seen[kind] += 1
    assert seen == {kind: kinds.count(kind) for kind in seen}
    assert time.monotonic() - started < 60
    with open("/proc/self/mountinfo") as f:
        after = f.read()
    assert _groups() == set() and _state() == set() and ns.children() == []
    # identical, but for what others on this machine mounted or unmounted meanwhile: every
    # mount a sandbox makes is on a path under the state folder, and none of those changed
    changed = set(mounts.splitlines()) ^ set(after.splitlines())
    assert [line for line in changed if not _not_ours(line)] == []


def _not_ours(line):
    return str(rootfs.STATE) not in line
