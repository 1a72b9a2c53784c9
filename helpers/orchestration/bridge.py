"""Container networking from the bridge up, as Docker's bridge driver and the CNI bridge plugin
do it, on network namespaces of our own::

    with bridge.Bridge("lab36", "10.250.36.0/24") as br, ns.NetNS("lab36-web") as web:
        port = br.attach(web, default_route=True)     # a veth pair: one end on the bridge
        br.publish(8080, port, 80)                    # DNAT: gateway:8080 -> 10.250.36.2:80
        port.hairpin(True)                            # and back out of the port it came in by

Every step is one real kernel object or one iptables rule. The links are made with pyroute2
(netlink, what ``ip link`` speaks), in a worker thread (``ns.off_the_loop``). The rules are
written with the ``iptables`` program, each carrying a comment naming its bridge
(``-m comment --comment cnlab-lab36``): that is how ``close()`` and ``sweep()`` find them
again, and how ``rules()`` shows them next to Docker's own (``docker_rules()``).

Nothing here sends traffic off the machine: a bridge gets a *fence* (FORWARD: accept from the
bridge to itself, drop from it to anywhere else), and the only NAT is DNAT to a namespace on
the bridge and MASQUERADE out of the bridge itself.

Used in: 36-container-networking, book/orchestration/orchestration.
"""
import contextlib
import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Self, Sequence

from helpers._core import daemon, names, owners, procfs, wait
from helpers.containers import ns
from helpers.errors import BadInput, LabError, MissingTool, Refused

POOL = ipaddress.IPv4Network("10.250.0.0/16")   # where free /24s are taken from: private, unrouted
IFNAMSIZ = 15                                   # the longest interface name Linux takes
NET = Path("/sys/class/net")


class InUse(Refused):
    """A name, address or port the lab asked for is already taken on this machine."""


def _netlink(work, space: ns.NetNS | None = None):
    """``work(ipr)`` with pyroute2's IPRoute on the machine's own network namespace (or inside
    ``space``), off the notebook's event loop."""
    from pyroute2 import IPRoute

    def run():
        with (IPRoute() if space is None else IPRoute(netns=space.name)) as ipr:
            return work(ipr)
    return ns.off_the_loop(run)


def inside(space: ns.NetNS | str, argv: Sequence[str], *, private_mounts: bool = False) -> list[str]:
    """``argv`` prefixed to run in the network namespace ``space`` (a NetNS or its path). With
    ``private_mounts`` also in a mount namespace of its own, with private propagation: what it
    mounts nobody else sees, and it goes when the process does. Both prefixes exec, never fork,
    so the pid is the program's own and a death signal set before survives the exec."""
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise MissingTool("nsenter", package="util-linux")
    prefix = [nsenter, f"--net={space.path if isinstance(space, ns.NetNS) else space}"]
    if private_mounts:
        prefix += ["unshare", "--mount", "--propagation", "private"]
    return [*prefix, *map(str, argv)]


def link_name(given: str, *, suffix: str = "") -> str:
    """``cnlab-<given><suffix>``, checked to be a usable interface name (at most 15 characters)."""
    full = names.prefixed(names.check(given, "the name")) + suffix
    if len(full) > IFNAMSIZ:
        raise BadInput(f"the interface name {full!r} is {len(full)} characters long",
                       fix=f"Linux takes at most {IFNAMSIZ}: use a shorter name")
    return full


def exists(link: str) -> bool:
    """Whether an interface of this name is on the machine (its own network namespace)."""
    return (NET / link).exists()


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in."""
    def read(ipr):
        found = [ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                 for a in ipr.get_addr(family=socket.AF_INET)]
        for r in ipr.get_routes(family=socket.AF_INET):
            dst = r.get_attr("RTA_DST")
            if dst and r["dst_len"]:
                found.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
        return found
    return _netlink(read)


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of ``POOL`` that overlaps nothing on this machine."""
    used = used_networks()
    for subnet in POOL.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise InUse(f"every /24 of {POOL} is in use on this machine",
                fix="run helpers.cleanup() to remove what earlier runs left")


