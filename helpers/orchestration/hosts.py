"""Many machines on one: hosts that are network namespaces on a bridge of their own.

Each host is a named network namespace (``/run/netns/cnlab-<net>-<i>``) joined to the bridge
``cnlab-<net>`` by a veth pair, with its own address in a private /24 that exists only inside
this machine: hosts reach each other and the machine (the bridge's gateway address) reaches
them, and nothing routes anywhere else (no default route, and the bridge's fence). A host runs
commands and daemons inside its namespace; it can be cut off (its cable pulled: the veth's
bridge end down) and degraded (netem loss and delay, where the kernel has ``sch_netem``)::

    with hosts.Network("lab", count=3) as net:
        a, b = net[0], net[1]
        b.ping(a.address)                   # True
        b.run(["ip", "route"])
        server = a.daemon(["etcd", ...], what="etcd on host 1", log=path)
        server.start(ready)                 # runs inside host 1; killed by net.close()
        a.cut(); ...; a.heal()

Used in: 36-container-networking, book/orchestration/orchestration.
"""
# API READY
import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Self, Sequence

from helpers._core import daemon, names, owners, procfs
from helpers.containers import ns
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool, NotSupported
from helpers.orchestration import bridge
from helpers.orchestration.bridge import InUse

__all__ = ["CommandFailed", "Host", "InUse", "Network", "leftovers", "sweep"]

MAX_HOSTS = 50
_DELAY = re.compile(r"\d+(\.\d+)?(us|ms|s)")


class CommandFailed(LabError):
    """A command run in a host exited with a non-zero status (``returncode``, ``stdout``, ``stderr``)."""
    returncode: int
    stdout: str
    stderr: str


class Host:
    """One host of a Network: a named network namespace with one interface, ``eth0``."""

    def __init__(self, space: ns.NetNS, port: bridge.Port) -> None:
        self.space, self.port = space, port
        self.name = space.name
        self.address = str(port.address.ip)
        self.daemons: list[daemon.Daemon] = []

    @property
    def netns(self) -> str:
        return self.space.path

    def argv(self, argv: Sequence[str], *, private_mounts: bool = False) -> list[str]:
        """``argv`` prefixed to run inside this host (``bridge.inside``: nsenter, and with
        ``private_mounts`` unshare --mount --propagation private); for a Daemon or Popen."""
        return bridge.inside(self.space, argv, private_mounts=private_mounts)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the host and return its output (text). ``CommandFailed`` if
        ``check`` and it fails, ``LabTimeout`` (it is killed) after ``timeout`` seconds."""
        command = self.argv(argv)
        kw.setdefault("env", procfs.marked_env())
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kw)
        except subprocess.TimeoutExpired as e:
            raise LabTimeout(f"{' '.join(map(str, argv))} in {self.name} did not end within {timeout:g} s",
                             fix="give it a larger timeout=, or see what it waits for") from e
        if check and out.returncode:
            error = CommandFailed(f"{' '.join(map(str, argv))} in {self.name} exited with status "
                                  f"{out.returncode}: {(out.stderr or out.stdout).strip()}")
            error.returncode, error.stdout, error.stderr = out.returncode, out.stdout, out.stderr
            raise error
        return out

    def ping(self, address: str, *, count: int = 1) -> bool:
        """Whether ``address`` answers ``count`` pings from inside this host (2 s each at most)."""
        return ns.ping(self.space, address, count=count).ok

    def daemon(self, argv: Sequence[str], *, what: str, log: Path, private_mounts: bool = False,
               **daemon_kw) -> daemon.Daemon:
        """A Daemon (not started yet) whose process runs inside the host; ``Network.close()``
        kills it if it still runs."""
        server = daemon.Daemon(self.argv(argv, private_mounts=private_mounts), what=what, log=log,
                               **daemon_kw)
        self.daemons.append(server)
        return server

    def cut(self) -> None:
        """Pull the host's cable: its veth's bridge end goes down, and no traffic passes."""
        self.port.up(False)

    def heal(self) -> None:
        """Plug it back in, and take away any degradation: traffic flows as before."""
        for dev, where in self._ends():
            subprocess.run([*where, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True,
                           timeout=30)
        self.port.up(True)

    def degrade(self, *, loss: float = 0, delay: str | None = None) -> None:
        """Netem on both ends of the host's link: each packet lost with probability ``loss``
        (0 to 1), and ``delay`` ("100ms") added each way. ``NotSupported`` where the kernel has
        no sch_netem; ``heal()`` removes it."""
        if not isinstance(loss, (int, float)) or not 0 <= loss <= 1:
            raise BadInput(f"loss={loss!r} is not a probability", fix="use 0 to 1, e.g. loss=0.3 for 30%")
        if delay is not None and not (isinstance(delay, str) and _DELAY.fullmatch(delay)):
            raise BadInput(f"delay={delay!r} is not a time", fix='use e.g. "100ms", "1s" or "500us"')
        if not loss and delay is None:
            raise BadInput("degrade() with neither loss nor delay", fix="give loss=, delay= or both")
        if shutil.which("tc") is None:
            raise MissingTool("tc", package="iproute2")
        netem = ["netem", *(["loss", f"{loss * 100:g}%"] if loss else []), *(["delay", delay] if delay else [])]
        for dev, where in self._ends():
            out = subprocess.run([*where, "tc", "qdisc", "replace", "dev", dev, "root", *netem],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode:
                self.heal()
                if "unknown" in out.stderr.lower() or "not supported" in out.stderr.lower():
                    raise NotSupported(f"this kernel has no netem queueing discipline (sch_netem): "
                                       f"tc says {out.stderr.strip()!r}",
                                       fix="use cut()/heal() instead, or a kernel with CONFIG_NET_SCH_NETEM")
                raise LabError(f"tc qdisc replace dev {dev} root {' '.join(netem)} failed: {out.stderr.strip()}")

    def _ends(self):
        """Both ends of its link: the bridge's (on the machine) and its own eth0 (inside)."""
        return [(self.port.name, []), (self.port.inside, bridge.inside(self.space, []))]

    def processes(self) -> list[int]:
        """The pids of every process inside this host's network namespace."""
        return _pids_in(self.netns)

    def __repr__(self):
        return f"<Host {self.name} {self.address}>"


