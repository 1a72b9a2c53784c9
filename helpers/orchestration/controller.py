"""A reconcile loop in the Kubernetes style: desired state in etcd, actual state in Docker.

This is a teaching model of one controller of Kubernetes' controller manager (the ReplicaSet
controller), small enough to read in one sitting. It is not an orchestrator to run things on:
it has one machine, no scheduler, no health checks, no rate limits and no leader election.
Kubernetes has all of that; run your workloads there.

- Desired state: one JSON object per replica set under ``/registry/cnlab/replicasets/<name>``,
  laid out like Kubernetes' own objects: ``metadata`` (name, generation), ``spec`` (image,
  replicas) and ``status`` (what the controller last saw). ``apply()`` writes the spec.
- Actual state: Docker containers labelled ``cnlab.owner=<name>`` (and ``cnlab``).
- The loop is level-triggered: every pass lists all of the desired and all of the actual state
  and acts on the difference. Watches (etcd's, and Docker's events) only wake it early; a pass
  also runs every ``resync`` seconds, so a missed event delays a fix but never loses it. Nothing
  is kept in memory between passes: stop the controller, change anything, start a new one,
  and it catches up.

Used in: 33-controller, book/orchestration/orchestration.
"""
import contextlib
import json
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from helpers._core import loop, names, owners, wait
from helpers.containers import images
from helpers.errors import BadInput
from helpers._core.names import LABEL, PREFIX
from helpers.orchestration.swarm import WORKLOAD  # the same idle busybox as Swarm's tasks

if TYPE_CHECKING:
    import docker

    from helpers.orchestration import etcd

REGISTRY = f"/registry/{PREFIX}/replicasets/"
OWNER = f"{LABEL}.owner"


@dataclass(frozen=True)
class Replica:
    """One container as the controller sees it."""
    name: str
    owner: str
    image: str
    state: str   # Docker's: created, running, exited, ...
    created: int  # seconds since the epoch


@dataclass(frozen=True)
class Action:
    verb: str    # "create", "delete" or "failed"
    owner: str
    why: str

    def __str__(self) -> str:
        return f"{self.verb} {self.owner}: {self.why}"


def _check_name(name):
    names.check(name, "replica set name")


# ------------------------------------------------------------------ desired state (etcd)

def apply(db: "etcd.Client", name: str, *, image: str, replicas: int) -> dict[str, Any]:
    """Write the desired state of replica set ``name``; return the object as stored.

    This plays the API server's part: ``metadata.generation`` goes up when the spec changes
    (status writes leave it alone), and the write is a compare-and-swap on the key's
    mod_revision, so a concurrent status write is never overwritten: on a conflict, re-read.
    """
    _check_name(name)
    if not isinstance(replicas, int) or replicas < 0:
        raise BadInput(f"replicas {replicas!r}: give a whole number >= 0")
    if not isinstance(image, str) or not image:
        raise BadInput(f"image {image!r}: give an image reference such as cnlab/busybox:latest")
    spec = {"image": image, "replicas": replicas}
    while True:
        kv = db.get(REGISTRY + name)
        obj: dict[str, Any] = (json.loads(kv.value) if kv else
                               {"metadata": {"name": name, "generation": 0}, "status": {}})
        if obj.get("spec") == spec:
            return obj
        obj["spec"] = spec
        obj["metadata"]["generation"] += 1
        if db.cas(REGISTRY + name, _encode(obj), mod_revision=kv.mod_revision if kv else 0).succeeded:
            return obj


def get(db: "etcd.Client", name: str) -> dict[str, Any] | None:
    """The stored object of replica set ``name``, or None."""
    kv = db.get(REGISTRY + name)
    return json.loads(kv.value) if kv else None


def delete(db: "etcd.Client", name: str) -> bool:
    """Delete the desired state; the controller then deletes the containers it owned."""
    return db.delete(REGISTRY + name) == 1