def subnet_of(given: str | ipaddress.IPv4Network | None) -> ipaddress.IPv4Network:
    """``given`` as a private IPv4 /16-/29 that nothing on the machine uses, or a free one."""
    if given is None:
        return free_subnet()
    try:
        subnet = ipaddress.IPv4Network(given)
    except ValueError as e:
        raise BadInput(f"{given!r} is not an IPv4 network", fix='use e.g. "10.250.36.0/24"') from e
    if not subnet.is_private or not 16 <= subnet.prefixlen <= 29:
        raise BadInput(f"{subnet} is not a private network of /16 to /29",
                       fix="pick one inside 10.0.0.0/8 (this machine's own; it never leaves)")
    taken = [u for u in used_networks() if u.overlaps(subnet)]
    if taken:
        raise InUse(f"{subnet} overlaps {', '.join(map(str, taken))}, in use on this machine",
                    fix="leave out the subnet to get a free one, or run helpers.cleanup()")
    return subnet


# --- iptables ---------------------------------------------------------------------------------

def iptables(*args: str, table: str = "filter", check: bool = True,
             space: ns.NetNS | None = None) -> subprocess.CompletedProcess:
    """Run ``iptables -t <table> <args>`` (nf_tables or legacy, whichever this machine has), on
    the machine's own rules or, with ``space``, on those of that network namespace."""
    tool = shutil.which("iptables")
    if tool is None:
        raise MissingTool("iptables")
    argv = [tool, "-w", "5", "-t", table, *args]
    out = subprocess.run(argv if space is None else inside(space, argv), capture_output=True,
                         text=True, timeout=30)
    if check and out.returncode:
        where = "" if space is None else f" in {space.name}"
        raise LabError(f"iptables -t {table} {shlex.join(args)}{where} failed: {out.stderr.strip()}")
    return out


@dataclass(frozen=True)
class Rule:
    """One iptables rule as ``iptables-save`` prints it: its table, chain and the rest."""
    table: str
    chain: str
    spec: tuple[str, ...]

    @property
    def comment(self) -> str | None:
        spec = list(self.spec)
        return spec[spec.index("--comment") + 1] if "--comment" in spec else None

    def delete(self) -> None:
        iptables("-D", self.chain, *self.spec, table=self.table, check=False)

    def __str__(self):
        words = [w if w and not set(w) & set(" '\"") else shlex.quote(w) for w in self.spec]
        return f"-t {self.table} -A {self.chain} {' '.join(words)}"


