"""A real 3-member etcd cluster: one member per host, Raft over the hosts' network.

``Cluster("quorum")`` makes the hosts ``cnlab-quorum-1..3`` (``hosts.Network``: network
namespaces on a bridge) and runs one etcd member in each, named after its host, peers on
``ADDR:2380`` and clients on ``ADDR:2379``, data under ``STATE/etcd/<member>``. Then it kills,
stops, partitions and heals members, and says what Raft does about it::

    with etcd_cluster.Cluster("quorum") as cluster:
        cluster.leader()                       # "cnlab-quorum-2": the one all members agree on
        cluster.put("/k", "v1", via="cnlab-quorum-1")
        election = cluster.measure_election()  # kill the leader; time until a new one rules
        cluster.partition("cnlab-quorum-3")    # its peer traffic dropped; clients still reach it
        cluster.get("/k", via="cnlab-quorum-3")                       # QuorumLost
        cluster.get("/k", via="cnlab-quorum-3", linearizable=False)   # its own copy: stale
        cluster.heal("cnlab-quorum-3"); cluster.audit().lost          # []

A write, and a linearizable read (the default, and what Kubernetes' API server does), go
through the leader and need a quorum: 2 of 3 members. They are sent with etcd's
"require leader" flag, so a member without a leader refuses at once; that refusal is
``QuorumLost``, told apart from a member that does not answer (``etcd.Unreachable``) and
from a plain timeout. Every acknowledged write is kept in a ledger, which ``audit()``
checks on every member: the lab's "0 acknowledged writes lost".

A partition drops the member's *peer* traffic (port 2380, in its own netns's firewall) and
leaves its client port reachable: the student is the client next to the isolated member, as
an API server is next to its etcd on a Kubernetes control-plane node. (``Host.cut()`` would
take the client's path away too, and nobody could watch the member refuse.)

Election timing: ``--heartbeat-interval 50 --election-timeout 500`` (ms). The hosts' round
trip is a veth (~0.05 ms), so the bound is the CPU, not the network: a 500 ms timeout, ten
heartbeats (etcd's rule of thumb), rides out a busy 2-core machine's scheduling stalls and
fsyncs without a spurious election, and still elects a new leader within about 0.5-1 s of
a crash (each follower waits a random 500-1000 ms). ``--pre-vote`` keeps an isolated member
from inflating the term and deposing a healthy leader when it comes back.

Nothing here has a sweep of its own: the members are ``etcd --name cnlab-...`` with their
data under ``STATE/etcd``, which ``etcd.sweep()`` kills and removes, and the hosts are
``hosts.sweep()``'s; ``helpers.leftovers()`` lists all of them.

Used in: 38-etcd-quorum, book/orchestration/orchestration.
"""
import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field

from helpers import errors
from helpers._core import daemon, names, procfs, wait
from helpers.orchestration import bridge, etcd, hosts
from helpers.orchestration.etcd import EtcdError
from helpers.orchestration.hosts import InUse

CLIENT_PORT, PEER_PORT = 2379, 2380
HEARTBEAT_MS, ELECTION_MS = 50, 500
TIMEOUT = 8.0      # a client waits longer than etcd's own request timeout (5 s + 2 elections)
SETTLE = 20 * ELECTION_MS / 1000   # how long a member may take to notice, or to elect


class QuorumLost(EtcdError, errors.QuorumLost):
    """A member refused a write or a linearizable read: it has no leader, because it cannot
    reach a majority of the cluster (it is cut off, or too many members are down)."""


@dataclass(frozen=True)
class Status:
    """What one member says about itself, from its own Raft state (no quorum needed)."""
    member: str
    leader: str | None     # the member it follows (itself if it leads); None: it has none
    term: int              # Raft's election counter: each election starts a new term
    revision: int          # the store's revision in its copy
    applied: int           # the last Raft log index it applied

    @property
    def role(self) -> str:
        return "no leader" if self.leader is None else "leader" if self.leader == self.member else "follower"


