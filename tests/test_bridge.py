"""helpers.bridge: container networking from the bridge up, for real: veths on a bridge, a
default route through it, a published port carrying real HTTP through DNAT, hairpin traffic,
and Docker's own rules read from the host side."""
import subprocess
import time

import pytest

import helpers
from helpers import bridge, ns
from helpers.errors import BadInput


def _ours(name: str) -> list[str]:
    return [item for item in helpers.leftovers() if name in item]


@pytest.mark.parametrize("name, subnet, words", [
    ("much-too-long-name", None, "15"),
    ("Bad!", None, "not a usable name"),
    ("ok", "10.250.36.0/33", "not an IPv4 network"),
    ("ok", "8.8.8.0/24", "private"),
    ("ok", "10.0.0.0/8", "private network of /16 to /29"),
])
def test_bad_input_is_refused_before_anything_is_made(name, subnet, words):
    before = set(helpers.leftovers())
    with pytest.raises(BadInput, match=words):
        bridge.Bridge(name, subnet)
    assert set(helpers.leftovers()) <= before


def test_a_rule_reads_back_as_iptables_save_prints_it():
    rule = bridge.Rule("nat", "PREROUTING", ("-d", "10.250.36.1/32", "-p", "tcp", "-m", "comment",
                                            "--comment", "cnlab-x", "-j", "DNAT"))
    assert rule.comment == "cnlab-x"
    assert str(rule) == "-t nat -A PREROUTING -d 10.250.36.1/32 -p tcp -m comment --comment cnlab-x -j DNAT"


@pytest.fixture
def lab():
    """A bridge and two namespaces on it, both with a default route through the bridge, and a web
    server in the first."""
    with bridge.Bridge("tbr", "10.250.99.0/24") as br, ns.NetNS("tbr-web") as web, \
            ns.NetNS("tbr-cli") as client:
        w = br.attach(web, default_route=True)
        c = br.attach(client, default_route=True)
        br.serve(w, 80)
        yield br, w, c


@pytest.mark.requires("root")
def test_veths_addresses_and_a_default_route_through_the_bridge(lab):
    br, w, c = lab
    assert (br.name, str(br.gateway), str(w.address), str(c.address)) == \
        ("cnlab-tbr", "10.250.99.1", "10.250.99.2/24", "10.250.99.3/24")
    assert sorted(p.name for p in (bridge.NET / br.name / "brif").iterdir()) == ["cnlab-tbr-cli", "cnlab-tbr-web"]
    routes = subprocess.run(bridge.inside(w.space, ["ip", "-4", "route"]), capture_output=True,
                            text=True, check=True).stdout
    assert "default via 10.250.99.1 dev eth0" in routes
    # the server answers on its own address, from the machine and from the other namespace
    assert bridge.fetch("http://10.250.99.2/") == "200 hello from cnlab-tbr-web, you are 10.250.99.1"
    assert bridge.fetch("http://10.250.99.2/", space=c.space) == \
        "200 hello from cnlab-tbr-web, you are 10.250.99.3"


@pytest.mark.requires("root")
def test_a_published_port_carries_http_through_dnat(lab):
    br, w, c = lab
    gateway = "http://10.250.99.1:18099/"
    assert bridge.fetch(gateway, timeout=1).startswith("no answer")     # nothing published yet
    made = br.publish(18099, w, 80)
    assert [(r.table, r.chain, r.spec[-1]) for r in made] == [
        ("nat", "PREROUTING", "10.250.99.2:80"), ("nat", "OUTPUT", "10.250.99.2:80"),
        ("nat", "POSTROUTING", "MASQUERADE")]
    assert {str(r) for r in made} <= {str(r) for r in br.rules()}          # really on the machine
    assert bridge.fetch(gateway) == "200 hello from cnlab-tbr-web, you are 10.250.99.1"
    # from the other namespace, DNAT keeps the client's own address
    assert bridge.fetch(gateway, space=c.space) == "200 hello from cnlab-tbr-web, you are 10.250.99.3"
    # on 127.0.0.1 too: route_localnet lets 127.0.0.1 leave by the bridge, MASQUERADE renames it
    br.publish(18098, w, 80, host_ip="127.0.0.1")
    assert bridge.sysctl(f"net.ipv4.conf.{br.name}.route_localnet") == "1"
    assert bridge.fetch("http://127.0.0.1:18098/") == "200 hello from cnlab-tbr-web, you are 10.250.99.1"
    with pytest.raises(bridge.InUse, match="18099"):
        br.publish(18099, c, 80)                                         # the host port is taken
    for bad in ((0, w, 80), (18097, w, 70000)):
        with pytest.raises(BadInput):
            br.publish(*bad)


@pytest.mark.requires("root")
def test_hairpin_a_container_reaches_itself_through_its_published_port(lab):
    br, w, c = lab
    br.publish(18096, w, 80)
    started = time.monotonic()
    before = bridge.fetch("http://10.250.99.1:18096/", space=w.space, timeout=1)
    assert time.monotonic() - started < 10
    assert w.hairpin(True)
    after = bridge.fetch("http://10.250.99.1:18096/", space=w.space)
    # MASQUERADE gave the hairpinned packet the gateway's address: else the reply would go
    # straight back inside the namespace, to a connection that never sent to itself
    assert after == "200 hello from cnlab-tbr-web, you are 10.250.99.1"
    if bridge.sysctl("net.bridge.bridge-nf-call-iptables") == "1":
        assert before.startswith("no answer")   # br_netfilter: DNAT happens on the bridge, which needs hairpin


@pytest.mark.requires("root")
def test_close_and_sweep_remove_bridge_ports_rules_and_servers():
    with ns.NetNS("tbr2-web") as web:
        br = bridge.Bridge("tbr2")
        port = br.attach(web)
        server = br.serve(port, 8080)
        br.publish(18095, port, 8080)
        assert any(i.startswith("iptables") and "cnlab-tbr2" in i for i in helpers.leftovers())
        server.kill()                                    # as if the kernel died: only sweep is left
        bridge.sweep()
        # the namespace is the with block's; the bridge, its veth, rules and server log are gone
        assert [i for i in _ours("cnlab-tbr2") if not i.startswith(("netns", "mount"))] == []
        assert not bridge.exists("cnlab-tbr2") and not bridge.exists("cnlab-tbr2-web")
        bridge.sweep()                                   # twice is fine
        br.close()                                       # and closing after a sweep too


@pytest.mark.requires("root", "docker")
def test_docker_writes_the_same_kind_of_rules():
    from helpers import images
    port = 18094
    with images.run(images.busybox(), ["httpd", "-f", "-p", "80"], name="tbr-docker",
                    ports={"80/tcp": ("127.0.0.1", port)}) as box:
        box.docker.reload()
        address = box.docker.attrs["NetworkSettings"]["IPAddress"]
        dnat = [r for r in bridge.docker_rules() if r.table == "nat" and "DNAT" in r.spec
                and f"{address}:80" in r.spec]
        assert dnat and dnat[0].chain == "DOCKER"
        spec = " ".join(dnat[0].spec)
        assert f"--dport {port}" in spec and "-d 127.0.0.1/32" in spec
        assert bridge.fetch(f"http://127.0.0.1:{port}/", timeout=5) == "no answer: Not Found"   # busybox httpd, no index
        assert (bridge.NET / "docker0" / "bridge").is_dir()       # docker0 is a Linux bridge, like ours
        ports = [p.name for p in (bridge.NET / "docker0" / "brif").iterdir()]
        assert ports and all(p.startswith("veth") for p in ports)
