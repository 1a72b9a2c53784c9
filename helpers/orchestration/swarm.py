"""Docker Swarm on this one engine: services, their tasks, self-healing, rolling updates, placement.

A service is desired state ("3 replicas of this image"); Swarm's manager turns it into tasks
(one per replica, each in a numbered *slot*) and the engine runs each task as a container.
Each task shows both sides: its desired state (what the manager wants) and its current state
(what really happened)::

    with swarm.Swarm() as sw:
        web = sw.create("web", replicas=3)
        web.kill(slot=1)            # a container dies ...
        web.wait_replaced(...)      # ... and the manager starts a new task in its slot

Leaving the ``with`` block removes the services, waits until their containers are gone and
leaves the swarm, also when a cell fails. A swarm this course did not create is never touched.

Used in: 31-swarm, book/orchestration/orchestration.
"""
import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from helpers._core import names, owners, wait
from helpers.containers import engine, images
from helpers import errors
from helpers.errors import BadInput, LabError
from helpers._core.names import LABEL

if TYPE_CHECKING:
    import docker

MARK = {LABEL: "course"}  # on the swarm's spec (and services, containers): the course made it
SECOND = 1_000_000_000    # the Swarm API counts durations in nanoseconds
# The workload: busybox idling as PID 1, leaving at once on SIGTERM (PID 1 ignores it otherwise).
WORKLOAD = ["sh", "-c", "trap 'exit 0' TERM; sleep 86400 & wait"]
_TERMINAL = {"complete", "shutdown", "failed", "rejected", "orphaned", "remove"}


class SwarmError(LabError):
    """Swarm refused something, or did something else than asked."""


class ForeignSwarm(SwarmError, errors.Refused):
    def __init__(self, state: str) -> None:
        super().__init__(f"this Docker engine is already in a swarm ({state}) that the course did not create",
                         fix="the labs leave it alone; if it is yours to end, "
                             "run `docker swarm leave --force`")


@dataclass(frozen=True)
class Task:
    """One replica's attempt: a slot, the image, what the manager wants and what really is."""
    id: str
    slot: int
    image: str
    desired: str
    state: str
    error: str
    container: str | None
    node: str = ""            # the node's ID (a multi-node swarm puts its name here: swarm_cluster)

    @classmethod
    def _from(cls, task):
        status = task["Status"]
        image = task["Spec"]["ContainerSpec"]["Image"].split("@")[0]
        return cls(task["ID"], task.get("Slot", 0), image, task["DesiredState"], status["State"],
                   status.get("Err", ""), status.get("ContainerStatus", {}).get("ContainerID"),
                   task.get("NodeID", ""))

    def __str__(self) -> str:
        text = f"slot {self.slot}  {self.image:22}  desired {self.desired:8}  current {self.state}"
        return text + (f"  ({self.error})" if self.error else "")


def is_ours(client: "docker.DockerClient") -> bool:
    """Whether the active swarm is one the course made (its spec carries the cnlab label)."""
    client.swarm.reload()
    return (client.swarm.attrs.get("Spec", {}).get("Labels") or {}).get(LABEL) == MARK[LABEL]


# What managers answer when Raft has lost its quorum: a follower (or a leader that stepped
# down) says there is no leader; a leader that loses its majority during a change says so.
NO_QUORUM = ("does not have a leader", "lost leader status")


def refused(error: "docker.errors.APIError", what: str) -> SwarmError:
    """The error for an API refusal: ``QuorumLost`` when no leader can be elected (too few
    managers are up), else a SwarmError with the engine's explanation."""
    if any(words in str(error.explanation) for words in NO_QUORUM):
        return QuorumLost(f"{what}: the swarm has no leader (Raft has lost its quorum)",
                          fix="start enough managers again that more than half of them are up")
    return SwarmError(f"Swarm refused {what}: {error.explanation}")


class QuorumLost(SwarmError, errors.QuorumLost):
    """Too few managers are up for Raft to elect a leader: the swarm can change nothing."""


def _wait(check, timeout, what, detail=lambda: ""):
    """``wait.until`` at Swarm's pace, with Swarm's advice when it times out."""
    return wait.until(check, timeout, what, interval=0.2, detail=detail,
                      fix="look at the tasks' errors; is the engine overloaded?")


