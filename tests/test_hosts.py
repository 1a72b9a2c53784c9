"""helpers.hosts: hosts that are network namespaces on a bridge, for real: they reach each other
and the machine, lose each other when cut, run daemons inside, and leave nothing behind."""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import helpers
from helpers import hosts
from helpers._core import names, procfs, wait
from helpers.containers import ns
from helpers.errors import BadInput, NotSupported

import leaktool



def _ours(net: str) -> list[str]:
    """The leftovers that belong to the network ``net`` (cnlab-<net>...), others' work apart."""
    return [item for item in helpers.leftovers() if names.name(net) in item]


# --- bad input fails before anything is created -----------------------------------------------

@pytest.mark.parametrize("name, count, words", [
    ("a-name-too-long", 3, "15"),            # cnlab-a-name-too-long-3 does not fit an interface name
    ("ok", 100, "1 to 50"),
    ("ok", 0, "1 to 50"),
    ("ok", True, "1 to 50"),
    ("Bad_Name", 3, "not a usable name"),
    ("", 3, "not a usable name"),
    (None, 3, "not a usable name"),
])
def test_bad_input_is_refused_before_anything_is_made(name, count, words):
    before = set(helpers.leftovers())
    with pytest.raises(BadInput, match=words):
        hosts.Network(name, count=count)
    assert set(helpers.leftovers()) <= before


# --- real hosts ------------------------------------------------------------------------------

@pytest.mark.requires("root")
def test_hosts_reach_each_other_and_the_machine_and_nothing_else():
    with hosts.Network("th", count=3) as net:
        assert (net.name, len(net), [h.name for h in net]) == ("cnlab-th", 3, ["cnlab-th-1", "cnlab-th-2", "cnlab-th-3"])
        assert net.subnet.prefixlen == 24 and net.subnet.is_private and net.gateway == next(net.subnet.hosts())
        a, b, c = net
        assert a.netns == "/run/netns/cnlab-th-1" and Path(a.netns).exists()
        assert [h.address for h in net] == [str(net.subnet[i]) for i in (2, 3, 4)]
        assert b.ping(a.address) and c.ping(b.address) and a.ping(str(net.gateway))
        machine = subprocess.run(["busybox", "ping", "-c1", "-W2", c.address], capture_output=True)
        assert machine.returncode == 0                      # the machine reaches them at their addresses
        routes = a.run(["ip", "-4", "route"]).stdout
        assert "default" not in routes and str(net.subnet) in routes   # no way off the machine
        assert a.run(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == f"{a.address}/24"
        # the fence is there: bridge to bridge accepted, bridge to anywhere else dropped
        fence = [r for r in hosts.bridge.ours(net.name) if r.chain == "FORWARD"]
        assert {r.spec[-1] for r in fence} == {"ACCEPT", "DROP"} and len(fence) == 3
    assert _ours("th") == []


@pytest.mark.requires("root")
def test_cut_stops_traffic_and_heal_restores_it():
    with hosts.Network("tcut", count=2) as net:
        a, b = net
        assert b.ping(a.address)
        a.cut()
        assert a.port.state() != "UP"
        assert not b.ping(a.address) and not a.ping(b.address)
        a.heal()
        assert b.ping(a.address) and a.ping(b.address)


@pytest.mark.requires("root")
def test_degrade_adds_delay_or_says_why_not():
    with hosts.Network("tdeg", count=2) as net:
        a, b = net
        for bad in ({"loss": 30}, {"delay": "soon"}, {}):
            with pytest.raises(BadInput):
                a.degrade(**bad)
        try:
            a.degrade(delay="200ms")
        except NotSupported as e:
            assert "netem" in str(e) and "cut()" in str(e)
            assert b.ping(a.address)                         # nothing was left half done
            return
        started = time.monotonic()
        assert b.ping(a.address)
        assert time.monotonic() - started >= 0.4             # 200 ms each way
        a.heal()
        started = time.monotonic()
        assert b.ping(a.address) and time.monotonic() - started < 0.4


@pytest.mark.requires("root")
def test_a_name_in_use_is_refused_before_anything_is_made():
    with hosts.Network("tdup", count=1):
        before = set(helpers.leftovers())
        with pytest.raises(hosts.InUse, match="cnlab-tdup"):
            hosts.Network("tdup", count=1)
        assert set(helpers.leftovers()) == before
    with ns.NetNS("tdup2-2"):                                 # one host's name is taken
        with pytest.raises(hosts.InUse, match="cnlab-tdup2-2"):
            hosts.Network("tdup2", count=2)
        assert not hosts.bridge.exists("cnlab-tdup2")
    with hosts.Network("tsub", count=1) as net:              # and so is its subnet
        with pytest.raises(hosts.InUse, match=str(net.subnet)):
            hosts.Network("tsub2", count=1, subnet=str(net.subnet))
        assert not hosts.bridge.exists("cnlab-tsub2")


@pytest.mark.requires("root")
def test_a_daemon_runs_inside_its_host_and_dies_with_the_network():
    with tempfile.TemporaryDirectory() as tmp, hosts.Network("td", count=2) as net:
        a, b = net
        server = a.daemon([sys.executable, "-m", "http.server", "--bind", a.address, "8000"],
                          what="http.server in host 1", log=Path(tmp) / "log", cwd=tmp)
        server.start(lambda: a.run([sys.executable, "-c", f"import socket; socket.create_connection(('{a.address}', 8000), 1)"],
                                   check=False).returncode == 0, timeout=20)
        fetch = f"import urllib.request as u; print(u.urlopen('http://{a.address}:8000/', timeout=5).status)"
        assert b.run([sys.executable, "-c", fetch]).stdout.strip() == "200"
        assert server.pid in a.processes() and server.pid not in b.processes()
        machine = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 8000), 1)"],
                                 capture_output=True)
        assert machine.returncode != 0                       # it listens in its host, not on the machine
        with pytest.raises(hosts.CommandFailed) as failed:
            a.run(["sh", "-c", "echo nope >&2; exit 3"])
        assert failed.value.returncode == 3 and "nope" in str(failed.value)
    assert not procfs.alive(server.pid)