def _encode(obj):
    return json.dumps(obj, sort_keys=True)


# ------------------------------------------------------------------ actual state (Docker)

def replicas(client: "docker.DockerClient", owner: str | None = None) -> list[Replica]:
    """Every container owned by a replica set (or by ``owner``), sorted by name."""
    label = f"{OWNER}={owner}" if owner else OWNER
    found = [Replica(c["Names"][0].lstrip("/"), c["Labels"][OWNER], c["Image"], c["State"], c["Created"])
             for c in client.api.containers(all=True, filters={"label": label})]
    return sorted(found, key=lambda r: r.name)


def observe(db: "etcd.Client", name: str, client: "docker.DockerClient | None" = None) -> dict[str, Any]:
    """Desired, recorded and actual state of ``name`` side by side: run-independent, unlike IDs."""
    obj = get(db, name) or {}
    with _docker(client) as c:
        actual = Counter(f"{r.state} {r.image}" for r in replicas(c, name))
    return {"spec": obj.get("spec"), "status": obj.get("status"), "actual": dict(sorted(actual.items()))}


@contextlib.contextmanager
def _docker(client: "docker.DockerClient | None") -> Iterator["docker.DockerClient"]:
    if client is not None:
        yield client
        return
    with contextlib.closing(images.client()) as c:
        yield c


# ------------------------------------------------------------------ the diff

def diff(spec: dict[str, Any] | None, owned: list[Replica]) -> tuple[list[tuple[Replica, str]], int]:
    """What to do for one replica set: (containers to delete with why, how many to create).

    Pure logic, no I/O. A container counts if it runs the spec's image; others are replaced.
    ``spec`` None means the object is gone: everything it owned goes (garbage collection).
    """
    if spec is None:
        return [(r, "its replica set is gone") for r in owned], 0
    good = [r for r in owned if r.state == "running" and r.image == spec["image"]]
    delete = [(r, f"{r.state}, not running") if r.image == spec["image"]
              else (r, f"image {r.image}, want {spec['image']}") for r in owned if r not in good]
    extra = sorted(good, key=lambda r: (r.created, r.name))[spec["replicas"]:]  # the newest go
    delete += [(r, f"{len(good)} running, want {spec['replicas']}") for r in extra]
    return delete, max(0, spec["replicas"] - len(good))