class Swarm:
    """A one-node swarm on this engine: ``init()`` it and ``leave()`` it, or use ``with``."""

    def __init__(self, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._client: "docker.DockerClient | None" = None     # while in the swarm
        self._had_gwbridge = True

    def init(self) -> Self:
        """``docker swarm init --advertise-addr 127.0.0.1``, marked as the course's swarm."""
        self._client = engine.client()
        try:
            state = self._client.info()["Swarm"]["LocalNodeState"]
            if state != "inactive":
                if not is_ours(self._client):
                    raise ForeignSwarm(state)
                sweep()  # a course swarm that a crash left behind
            self._had_gwbridge = bool(self._client.networks.list(names=["docker_gwbridge"]))
            self._client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377",
                                    labels=MARK)
        except BaseException:
            self._client.close()
            self._client = None
            raise
        return self

    def leave(self) -> None:
        """Remove the services, wait until their containers are gone, leave the swarm (force)."""
        if self._client is None:  # never initialised, or left already
            return
        try:
            _teardown()
            if not self._had_gwbridge:  # Swarm's bridge for this node; Docker makes it again on init
                for network in self._client.networks.list(names=["docker_gwbridge"]):
                    with contextlib.suppress(Exception):
                        network.remove()
        finally:
            self._client.close()
            self._client = None

    def __enter__(self) -> Self:
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.leave()

    @property
    def node(self) -> dict[str, Any]:
        """This engine's node: its role, availability and labels, as the scheduler sees them."""
        node = self._client.nodes.list()[0]
        return {"role": node.attrs["Spec"]["Role"], "availability": node.attrs["Spec"]["Availability"],
                "labels": node.attrs["Spec"].get("Labels") or {}}

    def label_node(self, **labels: str) -> None:
        """Add labels to this node; the scheduler places pending tasks that now fit."""
        node = self._client.nodes.list()[0]
        spec = dict(node.attrs["Spec"])
        spec["Labels"] = {**(spec.get("Labels") or {}), **labels}
        node.update(spec)

    def create(self, name: str, *, replicas: int = 1, image: str | None = None,
               constraints: Iterable[str] = (), parallelism: int = 1, delay: float = 1.0,
               restart_delay: float = 1.0, wait: bool = True) -> "Service":
        """Create service ``cnlab-<name>``; with ``wait``, return once its replicas all run
        (not with ``constraints``: they may never be met).

        Rolling updates and rollbacks replace ``parallelism`` tasks at a time, ``delay`` seconds
        apart (stop the old task first, then start the new one). A task whose container dies is
        replaced after ``restart_delay`` seconds.
        """
        import docker
        names.check(name, "service name")
        if replicas < 0 or parallelism < 1 or delay < 0 or restart_delay < 0:
            raise BadInput("replicas must be >= 0, parallelism >= 1, delays >= 0")
        if self._client is None:
            raise SwarmError("this Swarm is not initialised", fix="call init() first, or use `with`")
        rolling = dict(parallelism=parallelism, delay=int(delay * SECOND), order="stop-first",
                       failure_action="pause", monitor=SECOND)  # watch each new task for 1 s
        service = self._client.services.create(
            image or images.busybox(), command=WORKLOAD, name=names.name(name),
            labels=MARK, container_labels=MARK, stop_grace_period=5 * SECOND,
            mode=docker.types.ServiceMode("replicated", replicas=replicas),
            constraints=list(constraints),
            restart_policy=docker.types.RestartPolicy("any", delay=int(restart_delay * SECOND)),
            update_config=docker.types.UpdateConfig(**rolling),
            rollback_config=docker.types.RollbackConfig(**rolling))
        created = Service(self, service)
        if wait and not constraints:
            created.wait_converged()
        return created

    def services(self) -> list["Service"]:
        return sorted((Service(self, s) for s in self._client.services.list(filters={"label": LABEL})),
                      key=lambda s: s.name)