@dataclass(frozen=True)
class Election:
    """``measure_election()``: the leader killed, and who took over how fast, in which term."""
    old: str
    new: str
    seconds: float
    term_before: int
    term_after: int


@dataclass(frozen=True)
class Audit:
    """Acknowledged writes checked on every member: ``lost`` lists (member, key) not found."""
    acknowledged: int
    present: dict[str, int]
    lost: list[tuple[str, str]] = field(default_factory=list)


class Member:
    """One etcd member on one host."""

    def __init__(self, host: hosts.Host, cluster: "Cluster") -> None:
        self.host, self.name = host, host.name
        self.address = host.address
        self.client_url = f"http://{self.address}:{cluster.client_port}"
        self.peer_url = f"http://{self.address}:{cluster.peer_port}"
        self.dir = names.STATE / "etcd" / self.name
        self.partitioned = False
        self._cluster = cluster
        self._daemon: daemon.Daemon | None = None

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.running

    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self._daemon is not None and self.running else None

    def _launch(self) -> None:
        """Start the process; it serves clients only once a quorum has it published (``ready``)."""
        c = self._cluster
        argv = [c.binary.path, "--name", self.name, "--data-dir", self.dir / "data",
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in c.members),
                "--initial-cluster-state", "new", "--initial-cluster-token", c.name,
                "--heartbeat-interval", HEARTBEAT_MS, "--election-timeout", ELECTION_MS,
                "--pre-vote=true", "--logger", "zap", "--log-outputs", "stderr"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._daemon = self.host.daemon(argv, what=f"etcd member {self.name}", log=self.dir / "etcd.log",
                                        error=EtcdError)
        self._daemon.start()     # ready at once: whether it serves is the cluster's to wait for

    def ready(self) -> bool:
        """It answers, and follows a leader. ``EtcdError`` with its log if it has exited."""
        if not self.running:
            raise EtcdError(f"etcd member {self.name} exited:\n{self.log_tail()}",
                            fix="read its log above")
        with contextlib.suppress(EtcdError):
            return self.status().leader is not None
        return False

    def client(self, *, require_leader: bool = True) -> etcd.Client:
        return etcd.Client(self.client_url, timeout=TIMEOUT, require_leader=require_leader)

    def status(self) -> Status:
        """Its own view (``maintenance/status``: answered locally); ``etcd.Unreachable`` if it
        does not answer."""
        answer = etcd.Client(self.client_url, timeout=2).call("maintenance/status", {})
        ids = self._cluster.ids
        leader = int(answer.get("leader", 0))
        return Status(self.name, ids.get(leader, str(leader)) if leader else None,
                      int(answer.get("raftTerm", 0)), int(answer["header"].get("revision", 0)),
                      int(answer.get("raftAppliedIndex", 0)))

    def log_tail(self, lines: int = 15) -> str:
        return self._daemon.log_tail(lines) if self._daemon else "(no log)"

    def __repr__(self):
        return f"<etcd member {self.name} {'running' if self.running else 'stopped'}>"