def rules(table: str | None = None, match=lambda rule: True) -> list[Rule]:
    """The machine's iptables rules (of one ``table``, or of all), as ``iptables-save`` lists them."""
    tool = shutil.which("iptables-save")
    if tool is None:
        raise MissingTool("iptables-save", package="iptables")
    text = subprocess.run([tool, *(["-t", table] if table else [])], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    found, current = [], ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith("-A "):
            chain, *spec = shlex.split(line)[1:]
            rule = Rule(current, chain, tuple(spec))
            if match(rule):
                found.append(rule)
    return found


def ours(owner: str | None = None) -> list[Rule]:
    """The rules whose comment is ``owner`` (a bridge's name), or by default starts with cnlab.
    Empty on a machine where they cannot be read (no iptables, not root): nothing is ours there."""
    if shutil.which("iptables-save") is None or os.geteuid() != 0:
        return []
    return rules(match=lambda r: r.comment == owner if owner else
                 (r.comment or "").startswith(names.PREFIX))


def docker_rules(bridge: str = "docker0") -> list[Rule]:
    """What dockerd wrote: its chains (DOCKER, DOCKER-USER, DOCKER-ISOLATION-*, DOCKER-FORWARD,
    ...) and the built-in chains' rules that name its bridge or jump to its chains."""
    def docker(rule):
        return "DOCKER" in rule.chain or bridge in rule.spec or any("DOCKER" in s for s in rule.spec)
    return [r for r in rules(match=docker) if r.table in ("nat", "filter")]


def add_rule(owner: str, chain: str, *spec: str, table: str = "filter", first: bool = False) -> Rule:
    """Append (or with ``first``, insert at the top) a rule marked with ``owner``'s comment,
    unless it is there already (``iptables -C``)."""
    at = spec.index("-j") if "-j" in spec else len(spec)     # before the target, as iptables-save prints it
    rule = Rule(table, chain, (*spec[:at], "-m", "comment", "--comment", owner, *spec[at:]))
    if iptables("-C", chain, *rule.spec, table=table, check=False).returncode:   # not there yet
        iptables("-I" if first else "-A", chain, *rule.spec, table=table)
    return rule


# --- a web server and a client, inside namespaces ---------------------------------------------

# Answers every GET with who it is and who asked: the source address it sees shows what NAT did.
_SERVER = """
import http.server, sys
name = sys.argv[3]
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}, you are {self.client_address[0]}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Hello).serve_forever()
"""

_CLIENT = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        print(r.status, r.read().decode().strip())
except OSError as e:
    print("no answer:", getattr(e, "reason", e))
"""


def fetch(url: str, *, space: ns.NetNS | None = None, timeout: float = 2.0) -> str:
    """GET ``url`` from the machine, or from inside ``space``: "200 <body>", or "no answer: <why>"
    (refused, timed out) after ``timeout`` seconds at most."""
    argv = [sys.executable, "-c", _CLIENT, url, str(timeout)]
    out = subprocess.run(inside(space, argv) if space else argv, capture_output=True, text=True,
                         timeout=timeout + 30, env=procfs.marked_env())
    return (out.stdout or out.stderr).strip()


# --- the bridge and its ports -----------------------------------------------------------------

def sysctl(key: str, value: str | None = None) -> str:
    """Read (and with ``value``, first write) ``/proc/sys/<key>`` (dots or slashes)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


@dataclass
class Port:
    """One veth pair: ``name`` is the end on the bridge, on the machine; ``inside`` is the end
    in ``space``, with ``address``."""
    name: str
    space: ns.NetNS
    inside: str
    address: ipaddress.IPv4Interface

    def up(self, on: bool = True) -> None:
        """Set the bridge-side end up or down (a cable plugged in or pulled out): with it down,
        the inside end has no carrier and nothing passes."""
        def switch(ipr):
            ipr.link("set", index=ipr.link_lookup(ifname=self.name)[0], state="up" if on else "down")
        _netlink(switch)
        if on:
            self._wait_up()

    def _wait_up(self) -> None:
        """Until both ends have carrier and the bridge forwards on the port: the kernel notices
        carrier asynchronously (linkwatch), so an "up" link may pass nothing for a moment."""
        def ready():
            forwarding = (NET / self.name / "brport" / "state").read_text().strip() == "3"
            return forwarding and (NET / self.name / "operstate").read_text().strip() == "up" \
                and self.state() == "UP"
        wait.until(ready, 5, f"the link of {self.space.name} to be up",
                   detail=lambda: f"{self.inside} is {self.state()}")

    def state(self) -> str:
        """The inside end's operational state: "UP", or "LOWERLAYERDOWN" once its peer is down."""
        def read(ipr):
            return ipr.get_links(ifname=self.inside)[0].get_attr("IFLA_OPERSTATE")
        return _netlink(read, self.space)

    def hairpin(self, on: bool = True) -> bool:
        """Hairpin mode on the bridge port: let the bridge send a frame back out of the port it
        came in by (a container reaching itself through its own published port). Returns it."""
        path = NET / self.name / "brport" / "hairpin_mode"
        path.write_text("1" if on else "0")
        return path.read_text().strip() == "1"


class Bridge:
    """A Linux bridge on the machine, with the gateway address (the subnet's first) and a fence.

    Created now; ``close()`` (or the end of a ``with`` block) removes its ports, its rules and
    itself. A name or subnet already in use is ``InUse``, raised before anything is created.
    """

    def __init__(self, name: str, subnet: str | ipaddress.IPv4Network | None = None) -> None:
        self.name = link_name(name)
        if exists(self.name):
            raise InUse(f"an interface named {self.name} exists already",
                        fix="pick another name, or run helpers.cleanup() to remove leftovers")
        self.subnet = subnet_of(subnet)
        self.gateway = next(self.subnet.hosts())
        self.ports: list[Port] = []
        self.published: list[Rule] = []
        self.servers: list[daemon.Daemon] = []
        try:
            _netlink(self._create)
            # the fence: hosts reach each other through the bridge (Docker's FORWARD policy may
            # be DROP, and with br_netfilter bridged frames go through FORWARD too), and nothing
            # from the bridge is forwarded anywhere else
            add_rule(self.name, "FORWARD", "-i", self.name, "-o", self.name, "-j", "ACCEPT", first=True)
            add_rule(self.name, "FORWARD", "-i", self.name, "!", "-o", self.name, "-j", "DROP", first=True)
            add_rule(self.name, "FORWARD", "-o", self.name, "!", "-i", self.name, "-j", "DROP", first=True)
        except BaseException:
            self.close()
            raise

    def _create(self, ipr):
        ipr.link("add", ifname=self.name, kind="bridge")
        index = ipr.link_lookup(ifname=self.name)[0]
        ipr.addr("add", index=index, address=str(self.gateway), prefixlen=self.subnet.prefixlen)
        ipr.link("set", index=index, state="up")

    def address(self) -> ipaddress.IPv4Interface:
        """The next free address of the subnet, for the next port (IPAM, as CNI's host-local does)."""
        hosts = list(self.subnet.hosts())
        taken = {p.address.ip for p in self.ports} | {self.gateway}
        for ip in hosts:
            if ip not in taken:
                return ipaddress.IPv4Interface(f"{ip}/{self.subnet.prefixlen}")
        raise InUse(f"every address of {self.subnet} is taken", fix="use a larger subnet")

    def attach(self, space: ns.NetNS, address: str | None = None, *, name: str | None = None,
               inside: str = "eth0", default_route: bool = False) -> Port:
        """A veth pair: ``name`` (default: the namespace's name) on the bridge, ``inside`` in
        ``space`` with ``address`` (default: the next free one); both ends and ``lo`` up. With
        ``default_route``, the namespace's default route goes through the bridge's gateway."""
        port_name = link_name(name or space.name)
        ip = self.address() if address is None else ipaddress.IPv4Interface(address)
        if ip.network != self.subnet or ip.ip in (self.gateway, self.subnet.broadcast_address):
            raise BadInput(f"{ip} is not a free host address of {self.subnet}",
                           fix=f"leave address out, or pick one in {self.subnet}, not {self.gateway}")
        if exists(port_name) or any(p.address.ip == ip.ip for p in self.ports):
            raise InUse(f"{port_name} or {ip.ip} is in use already", fix="pick another name or address")

        def plug(ipr):
            ipr.link("add", ifname=port_name, kind="veth", peer={"ifname": inside, "net_ns_fd": space.name})
            index = ipr.link_lookup(ifname=port_name)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=self.name)[0], state="up")

        def configure(ipr):
            index = ipr.link_lookup(ifname=inside)[0]
            ipr.addr("add", index=index, address=str(ip.ip), prefixlen=ip.network.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if default_route:
                ipr.route("add", dst="0.0.0.0/0", gateway=str(self.gateway))

        _netlink(plug)
        port = Port(port_name, space, inside, ip)
        self.ports.append(port)
        _netlink(configure, space)
        port._wait_up()
        return port

    def serve(self, port: Port, container_port: int = 80, *, timeout: float = 20) -> daemon.Daemon:
        """Start a small web server inside ``port``'s namespace, on its address and
        ``container_port``; it answers "hello from <namespace>, you are <client address>".
        Killed by ``close()``."""
        log = names.state_dir("bridge", self.name) / f"{port.name}-{container_port}.log"
        server = daemon.Daemon(inside(port.space, [sys.executable, "-c", _SERVER, str(port.address.ip),
                                                   str(container_port), port.space.name]),
                               what=f"the web server in {port.space.name}", log=log)
        self.servers.append(server)

        def listening():
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((str(port.address.ip), container_port)) == 0
        return server.start(listening, timeout=timeout)

    def publish(self, host_port: int, port: Port, container_port: int, *,
                host_ip: str | None = None) -> list[Rule]:
        """Publish ``port``'s TCP ``container_port`` on the machine's ``host_ip:host_port``
        (default: the gateway), as ``docker run -p`` does: DNAT in PREROUTING (from other
        namespaces) and OUTPUT (from the machine itself), and MASQUERADE for the hairpin. On
        127.0.0.1 it also sets route_localnet on the bridge: a packet from 127.0.0.1 may then
        leave by it, and MASQUERADE gives it the gateway as its source. Returns the rules it
        added."""
        ip = ipaddress.IPv4Address(host_ip or self.gateway)
        if ip not in (self.gateway, ipaddress.IPv4Address("127.0.0.1")):
            raise BadInput(f"publish on {ip}?", fix=f"use the gateway {self.gateway} or 127.0.0.1")
        for value in (host_port, container_port):
            if not isinstance(value, int) or not 1 <= value <= 65535:
                raise BadInput(f"{value!r} is not a TCP port", fix="use 1-65535")
        taken = [r for r in ours() if r.table == "nat" and "--dport" in r.spec
                 and r.spec[r.spec.index("--dport") + 1] == str(host_port)]
        with socket.socket() as s:
            listening = s.connect_ex((str(ip), host_port)) == 0
        if taken or listening:
            raise InUse(f"port {host_port} on {ip} is taken" + (f" by {taken[0]}" if taken else ""),
                        fix="publish another host port")
        target = f"{port.address.ip}:{container_port}"
        match = ("-d", f"{ip}/32", "-p", "tcp", "-m", "tcp", "--dport", str(host_port))
        made = []
        try:
            for chain in ("PREROUTING", "OUTPUT"):
                made.append(add_rule(self.name, chain, *match, "-j", "DNAT", "--to-destination", target,
                                     table="nat"))
            made.append(add_rule(self.name, "POSTROUTING", "-s", f"{port.address.ip}/32", "-d",
                                 f"{port.address.ip}/32", "-p", "tcp", "-m", "tcp", "--dport",
                                 str(container_port), "-j", "MASQUERADE", table="nat"))
            if ip.is_loopback:
                sysctl(f"net/ipv4/conf/{self.name}/route_localnet", "1")
                made.append(add_rule(self.name, "POSTROUTING", "-s", "127.0.0.0/8", "-o", self.name,
                                     "-j", "MASQUERADE", table="nat"))
        except BaseException:
            for rule in made:
                rule.delete()
            raise
        new = [rule for rule in made if rule not in self.published]     # the hairpin rule may be there
        self.published += new
        return new

    def rules(self) -> list[Rule]:
        """This bridge's own rules, read back from the machine."""
        return ours(self.name)

    def close(self) -> None:
        """Stop its web servers; remove the rules, the ports and the bridge; twice is fine."""
        for server in self.servers:
            server.kill()
        self.servers.clear()
        remove(self.name)
        self.ports.clear()
        self.published.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove(bridge: str) -> None:
    """Remove the bridge called ``bridge``, the veths plugged into it, the rules marked with its
    name and its servers' logs: what ``Bridge.close()`` and the sweep share."""
    for rule in ours(bridge):
        rule.delete()
    shutil.rmtree(names.STATE / "bridge" / bridge, ignore_errors=True)
    if exists(bridge):
        _delete_links([*_ports(bridge), bridge])


def _ports(bridge: str) -> list[str]:
    """The links plugged into ``bridge``."""
    brif = NET / bridge / "brif"
    return [p.name for p in brif.iterdir()] if brif.is_dir() else []


def _delete_links(links: list[str]) -> None:
    """Delete these links, in order; one gone already (its veth peer, or its peer's namespace,
    went first) is skipped."""
    def delete(ipr):
        for link in links:
            found = ipr.link_lookup(ifname=link)
            if found:
                with contextlib.suppress(Exception):
                    ipr.link("del", index=found[0])
    if links:
        _netlink(delete)


@owners.sweeper(owners.KERNEL)
def sweep() -> None:
    """Remove every cnlab bridge with its veths, every cnlab veth left on the machine, and every
    iptables rule whose comment starts with cnlab."""
    for rule in ours():
        rule.delete()
    shutil.rmtree(names.STATE / "bridge", ignore_errors=True)
    links = sorted(p.name for p in NET.iterdir() if p.name.startswith(names.PREFIX))
    _delete_links([*(port for link in links for port in _ports(link)), *links])   # ports first


@owners.lister
def leftovers() -> list[str]:
    """The iptables rules of the course still on the machine (links are listed by owners)."""
    return [f"iptables {r}" for r in ours()]