class Service:
    """One Swarm service: its spec (desired) and its tasks (desired and current state)."""

    def __init__(self, swarm: Swarm, service: "docker.models.services.Service") -> None:
        self._swarm, self._service = swarm, service
        self.id, self.name = service.id, service.name
        self.fewest_running: int | None = None    # during the last rolling update or rollback

    @property
    def spec(self) -> dict[str, Any]:
        self._service.reload()
        return self._service.attrs["Spec"]

    @property
    def replicas(self) -> int:
        return self.spec["Mode"]["Replicated"]["Replicas"]

    @property
    def image(self) -> str:
        return self.spec["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0]

    @property
    def update_state(self) -> str | None:
        """The last rolling update's state ("updating", "completed", "rollback_completed", ...), or None."""
        self._service.reload()
        return self._service.attrs.get("UpdateStatus", {}).get("State")

    def tasks(self) -> list[Task]:
        """Every task the manager still remembers, running and past, sorted by slot then state."""
        found = [Task._from(t) for t in self._service.tasks()]
        return sorted(found, key=lambda t: (t.slot, t.desired != "running", t.state, t.image))

    def running(self) -> list[Task]:
        return [t for t in self.tasks() if t.desired == t.state == "running"]

    def summary(self) -> dict[tuple[str, str], int]:
        """How many tasks are in each (desired, current) state pair: run-independent, unlike IDs."""
        return dict(sorted(Counter((t.desired, t.state) for t in self.tasks()).items()))

    def _converged(self):
        tasks = self.tasks()
        live = [t for t in tasks if t.desired == "running"]
        done = all(t.state in _TERMINAL and t.desired != "remove" for t in tasks if t.desired != "running")
        return (done and len(live) == self.replicas
                and all(t.state == "running" and t.image == self.image for t in live))

    def wait_converged(self, timeout: float | None = None) -> Self:
        """Wait until exactly ``replicas`` tasks run the current image and every old one has ended."""
        _wait(self._converged, timeout or self._swarm.timeout, f"{self.name} converging",
              lambda: "Tasks: " + "; ".join(map(str, self.tasks())))
        return self

    def scale(self, replicas: int, *, wait: bool = True) -> Self:
        if replicas < 0:
            raise BadInput(f"replicas {replicas!r}: must be >= 0")
        self._update(lambda spec: spec["Mode"]["Replicated"].update(Replicas=replicas))
        return self.wait_converged() if wait else self

    def update(self, image: str, *, wait: bool = True) -> list[int] | None:
        """A rolling update to ``image``; return how many tasks ran it, step by step (e.g. 0, 1, 2, 3)."""
        self._update(lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=image))
        return self._follow("completed") if wait else None

    def rollback(self, *, wait: bool = True) -> list[int] | None:
        """``docker service rollback``: the manager rolls back to the previous spec, rolling too."""
        api = self._swarm._client.api
        self._service.reload()
        response = api.post(f"{api.base_url}/v{api.api_version}/services/{self.id}/update",
                            params={"version": self._service.version, "rollback": "previous"},
                            json=self._service.attrs["Spec"])
        if not response.ok:
            raise SwarmError(f"Swarm refused to roll back {self.name}: {response.text.strip()}")
        return self._follow("rollback_completed") if wait else None

    def _update(self, change):
        """Change a copy of the whole current spec and send it back (docker-py's partial
        updates would reset the placement and restart policy)."""
        import docker
        try:
            self._service.reload()
            spec = self._service.attrs["Spec"]
            change(spec)
            self._swarm._client.api.update_service(
                self.id, self._service.version, task_template=spec["TaskTemplate"], name=spec["Name"],
                labels=spec.get("Labels"), mode=spec["Mode"], update_config=spec.get("UpdateConfig"),
                rollback_config=spec.get("RollbackConfig"), endpoint_spec=spec.get("EndpointSpec"))
        except docker.errors.APIError as e:
            raise refused(e, f"the update of {self.name}") from e

    def _follow(self, final):
        """Watch a rolling update until ``final``; return the count of tasks on the new image over
        time. ``fewest_running`` keeps the fewest tasks seen running meanwhile (what the update
        policy promises to keep up)."""
        target = self.image
        steps = [0]
        fewest = len(self.running())

        def done():
            nonlocal fewest
            running = self.running()
            fewest = min(fewest, len(running))
            new = sum(1 for t in running if t.image == target)
            if new != steps[-1]:
                steps.append(new)
            state = self.update_state
            if state == "paused":
                raise SwarmError(f"the update of {self.name} paused: a new task failed",
                                 fix="look at service.tasks(), then roll back")
            return state == final and self._converged()

        _wait(done, self._swarm.timeout, f"{self.name} update to {target}",
              lambda: "Tasks: " + "; ".join(map(str, self.tasks())))
        self.fewest_running = fewest
        return steps

    def kill(self, *, slot: int) -> Task:
        """SIGKILL the container of the running task in ``slot`` (from the engine, behind Swarm's back)."""
        import docker
        victim = next((t for t in self.running() if t.slot == slot), None)
        if victim is None:
            raise BadInput(f"{self.name} has no running task in slot {slot}")
        with contextlib.suppress(docker.errors.NotFound):
            self._swarm._client.containers.get(victim.container).kill()
        return victim

    def wait_replaced(self, task: Task, timeout: float | None = None) -> Task:
        """Wait until ``task`` has ended and a new task runs in its slot; return the new one."""
        def replacement():
            tasks = self.tasks()
            old = next((t for t in tasks if t.id == task.id), None)
            new = [t for t in tasks
                   if t.slot == task.slot and t.id != task.id and t.desired == t.state == "running"]
            return new[0] if new and (old is None or old.state in _TERMINAL) else None

        return _wait(replacement, timeout or self._swarm.timeout, f"a replacement in slot {task.slot}",
                     lambda: "Tasks: " + "; ".join(map(str, self.tasks())))

    def wait_pending(self, timeout: float | None = None) -> list[Task]:
        """Wait until the scheduler has said why a task cannot be placed; return those tasks."""
        def pending():
            return [t for t in self.tasks() if t.state == "pending" and t.error]
        return _wait(pending, timeout or self._swarm.timeout, f"a pending task of {self.name}")

    def remove(self, timeout: float | None = None) -> None:
        """Remove the service and wait until its containers are gone."""
        _remove(self._swarm._client, self._service, timeout or self._swarm.timeout)

    def __repr__(self) -> str:
        return f"<swarm.Service {self.name}>"