class Network:
    """``count`` hosts on the bridge ``cnlab-<name>``, in a free private /24 (or ``subnet``).

    Bad input is ``BadInput``, a name or subnet in use ``InUse``, both before anything is
    created. ``close()`` (also the end of a ``with`` block) kills whatever runs in the hosts
    and removes them, their veths, the bridge and its rules.
    """

    def __init__(self, name: str, count: int = 3, *, subnet: str | None = None) -> None:
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_HOSTS:
            raise BadInput(f"count={count!r} hosts?", fix=f"use 1 to {MAX_HOSTS}")
        self.name = bridge.link_name(name, suffix="")
        bridge.link_name(name, suffix=f"-{count}")          # the longest host's name must fit too
        taken = [n for n in (self.name, *(f"{self.name}-{i}" for i in range(1, count + 1)))
                 if bridge.exists(n) or (ns.NETNS_DIR / n).exists()]
        if taken:
            raise InUse(f"{', '.join(taken)} exists already on this machine",
                        fix="pick another name, or run helpers.cleanup() to remove leftovers")
        self.bridge = bridge.Bridge(self.name, subnet)
        self.hosts: list[Host] = []
        try:
            for i in range(1, count + 1):
                space = ns.NetNS(f"{self.name}-{i}")
                try:
                    port = self.bridge.attach(space)
                except BaseException:
                    space.remove()
                    raise
                self.hosts.append(Host(space, port))
        except BaseException:
            self.close()
            raise

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.bridge.subnet

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.bridge.gateway

    def close(self) -> None:
        """Kill the hosts' processes, remove the hosts, their veths and the bridge; twice is fine."""
        for host in self.hosts:
            for server in host.daemons:
                server.kill()
        for host in self.hosts:
            procfs.kill(host.processes())
        self.bridge.close()
        for host in self.hosts:
            host.space.remove()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        return f"<Network {self.name} {self.subnet}: {', '.join(h.address for h in self.hosts)}>"


def _pids_in(netns: str) -> list[int]:
    """The pids of the processes whose network namespace is the one bound at ``netns``."""
    try:
        inode = os.stat(netns).st_ino
    except OSError:
        return []
    found = []
    for pid in procfs.pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode and pid != os.getpid():
                found.append(pid)
        except OSError:
            pass
    return found


@owners.sweeper(owners.KERNEL - 1)
def sweep() -> None:
    """Kill whatever still runs inside a cnlab network namespace, before the namespaces, veths,
    bridges and rules go (``ns.sweep``, ``bridge.sweep``): a namespace with a process left in it
    outlives its name, and so does its veth."""
    if ns.NETNS_DIR.is_dir():
        for path in ns.NETNS_DIR.iterdir():
            if path.name.startswith(names.PREFIX):
                procfs.kill(_pids_in(str(path)))
    bridge.sweep()
    ns.sweep()


@owners.lister
def leftovers() -> list[str]:
    """Processes alive in a cnlab network namespace (netns, links and rules are listed elsewhere)."""
    found = []
    if ns.NETNS_DIR.is_dir():
        for path in sorted(ns.NETNS_DIR.iterdir()):
            if path.name.startswith(names.PREFIX):
                found += [f"process {pid} in netns {path.name}" for pid in _pids_in(str(path))]
    return found