class Controller(loop.Runs):
    """The loop: ``reconcile_once()`` by hand, or ``start()`` it in a thread and ``stop()`` it."""

    def __init__(self, db: "etcd.Client", *, resync: float = 2.0,
                 client: "docker.DockerClient | None" = None) -> None:
        self.db = db
        self.resync = resync
        self._client = client
        self._lock = threading.Lock()
        self.passes = 0
        # Every pass lists everything: the watches' events only say "now", never what changed.
        self._loop = loop.Loop(lambda keys: self.reconcile_once(), resync=resync, name="cnlab-controller",
                               watches=[loop.Watch("etcd", self._watch_etcd),
                                        loop.Watch("docker", self._watch_docker)])
        self.history = self._loop.log   # a log for people to read, never used to decide

    @property
    def last_error(self) -> Exception | None:
        """Why the last pass failed (etcd or Docker away), or None once one succeeds."""
        return self._loop.last_error

    # one pass ------------------------------------------------------------------------
    def reconcile_once(self) -> list[Action]:
        """List everything, diff, act, record status; return the actions taken."""
        with self._lock, _docker(self._client) as client:
            objects = {kv.key.removeprefix(REGISTRY): kv for kv in self.db.get_prefix(REGISTRY)
                       if "/" not in kv.key.removeprefix(REGISTRY)}
            owned: dict[str, list[Replica]] = {}
            for r in replicas(client):
                owned.setdefault(r.owner, []).append(r)
            actions = []
            for owner in sorted(set(owned) - set(objects)):
                actions += self._act(client, owner, None, owned[owner])
            for name, kv in sorted(objects.items()):
                try:
                    obj = json.loads(kv.value)
                    spec = {"image": str(obj["spec"]["image"]), "replicas": int(obj["spec"]["replicas"])}
                    generation = int(obj["metadata"]["generation"])
                except (ValueError, KeyError, TypeError) as e:
                    actions.append(Action("failed", name, f"not a replica set object: {e!r}"))
                    continue
                actions += self._act(client, name, spec, owned.get(name, []))
                self._record(client, kv, obj, spec, generation)
            self.passes += 1
            self.history.extend(actions)
            return actions

    def _act(self, client, owner, spec, owned):
        import docker
        delete, create = diff(spec, owned)
        actions = []
        for replica, why in delete:
            with contextlib.suppress(docker.errors.NotFound):  # already gone: that is the goal
                client.api.remove_container(replica.name, force=True)
            actions.append(Action("delete", owner, why))
        for _ in range(create):
            name = names.name(owner, secrets.token_hex(3))
            try:
                client.containers.create(spec["image"], WORKLOAD, name=name,
                                         labels={LABEL: "controller", OWNER: owner}).start()
            except docker.errors.DockerException as e:
                actions.append(Action("failed", owner, f"cannot create a container: {e}"))
                break
            kept = len(owned) - len(delete)
            actions.append(Action("create", owner, f"{kept} running, want {spec['replicas']}"))
        return actions

    def _record(self, client, kv, obj, spec, generation):
        """Write what is true now into ``status``; lose a race quietly: the next pass writes again."""
        mine = replicas(client, kv.key.removeprefix(REGISTRY))
        status = {"observedGeneration": generation, "replicas": len(mine),
                  "readyReplicas": sum(r.state == "running" and r.image == spec["image"] for r in mine)}
        if obj.get("status") != status:
            self.db.cas(kv.key, _encode({**obj, "status": status}), mod_revision=kv.mod_revision)

    # the loop in a thread (running, start, stop: loop.Runs) -----------------------------
    def _watch_etcd(self):
        """Desired state changed: wake up."""
        return self.db.watch(REGISTRY, prefix=True)

    def _watch_docker(self):
        """Actual state changed (an owned container started, died or went): wake up."""
        client = images.client()
        try:
            events = client.events(decode=True, filters={"type": "container", "label": OWNER,
                                                         "event": ["start", "die", "destroy"]})
        except BaseException:
            client.close()
            raise
        return loop.Stream(events, events.close, client.close)

    def __repr__(self) -> str:
        return f"<controller.Controller {'running' if self.running else 'stopped'}, {self.passes} passes>"


def wait_converged(db: "etcd.Client", name: str, *, timeout: float = 30.0,
                   client: "docker.DockerClient | None" = None) -> dict[str, Any]:
    """Wait until the containers of ``name`` match its spec and its status says so; return the object."""
    with _docker(client) as c:
        def converged():
            obj = get(db, name)
            if obj is None:
                return None
            spec, status = obj["spec"], obj.get("status", {})
            mine = replicas(c, name)
            return obj if (status.get("observedGeneration") == obj["metadata"]["generation"]
                           and status.get("readyReplicas") == status.get("replicas") == spec["replicas"]
                           and len(mine) == spec["replicas"]
                           and all(r.state == "running" and r.image == spec["image"] for r in mine)) else None
        return wait.until(converged, timeout, f"replica set {name} converging", interval=0.1,
                          detail=lambda: str(observe(db, name, c)),
                          fix="is a controller running (controller.start()), or call reconcile_once()")


@owners.sweeper(owners.RUNTIMES)
def sweep() -> None:
    """Remove every container a replica set owned (the desired state goes with its etcd)."""
    try:
        client = images.client(timeout=10)
    except images.EngineUnavailable:
        return
    import docker
    with contextlib.closing(client):
        for c in client.api.containers(all=True, filters={"label": OWNER}):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(c["Id"], force=True)