def _remove(client, service, timeout):
    import docker
    with contextlib.suppress(docker.errors.NotFound):
        service.remove()
    label = f"com.docker.swarm.service.id={service.id}"
    _wait(lambda: not client.api.containers(all=True, filters={"label": label}), timeout,
          f"the containers of {service.name} going away")


@owners.lister
def leftovers() -> list[str]:
    """The swarm, if this machine is in one the course made."""
    try:
        client = engine.client(timeout=5)
    except engine.EngineUnavailable:
        return []
    with contextlib.closing(client):
        active = client.info()["Swarm"]["LocalNodeState"] == "active"
        return ["swarm made by the course"] if active and is_ours(client) else []


@owners.sweeper(owners.RUNTIMES + 1)
def sweep(timeout: float = 60.0) -> None:
    """Remove the course's services (waiting for their containers) and leave a swarm it created."""
    _teardown(timeout)


def _teardown(timeout: float = 60.0) -> None:
    # Swarm.leave()'s own way out, which the sweep after a crash shares (a fixture leaving its
    # swarm is no leak, so it does not go through the registered sweep)
    try:
        client = engine.client(timeout=10)
    except engine.EngineUnavailable:
        return
    import docker
    with contextlib.closing(client):
        swarm = client.info()["Swarm"]
        if swarm["LocalNodeState"] != "active" or not swarm["ControlAvailable"]:
            return  # the course only ever makes one-node swarms, managed here
        try:
            try:
                for service in client.services.list(filters={"label": LABEL}):
                    _remove(client, service, timeout)
            finally:
                if is_ours(client):
                    client.swarm.leave(force=True)
        except docker.errors.APIError as e:  # someone else left the swarm meanwhile: done
            if client.info()["Swarm"]["LocalNodeState"] == "active":
                raise SwarmError(f"could not clean up the swarm: {e.explanation}") from e