@pytest.mark.requires("root")
def test_private_mounts_stay_inside():
    with hosts.Network("tm", count=1) as net, tempfile.TemporaryDirectory() as point:
        script = f"mount -t tmpfs cnlab-tm-private {point} && grep -c cnlab-tm-private /proc/self/mounts"
        inside = subprocess.run(net[0].argv(["sh", "-c", script], private_mounts=True),
                                capture_output=True, text=True, timeout=30)
        assert inside.stdout.strip() == "1", inside.stderr
        assert not any(m.source == "cnlab-tm-private" for m in procfs.mounts())


@pytest.mark.requires("root")
def test_sweep_removes_a_crashed_network_and_what_runs_in_it():
    net = hosts.Network("tsw", count=2)                      # as if the kernel died before close()
    stray = subprocess.Popen(net[0].argv(["sleep", "60"]), env=procfs.marked_env())
    wait.until(lambda: stray.pid in net[0].processes(), 5, "sleep to be inside host 1")
    assert any("netns cnlab-tsw-1" in i for i in _ours("tsw"))
    assert any(i.startswith("iptables") for i in _ours("tsw"))
    hosts.sweep()
    stray.wait(5)
    assert _ours("tsw") == []
    assert not hosts.bridge.exists("cnlab-tsw") and not hosts.bridge.exists("cnlab-tsw-1")
    assert hosts.bridge.ours("cnlab-tsw") == []
    hosts.sweep()                                            # twice is fine
    net.close()                                              # and so is closing after a sweep


@pytest.mark.requires("root")
def test_the_independent_leak_check_sees_nothing_of_ours_after_close():
    if leaktool.LEAKS is None:
        pytest.skip(leaktool.MISSING)
    with hosts.Network("tlk", count=2):
        assert "cnlab-tlk-1" in leaktool.run()                # it does see them while they live
    after = leaktool.run()
    assert "cnlab-tlk" not in after
    assert not any("cnlab-tlk" in line for line in subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines())
