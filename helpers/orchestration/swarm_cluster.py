"""Many Docker engines on one machine: a multi-node Swarm, one dockerd per host.

Each node is a host of a ``hosts.Network`` (a network namespace on a bridge of its own) running
its own dockerd, with its own data-root, exec-root, pidfile, socket and containerd under
``STATE/swarm/<cluster>/<node>``, in mount and UTS namespaces of its own too (its hostname is
the node's name). Inside its namespace the engine's bridges and routes are its own: the
machine's docker0 and iptables are never touched. Its containers live under the cgroup
``/cnlab-<cluster>-<i>`` of each hierarchy. The course's busybox image is copied into every
engine (nothing can be pulled here); the first node runs ``swarm init`` and the others join it
over the hosts' addresses::

    with swarm_cluster.Cluster("swarm", managers=3) as cluster:
        web = cluster.create("web", replicas=3)     # what swarm.Swarm does, through node 1
        cluster.spread(web)                         # {"cnlab-swarm-1": 1, "cnlab-swarm-2": 1, ...}
        cluster.stop_engine("cnlab-swarm-3")        # its tasks are rescheduled on the others:
        cluster.wait_moved(web, "cnlab-swarm-3")    # how long it took, step by step

A node counts as down once the managers have missed its heartbeats for three periods
(``heartbeat``: Swarm's default is 5 s, the course's 1 s, like ``docker swarm update
--dispatcher-heartbeat 1s``); only then are its tasks started elsewhere. The managers agree
through Raft: with fewer than a majority of them up, every change is ``QuorumLost``.

Used in: 37-swarm-cluster, book/orchestration/orchestration.
"""
import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from helpers._core import daemon, names, owners, procfs, wait
from helpers.containers import cgroups, engine, images
from helpers.errors import BadInput, LabError, LabTimeout
from helpers.orchestration import hosts, swarm
from helpers.orchestration.bridge import InUse
from helpers.orchestration.swarm import QuorumLost, SwarmError

if TYPE_CHECKING:
    import docker

__all__ = ["Cluster", "Failover", "InUse", "Node", "QuorumLost", "leftovers", "sweep"]

ROOT = names.STATE / "swarm"          # one folder per cluster, one per node inside
MAX_NODES = 5                         # each is a dockerd and a containerd: 2 cores hold about that
PORT = 2377                           # Swarm's cluster-management port, on each host's address
_PROGRAMS = ("dockerd", "containerd", "containerd-shim-runc-v2")
_HOSTNAME = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'   # in the node's own UTS namespace


class Node:
    """One host of the cluster and its engine: ``name`` (also its hostname, so Swarm's node
    name), ``address``, ``role`` ("manager" or "worker"), ``url`` (its engine's socket)."""

    def __init__(self, host: hosts.Host, role: str, folder: Path) -> None:
        self.host, self.role, self.dir = host, role, folder
        self.name, self.address = host.name, host.address
        self.cgroup = host.name                 # its containers' cgroup parent
        self.url = f"unix://{folder}/docker.sock"
        self.server: daemon.Daemon | None = None
        self.stopping = 0.0                     # how long its last stop took, in seconds
        self.stopped_at: float | None = None    # time.monotonic() when it was told to stop
        self._client: "docker.DockerClient | None" = None

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.running

    def argv(self) -> list[str]:
        d = self.dir
        return ["unshare", "--uts", "sh", "-c", _HOSTNAME, self.name,
                "dockerd", "--host", self.url, "--data-root", f"{d}/data", "--exec-root", f"{d}/exec",
                "--pidfile", f"{d}/docker.pid", "--cgroup-parent", f"/{self.cgroup}",
                "--exec-opt", "native.cgroupdriver=cgroupfs",
                "--bridge", "none", "--iptables=false", "--ip-masq=false"]

    def start(self, timeout: float) -> None:
        """Start its dockerd inside the host; return once the engine answers."""
        def answers():
            with contextlib.suppress(engine.EngineUnavailable):
                engine.client(timeout=2, base_url=self.url).close()
                return True
        self.server = self.host.daemon(self.argv(), what=f"dockerd of {self.name}",
                                       log=self.dir / "dockerd.log", private_mounts=True,
                                       error=SwarmError)
        self.server.start(answers, timeout=timeout, fix=f"read {self.dir / 'dockerd.log'}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM its dockerd (which stops its containers first), SIGKILL after ``timeout``."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.server is not None:
            self.server.stop(timeout)

    @property
    def client(self) -> "docker.DockerClient":
        """A client of this node's own engine (EngineUnavailable while it is stopped)."""
        if self._client is None:
            self._client = engine.client(timeout=20, base_url=self.url)
        return self._client

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.address} {self.role} {'up' if self.running else 'stopped'}>"