class Cluster:
    """``size`` etcd members, one per host of a ``hosts.Network`` (its own, or ``network``).

    Bad input is ``BadInput``, a member name, data dir, host or port in use ``InUse``, both
    before anything is created. ``close()`` (the end of the ``with`` block) stops every member,
    removes their data and, if it made them, the hosts.
    """

    def __init__(self, name: str = "quorum", size: int = 3, *, network: hosts.Network | None = None,
                 client_port: int = CLIENT_PORT, peer_port: int = PEER_PORT,
                 timeout: float = 60.0) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 7:
            raise errors.BadInput(f"size={size!r} members?", fix="use 1 to 7 (3 or 5 in practice: odd)")
        ports = [client_port, peer_port]
        if any(not isinstance(p, int) or not 0 < p < 65536 for p in ports) or client_port == peer_port:
            raise errors.BadInput(f"ports {client_port!r} and {peer_port!r}",
                                  fix="give two different TCP ports, e.g. 2379 and 2380")
        self.client_port, self.peer_port, self.timeout = client_port, peer_port, timeout
        if network is not None:
            if len(network) < size:
                raise errors.BadInput(f"{network!r} has {len(network)} hosts, not {size}",
                                      fix=f"make the network with count={size}")
            self.name, wanted = network.name, [h.name for h in network.hosts[:size]]
        else:
            self.name = bridge.link_name(name)
            bridge.link_name(name, suffix=f"-{size}")     # hosts.Network's rule for its hosts
            wanted = [f"{self.name}-{i}" for i in range(1, size + 1)]
        _check_free(wanted)
        self.binary = etcd.binary()
        if network is not None:
            for host in network.hosts[:size]:
                _check_ports(host, ports)
        self._own_network = network is None
        self.network = network or hosts.Network(name, count=size)
        self.members = [Member(h, self) for h in self.network.hosts[:size]]
        self.ids: dict[int, str] = {}          # Raft member id -> name, once started
        self.acknowledged: list[tuple[str, str, int]] = []   # (key, value, revision) etcd acknowledged
        self._lock = threading.Lock()

    @property
    def quorum(self) -> int:
        """How many members must agree to elect a leader or commit a write: a majority."""
        return len(self.members) // 2 + 1

    # ------------------------------------------------------------------ members

    def member(self, which: "Member | str | int") -> Member:
        """A member by itself, its name (``"cnlab-quorum-2"``) or its number (1, 2, 3)."""
        if isinstance(which, Member):
            return which
        for i, m in enumerate(self.members, 1):
            if which in (m.name, i):
                return m
        raise errors.NotFound(f"no member {which!r} in {self.name}",
                              fix=f"use one of {', '.join(m.name for m in self.members)}, or 1-{len(self.members)}")

    def start(self, *which: "Member | str | int") -> "Cluster":
        """Start the members (all, or those named) and wait until every running one follows a
        leader. A member cannot serve on its own: it needs a quorum to join."""
        chosen = [self.member(w) for w in which] or self.members
        try:
            for m in chosen:
                if not m.running:
                    m._launch()
            running = [m for m in self.members if m.running]
            wait.until(lambda: all(m.ready() for m in running), self.timeout,
                       f"{len(running)} etcd members to agree on a leader", interval=0.1,
                       detail=lambda: "\n".join(f"{m.name}: {m.log_tail(3)}" for m in running),
                       fix=f"a member needs {self.quorum} of {len(self.members)} running to serve; read the logs above")
            if not self.ids:
                listed = running[0].client(require_leader=False).call("cluster/member/list", {})
                self.ids = {int(m["ID"]): m.get("name", "") for m in listed["members"]}
        except BaseException:
            if not self.ids:         # the first start failed: nothing of it stays
                self.close()
            raise
        return self

    def kill(self, which) -> Member:
        """SIGKILL: a crash. Its acknowledged writes are in its write-ahead log."""
        m = self.member(which)
        if m._daemon:
            m._daemon.kill()
        return m

    def stop(self, which) -> Member:
        """SIGTERM: a clean shutdown (a leader hands over first)."""
        m = self.member(which)
        if m._daemon:
            m._daemon.stop(10)
        return m

    def statuses(self) -> list[Status | None]:
        """Each member's own view, None for one that does not answer."""
        found: list[Status | None] = []
        for m in self.members:
            try:
                found.append(m.status() if m.running else None)
            except EtcdError:
                found.append(None)
        return found

    def table(self) -> str:
        """The members as a table: role, who they follow, term, revision."""
        rows = [f"{'member':<16} {'role':<12} {'follows':<16} {'term':>4} {'revision':>8}"]
        for m, s in zip(self.members, self.statuses()):
            if s is None:
                rows.append(f"{m.name:<16} {'down' if not m.running else 'no answer':<12}")
            else:
                rows.append(f"{m.name:<16} {s.role:<12} {s.leader or '-':<16} {s.term:>4} {s.revision:>8}")
        return "\n".join(rows)

    def _agreed(self) -> str | None:
        """The leader every answering member follows, if they agree and enough answer."""
        seen = [s for s in self.statuses() if s is not None]
        leaders = {s.leader for s in seen}
        if len(seen) >= self.quorum and len(leaders) == 1 and None not in leaders:
            return leaders.pop()
        return None

    def leader(self, timeout: float = SETTLE) -> str:
        """The leader's name, once every answering member (at least a quorum) follows it."""
        return str(wait.until(self._agreed, timeout, "the members to agree on a leader",
                              detail=self.table, interval=0.02))

    def measure_election(self, timeout: float = SETTLE) -> Election:
        """Kill the leader, and time until the others agree on a new one (polled every 10 ms)."""
        old = self.leader()
        term = self.member(old).status().term
        start = time.monotonic()
        self.kill(old)
        new = str(wait.until(lambda: (leader := self._agreed()) != old and leader,
                             timeout, "a new leader", detail=self.table, interval=0.01))
        seconds = time.monotonic() - start
        return Election(old, new, seconds, term, self.member(new).status().term)

    # ------------------------------------------------------------------ partitions

    def _firewall(self, m: Member, action: str) -> None:
        for chain in ("INPUT", "OUTPUT"):
            bridge.iptables(action, chain, "-p", "tcp", "-m", "multiport", "--ports",
                            str(self.peer_port), "-m", "comment", "--comment",
                            names.name("partition"), "-j", "DROP", space=m.host.space)

    def leaderless(self, which, timeout: float = SETTLE) -> Status:
        """Wait until the member says it has no leader (it notices within an election timeout
        or two that it hears from no quorum), and return its status."""
        m = self.member(which)
        def alone() -> Status | None:
            status = m.status()
            return status if status.leader is None else None
        found = wait.until(alone, timeout, f"{m.name} to notice it has no leader", detail=self.table,
                           interval=0.02)
        assert found is not None          # wait.until returns only what is true
        return found

    def partition(self, which) -> Member:
        """Drop the member's peer traffic both ways; return once it has noticed (it has no
        leader) and the others have a leader (a new one, if it led)."""
        m = self.member(which)
        if not m.partitioned:
            self._firewall(m, "-A")
            m.partitioned = True
        self.leaderless(m)
        others = [o for o in self.members if o is not m and o.running]
        wait.until(lambda: all(o.status().leader not in (None, m.name) for o in others), SETTLE,
                   "the majority to have a leader", detail=self.table, interval=0.02)
        return m

    def heal(self, which) -> Member:
        """Let its peer traffic through again; return once it follows the leader and has caught up."""
        m = self.member(which)
        if m.partitioned:
            self._firewall(m, "-D")
            m.partitioned = False
        self.settle()
        return m

    def settle(self, timeout: float = SETTLE) -> None:
        """Wait until every running member follows one leader and holds the same revision."""
        def same():
            seen = [s for m, s in zip(self.members, self.statuses()) if m.running]
            views = [s for s in seen if s is not None]
            return (len(views) == len(seen) and len({s.leader for s in views}) == 1 and views[0].leader
                    and len({s.revision for s in views}) == 1)
        wait.until(same, timeout, "the members to agree and catch up", detail=self.table, interval=0.05)

    # ------------------------------------------------------------------ reads and writes

    def _quorum_lost(self, m: Member, error: EtcdError) -> QuorumLost | None:
        """``QuorumLost`` if ``m`` refused because it has no leader; None if it does not
        answer at all (``error`` is ``Unreachable``) or has a leader (a plain timeout)."""
        try:
            status = m.status()
        except EtcdError:
            return None
        if status.leader is not None:
            return None
        said = "no answer in time" if isinstance(error, etcd.Unreachable) else str(error).split(": ", 1)[-1]
        return QuorumLost(f"{m.name} refused ({said}): it has no leader, because it cannot reach a "
                          f"quorum ({self.quorum} of the {len(self.members)} members, itself included)",
                          fix="start the stopped members or heal the partition; or read with "
                              "linearizable=False: this member's own copy, possibly stale")

    def put(self, key: str, value: str, *, via) -> int:
        """Write through a member (which hands it to the leader); return its revision. Once it
        returns, a quorum has it on disk: it is recorded as acknowledged."""
        m = self.member(via)
        try:
            revision = m.client().put(key, value)
        except EtcdError as e:      # not acknowledged: it may or may not have been committed
            if lost := self._quorum_lost(m, e):
                raise lost from e
            raise
        with self._lock:
            self.acknowledged.append((key, value, revision))
        return revision

    def get(self, key: str, *, via, linearizable: bool = True) -> str | None:
        """Read through a member. Linearizable (the default): the member asks the leader
        whether its copy is current, so it needs a quorum. ``linearizable=False``
        (serializable): its own copy, at once, even alone; possibly stale."""
        m = self.member(via)
        found = []

        def answered():
            try:
                found.append(m.client(require_leader=linearizable).get(key, serializable=not linearizable))
            except EtcdError as e:
                if "leader changed" in str(e):    # an election under way: retried, as etcd's clients do
                    return False
                raise
            return True
        try:
            wait.until(answered, 5, f"{m.name} to answer a read through an election", interval=0.05)
        except EtcdError as e:
            if linearizable and (lost := self._quorum_lost(m, e)):
                raise lost from e
            raise
        kv = found[0]
        return None if kv is None else kv.value.decode()

    def audit(self) -> Audit:
        """Check every acknowledged write on every member, once they have caught up: each read
        from the member's own copy *at the write's revision* (an overwritten write is history,
        not lost): how many each holds, and which are missing."""
        self.settle()
        with self._lock:
            expected = list(self.acknowledged)
        present, lost = {}, []
        for m in self.members:
            client = m.client(require_leader=False)
            held = 0
            for key, value, revision in expected:
                kv = client.get(key, revision=revision, serializable=True)
                if kv is not None and (kv.value.decode(), kv.mod_revision) == (value, revision):
                    held += 1
                else:
                    lost.append((m.name, key))
            present[m.name] = held
        return Audit(len(expected), present, lost)

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Stop every member, remove their data, and the hosts if this cluster made them."""
        for m in self.members:
            if m._daemon:
                m._daemon.kill()
            shutil.rmtree(m.dir, ignore_errors=True)
            if m.partitioned and not self._own_network:
                with contextlib.suppress(errors.LabError):
                    self._firewall(m, "-D")
                m.partitioned = False
        with contextlib.suppress(OSError):     # another etcd's since: leave it
            (names.STATE / "etcd").rmdir()
        if self._own_network:
            self.network.close()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        return f"<etcd cluster {self.name}: {', '.join(m.name for m in self.members)}>"


def _check_free(members: list[str]) -> None:
    """``InUse`` if an etcd already runs under one of these names, or has left its data."""
    def named(p):
        argv = p.argv
        return "--name" in argv[:-1] and argv[argv.index("--name") + 1] in members
    running = sorted({p.argv[p.argv.index("--name") + 1] for p in procfs.processes(named)})
    if running:
        raise InUse(f"an etcd named {', '.join(running)} is running already",
                    fix="close that cluster first, pick another name, or run helpers.cleanup()")
    left = [str(names.STATE / "etcd" / m) for m in members if (names.STATE / "etcd" / m).exists()]
    if left:
        raise InUse(f"etcd data of an earlier member is in {', '.join(left)}",
                    fix="run helpers.cleanup() to remove it, or pick another name")


def _check_ports(host: hosts.Host, ports: list[int]) -> None:
    """``InUse`` if something in ``host`` listens on one of ``ports`` already."""
    listening = host.run(["ss", "-Hltn"]).stdout
    taken = [p for p in ports if any(line.split()[3].endswith(f":{p}") for line in listening.splitlines()
                                     if len(line.split()) > 3)]
    if taken:
        raise InUse(f"port {', '.join(map(str, taken))} is in use in {host.name} already",
                    fix="stop what listens there, or give client_port= / peer_port= others")