@dataclass(frozen=True)
class Failover:
    """What happened after a node's engine was told to stop (SIGTERM), in seconds from then:
    how long the engine took to stop (it ends its containers first), when the managers
    marked the node down (its heartbeats stop with the SIGTERM), and when every replica ran
    on the other nodes."""
    node: str
    stopping: float
    down: float
    moved: float


class Cluster(swarm.Swarm):
    """A Swarm of ``managers`` + ``workers`` nodes, each a host with its own dockerd. Everything
    ``swarm.Swarm`` does (``create``, ``services``, each Service's ``scale``, ``tasks``, ...)
    goes through the first node, a manager. ``init()`` builds it and ``leave()`` (the end of a
    ``with`` block) removes everything; a name in use is ``InUse`` before anything is made."""

    def __init__(self, name: str = "swarm", *, managers: int = 3, workers: int = 0,
                 heartbeat: float = 1.0, subnet: str | None = None, timeout: float = 90.0) -> None:
        for what, value, low in (("managers", managers, 1), ("workers", workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BadInput(f"{what}={value!r}", fix=f"use a whole number >= {low}")
        if managers + workers > MAX_NODES:
            raise BadInput(f"{managers + workers} nodes: each is a dockerd and a containerd",
                           fix=f"use at most {MAX_NODES} on this machine")
        if not isinstance(heartbeat, (int, float)) or not 0.1 <= heartbeat <= 60:
            raise BadInput(f"heartbeat={heartbeat!r} seconds", fix="use 0.1 to 60 (Swarm's default is 5)")
        super().__init__(timeout=timeout)
        self.name = names.prefixed(names.check(name, "the cluster's name", most=10))
        self.managers, self.workers, self.heartbeat, self.subnet = managers, workers, heartbeat, subnet
        self.network: hosts.Network | None = None
        self.nodes: list[Node] = []
        self.image = images.BUSYBOX + ":latest"

    # -- making it, and taking it apart -------------------------------------------------------

    def init(self) -> Self:
        """Start one engine per host, copy busybox into each, ``swarm init`` the first node and
        join the others (as managers, then workers) over the hosts' addresses."""
        folder = ROOT / self.name
        engines = [p.pid for p in procfs.processes(_ours(folder))]
        if folder.exists() or engines:
            raise InUse(f"a swarm cluster named {self.name} exists already ({folder}"
                        f"{f', engines {engines}' if engines else ''})",
                        fix="pick another name, or run helpers.cleanup() to remove leftovers")
        self.image = images.busybox()                    # on the machine's engine, to copy from
        self.network = hosts.Network(self.name, self.managers + self.workers, subnet=self.subnet)
        try:
            roles = ["manager"] * self.managers + ["worker"] * self.workers
            self.nodes = [Node(host, role, names.state_dir("swarm", self.name, host.name))
                          for host, role in zip(self.network.hosts, roles)]
            for node in self.nodes:
                node.start(self.timeout)
                images.copy(self.image, node.url)
            first = self.nodes[0]
            with self._calling("swarm init"):
                first.client.swarm.init(advertise_addr=first.address, listen_addr=f"{first.address}:{PORT}",
                                        dispatcher_heartbeat_period=int(self.heartbeat * swarm.SECOND),
                                        labels=swarm.MARK)
                tokens = first.client.swarm.attrs["JoinTokens"]
            for node in self.nodes[1:]:
                with self._calling(f"{node.name} joining"):
                    node.client.swarm.join([f"{first.address}:{PORT}"], tokens[node.role.title()],
                                           listen_addr=f"{node.address}:{PORT}", advertise_addr=node.address)
            self._client = first.client
            self._wait(lambda: all(n["state"] == "ready" for n in self.status()), "every node ready")
        except BaseException:
            self.leave()
            raise
        return self

    def leave(self) -> None:
        """Stop every engine (each ends its containers), remove the hosts, the containers'
        cgroups and the cluster's folder. Needs no quorum; twice is fine."""
        self._client = None
        if self.network is None:        # never made (a name in use): nothing of it to remove
            return
        try:
            for node in self.nodes:          # every engine stops at once: each ends its containers
                if node.running and node.server and node.server.process:
                    node.server.process.terminate()
            for node in self.nodes:
                node.stop()
        finally:
            self.network.close()                         # kills what is left in the hosts (shims)
            cgroups.remove_top(*(n.cgroup for n in self.nodes))          # and in the containers
            shutil.rmtree(ROOT / self.name, ignore_errors=True)
            with contextlib.suppress(OSError):
                ROOT.rmdir()

    # -- the nodes ----------------------------------------------------------------------------

    def get(self, name: str | int) -> Node:
        """The node called ``name`` ("cnlab-swarm-2"), or its number (2)."""
        for i, node in enumerate(self.nodes, 1):
            if str(name) in (node.name, str(i)):
                return node
        raise BadInput(f"no node {name!r} in {self.name}", fix=f"use one of {[n.name for n in self.nodes]}")

    def _other(self, name: str, doing: str) -> Node:
        node = self.get(name)
        if node is self.nodes[0]:
            raise BadInput(f"{node.name} is the node the cluster talks to Swarm through",
                           fix=f"{doing} another node")
        return node

    @property
    def _front(self) -> "docker.DockerClient":
        """The first node's client: every Swarm call goes through it."""
        if self._client is None:
            raise SwarmError(f"{self.name} is not running", fix="call init() first, or use `with`")
        return self._client

    def _swarm_nodes(self) -> list[Any]:
        with self._calling("listing the nodes"):
            return self._front.nodes.list()

    def status(self) -> list[dict[str, str]]:
        """Every node as the managers see it, by name: role, state (ready/down), availability
        (active/drain) and, for a manager, whether the others reach it."""
        rows = []
        for n in self._swarm_nodes():
            a = n.attrs
            rows.append({"name": a["Description"]["Hostname"], "role": a["Spec"]["Role"],
                         "state": a["Status"]["State"], "availability": a["Spec"]["Availability"],
                         "manager": a.get("ManagerStatus", {}).get("Reachability", "")})
        return sorted(rows, key=lambda r: r["name"])

    @property
    def leader(self) -> str | None:
        """The name of the manager Raft has elected leader (it may change: not for comparing)."""
        return next((n.attrs["Description"]["Hostname"] for n in self._swarm_nodes()
                     if n.attrs.get("ManagerStatus", {}).get("Leader")), None)

    def _row(self, name: str) -> dict[str, str]:
        return next(r for r in self.status() if r["name"] == name)

    def _state(self, name: str) -> str:
        return self._row(name)["state"]

    def stop_engine(self, name: str, timeout: float = 30) -> float:
        """Stop the node's dockerd, as ``systemctl stop docker`` would: it ends its containers
        and exits; the managers only learn it from the missing heartbeats. Returns how long
        the stop took. Not the first node: the cluster talks through it."""
        node = self._other(name, "stop")
        node.stopped_at = time.monotonic()
        node.stop(timeout)
        node.stopping = time.monotonic() - node.stopped_at
        return node.stopping

    def start_engine(self, name: str) -> None:
        """Start the node's dockerd again: it rejoins the swarm from its state, and is ready
        once the managers hear its heartbeat."""
        node = self.get(name)
        if node.running:
            raise BadInput(f"the engine of {node.name} runs already")
        node.start(self.timeout)
        self._wait(lambda: self._leader_known() and _healthy(self._row(node.name)),
                   f"{node.name} ready again (a leader must mark it so)")

    def wait_moved(self, service: swarm.Service, name: str, *, timeout: float | None = None) -> Failover:
        """Wait until the managers have marked the stopped node down and every replica of
        ``service`` runs on another node; the times are counted from the SIGTERM."""
        node = self.get(name)
        since = node.stopped_at
        if since is None or node.running:
            raise BadInput(f"the engine of {node.name} was not stopped", fix="call stop_engine() first")
        down: list[float] = []

        def moved():
            if not down and self._state(node.name) == "down":
                down.append(time.monotonic() - since)
            return down and self._running(service)

        self._wait(moved, f"the tasks of {service.name} moving off {node.name}", timeout,
                   lambda: "; ".join(f"{t.node}: {t}" for t in self.tasks(service)))
        return Failover(node.name, round(node.stopping, 1), round(down[0], 1), round(time.monotonic() - since, 1))

    def wait_running(self, service: swarm.Service, timeout: float | None = None) -> None:
        """Wait until every replica of ``service`` runs on a node that is up. (``scale()``
        waits for more: that every old task has ended, which a task on a stopped node never
        reports until its node is back.)"""
        self._wait(lambda: self._running(service), f"{service.replicas} tasks of {service.name} running",
                   timeout, lambda: "; ".join(f"{t.node}: {t}" for t in self.tasks(service)))

    def _running(self, service: swarm.Service) -> bool:
        stopped = {n.name for n in self.nodes if not n.running}
        up = {r["name"] for r in self.status() if r["state"] == "ready" and r["name"] not in stopped}
        running = [t for t in self.tasks(service) if t.desired == t.state == "running"]
        return len(running) == service.replicas and all(t.node in up for t in running)

    def drain(self, name: str, *, timeout: float | None = None) -> None:
        """Availability drain: the scheduler moves the node's tasks elsewhere and places none
        there. Returns once no task runs there and every service's replicas run elsewhere."""
        node = self.get(name)
        self._availability(node, "drain")

        def emptied():
            services = self.services()
            return (all(self._running(s) for s in services)
                    and not any(self.spread(s)[node.name] for s in services))
        self._wait(emptied, f"the tasks moving off {node.name}", timeout)

    def activate(self, name: str) -> None:
        """Availability active: the node takes new tasks again (running ones are not moved back)."""
        self._availability(self.get(name), "active")

    def _availability(self, node: Node, value: str) -> None:
        with self._calling(f"setting {node.name} to {value}"):
            found = next(n for n in self._swarm_nodes() if n.attrs["Description"]["Hostname"] == node.name)
            found.update({**found.attrs["Spec"], "Availability": value})

    def can_act(self) -> bool:
        """Whether the managers can change anything: a leader is elected (a majority is up)."""
        return self._leader_known() is True

    def _leader_known(self) -> bool | None:
        """True: a leader; False: the managers say there is none; None: not known yet (a
        manager whose leader has just gone answers "deadline exceeded" until its Raft
        election timeout has passed)."""
        try:
            return self.leader is not None
        except QuorumLost:
            return False
        except LabTimeout:
            return None
        except SwarmError as e:
            if "deadline exceeded" in str(e).lower():
                return None
            raise

    def wait_quorum(self, present: bool, timeout: float | None = None) -> None:
        """Wait until Raft has seen what the managers going or coming means: a leader with a
        majority that has heard from every node whose engine runs (``present``), or none. A
        leader that has lost its majority steps down after its election timeout (10 ticks of
        1 s); meanwhile a change it is asked for hangs, then fails, and a read may hang up to
        20 s: expect half a minute."""
        def seen():
            if not present:
                return self._leader_known() is False
            # a new leader first marks every node "unknown", until it hears from each again
            up = {n.name for n in self.nodes if n.running}
            return self._leader_known() and all(_healthy(r) for r in self.status() if r["name"] in up)
        self._wait(seen, f"the swarm {'to regain' if present else 'to lose'} its quorum", timeout)

    # -- services, with the node of each task -------------------------------------------------

    def create(self, name: str, *, replicas: int = 1, image: str | None = None,
               constraints: Iterable[str] = (), **options: Any) -> swarm.Service:
        """``swarm.Swarm.create`` with the busybox image every engine has."""
        return super().create(name, replicas=replicas, image=image or self.image,
                              constraints=constraints, **options)

    def tasks(self, service: swarm.Service) -> list[swarm.Task]:
        """The service's tasks, each with the name of its node (``task.node``)."""
        named = {n.id: n.attrs["Description"]["Hostname"] for n in self._swarm_nodes()}
        with self._calling(f"the tasks of {service.name}"):
            found = service.tasks()
        return [dataclasses.replace(t, node=named.get(t.node, t.node)) for t in found]

    def spread(self, service: swarm.Service) -> dict[str, int]:
        """How many of the service's tasks run on each node (every node named, 0 included)."""
        counts = dict.fromkeys((n.name for n in self.nodes), 0)
        for t in self.tasks(service):
            if t.desired == t.state == "running":
                counts[t.node] += 1
        return counts

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self, what: str):
        """Docker's refusals as the course's: no leader is QuorumLost, the rest SwarmError."""
        import docker
        try:
            with engine.calling(what, timeout=20):
                yield
        except LabError as e:
            if isinstance(e.__cause__, docker.errors.APIError):
                raise swarm.refused(e.__cause__, what) from e.__cause__
            raise

    def _wait(self, check, what, timeout=None, detail=lambda: ""):
        return wait.until(check, timeout or self.timeout, what, interval=0.2, detail=detail,
                          fix=f"read the nodes' logs under {ROOT / self.name}")

    def __repr__(self) -> str:
        return f"<swarm_cluster.Cluster {self.name}: {', '.join(map(repr, self.nodes))}>"


def _healthy(row: dict[str, str]) -> bool:
    """A node whose heartbeats arrive, and, if a manager, that the other managers reach."""
    return row["state"] == "ready" and row["manager"] in ("", "reachable")


def _ours(folder: Path):
    """Matches the engines, containerds and shims of the clusters under ``folder``."""
    def match(p: procfs.Process) -> bool:
        return (os.path.basename(p.argv[0]) in _PROGRAMS
                and any(f"{folder}/" in a for a in p.argv))
    return match


@owners.lister
def leftovers() -> list[str]:
    """The swarm clusters whose folder is still there."""
    return [f"swarm cluster {d.name}" for d in sorted(ROOT.iterdir())] if ROOT.is_dir() else []


@owners.sweeper(owners.RUNTIMES - 1)
def sweep() -> None:
    """Kill every engine of a cluster (and its containerd and shims), then remove the folders;
    the hosts, their cgroups and the containers' go with the kernel's sweeps."""
    daemon.strays(_ours(ROOT), timeout=10)
    shutil.rmtree(ROOT, ignore_errors=True)
