"""helpers.controller: the reconcile loop converges from any starting state, and survives restarts."""
import contextlib
import json
import threading
import time

import pytest

from helpers import controller, etcd, images
from helpers.orchestration.controller import OWNER, Replica, diff
from helpers.errors import BadInput, LabTimeout
from helpers._core.names import LABEL

BUSYBOX = "cnlab/busybox:latest"


# ---------------------------------------------------------------- the diff: pure logic

def _r(name, *, image=BUSYBOX, state="running", created=0):
    return Replica(name, "web", image, state, created)


def test_diff_creates_what_is_missing():
    assert diff({"image": BUSYBOX, "replicas": 3}, [_r("a")]) == ([], 2)


def test_diff_deletes_the_newest_extras():
    owned = [_r("c", created=3), _r("a", created=1), _r("b", created=2)]
    delete, create = diff({"image": BUSYBOX, "replicas": 1}, owned)
    assert sorted(r.name for r, _ in delete) == ["b", "c"] and create == 0


def test_diff_replaces_wrong_image_and_stopped_containers():
    owned = [_r("old", image="cnlab/busybox:v2"), _r("dead", state="exited"), _r("good")]
    delete, create = diff({"image": BUSYBOX, "replicas": 2}, owned)
    assert {r.name: why for r, why in delete} == {"old": f"image cnlab/busybox:v2, want {BUSYBOX}",
                                                  "dead": "exited, not running"}
    assert create == 1


def test_diff_collects_the_garbage_of_a_deleted_object():
    delete, create = diff(None, [_r("a"), _r("b")])
    assert [r.name for r, _ in delete] == ["a", "b"] and create == 0


def test_apply_rejects_bad_input_before_writing():
    db = etcd.Client("http://127.0.0.1:9")  # never reached
    for bad in (dict(name="Web!", image=BUSYBOX, replicas=1), dict(name="web", image=BUSYBOX, replicas=-1),
                dict(name="web", image="", replicas=1), dict(name="web", image=BUSYBOX, replicas="3")):
        with pytest.raises(BadInput):
            controller.apply(db, bad.pop("name"), **bad)


# ---------------------------------------------------------------- for real: etcd + Docker

needs_engines = pytest.mark.requires("etcd", "docker")


@pytest.fixture(scope="module")
def server():
    with etcd.Server("controller-test") as s:
        yield s


@pytest.fixture
def db(server):
    client = server.client()
    client.delete("/", prefix=True)
    yield client
    client.delete("/", prefix=True)
    controller.Controller(client).reconcile_once()  # its garbage collection: what the test ran goes
    controller.sweep()  # a safety net: what it still finds fails the test (tests/conftest.py)


@pytest.fixture(scope="module")
def docker_client():
    images.busybox()
    images.busybox("v2")
    with contextlib.closing(images.client()) as c:
        yield c


def _run(client, owner, *, image=BUSYBOX, labels=None):
    """A container made behind the controller's back."""
    labels = labels if labels is not None else {LABEL: "controller", OWNER: owner}
    c = client.containers.create(image, controller.WORKLOAD, labels=labels)
    c.start()
    return c


def _actual(client, owner):
    return sorted((r.state, r.image) for r in controller.replicas(client, owner))


@needs_engines
def test_apply_bumps_generation_only_when_the_spec_changes(db):
    assert controller.apply(db, "web", image=BUSYBOX, replicas=2)["metadata"]["generation"] == 1
    assert controller.apply(db, "web", image=BUSYBOX, replicas=2)["metadata"]["generation"] == 1
    assert controller.apply(db, "web", image=BUSYBOX, replicas=3)["metadata"]["generation"] == 2
    stored = json.loads(db.get(controller.REGISTRY + "web").value)
    assert stored["spec"] == {"image": BUSYBOX, "replicas": 3}


@needs_engines
def test_converges_from_empty_in_one_pass(db, docker_client):
    controller.apply(db, "web", image=BUSYBOX, replicas=3)
    ctl = controller.Controller(db)
    actions = ctl.reconcile_once()
    assert [a.verb for a in actions] == ["create"] * 3
    assert _actual(docker_client, "web") == [("running", BUSYBOX)] * 3
    assert controller.get(db, "web")["status"] == {"observedGeneration": 1, "replicas": 3, "readyReplicas": 3}
    assert ctl.reconcile_once() == []  # level-triggered: a second pass finds nothing to do


@needs_engines
def test_converges_from_too_many(db, docker_client):
    kept = [_run(docker_client, "web").name for _ in range(2)]
    time.sleep(1.1)  # Docker's creation times have whole seconds: the extras are newer
    for _ in range(3):
        _run(docker_client, "web")
    controller.apply(db, "web", image=BUSYBOX, replicas=2)
    actions = controller.Controller(db).reconcile_once()
    assert [a.verb for a in actions] == ["delete"] * 3
    assert sorted(r.name for r in controller.replicas(docker_client, "web")) == sorted(kept)


@needs_engines
def test_leaves_foreign_containers_and_collects_stale_ones(db, docker_client):
    foreign = _run(docker_client, None, labels={LABEL: "not-a-replica"})
    try:
        _run(docker_client, "ghost")  # its replica set was deleted while no controller ran
        controller.apply(db, "web", image=BUSYBOX, replicas=1)
        actions = controller.Controller(db).reconcile_once()
        assert sorted(str(a) for a in actions) == ["create web: 0 running, want 1",
                                                    "delete ghost: its replica set is gone"]
        foreign.reload()
        assert foreign.status == "running"
        assert controller.replicas(docker_client, "ghost") == []
    finally:
        foreign.remove(force=True)


@needs_engines
def test_converges_from_wrong_image_and_dead_containers(db, docker_client):
    _run(docker_client, "web", image="cnlab/busybox:v2")
    dead = _run(docker_client, "web")
    dead.kill()
    _run(docker_client, "web")
    controller.apply(db, "web", image=BUSYBOX, replicas=2)
    ctl = controller.Controller(db)
    assert sorted(a.verb for a in ctl.reconcile_once()) == ["create", "delete", "delete"]
    assert _actual(docker_client, "web") == [("running", BUSYBOX)] * 2
    controller.apply(db, "web", image="cnlab/busybox:v2", replicas=2)  # a new image: all replaced
    ctl.reconcile_once()
    assert _actual(docker_client, "web") == [("running", "cnlab/busybox:v2")] * 2
    assert controller.get(db, "web")["status"]["observedGeneration"] == 2


@needs_engines
def test_a_status_write_never_overwrites_a_newer_spec(db, docker_client):
    controller.apply(db, "web", image=BUSYBOX, replicas=1)
    ctl = controller.Controller(db)
    ctl.reconcile_once()
    stale = db.get(controller.REGISTRY + "web")
    controller.apply(db, "web", image=BUSYBOX, replicas=4)  # lands between the controller's read and write
    obj = json.loads(stale.value)
    ctl._record(docker_client, stale, obj, obj["spec"], obj["metadata"]["generation"])
    assert controller.get(db, "web")["spec"]["replicas"] == 4  # the CAS lost, the spec won


@needs_engines
def test_the_loop_heals_scales_and_catches_up_after_a_restart(db, docker_client):
    threads = threading.active_count()
    controller.apply(db, "web", image=BUSYBOX, replicas=3)
    with controller.Controller(db, resync=5) as ctl:
        controller.wait_converged(db, "web", timeout=20)
        victim = controller.replicas(docker_client, "web")[0]
        began = time.monotonic()
        docker_client.api.remove_container(victim.name, force=True)  # behind its back
        controller.wait_converged(db, "web", timeout=20)
        assert time.monotonic() - began < 4  # woken by Docker's event, not by the 5 s resync
        assert victim.name not in [r.name for r in controller.replicas(docker_client, "web")]
        controller.apply(db, "web", image=BUSYBOX, replicas=5)
        began = time.monotonic()
        assert controller.wait_converged(db, "web", timeout=20)["status"]["readyReplicas"] == 5
        assert time.monotonic() - began < 4  # woken by etcd's watch
    assert not ctl.running and ctl.last_error is None
    controller.apply(db, "web", image="cnlab/busybox:v2", replicas=2)  # while no controller runs
    docker_client.api.remove_container(controller.replicas(docker_client, "web")[0].name, force=True)
    with pytest.raises(LabTimeout):
        controller.wait_converged(db, "web", timeout=1)
    with controller.Controller(db):  # a new process would do the same: no state is in memory
        obj = controller.wait_converged(db, "web", timeout=20)
    assert obj["status"] == {"observedGeneration": 3, "replicas": 2, "readyReplicas": 2}
    assert _actual(docker_client, "web") == [("running", "cnlab/busybox:v2")] * 2
    controller.delete(db, "web")
    controller.Controller(db).reconcile_once()
    assert controller.replicas(docker_client, "web") == []
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() == threads  # the loop and its watches are gone


@needs_engines
def test_the_loop_rides_out_an_etcd_restart(docker_client):
    with etcd.Server("controller-restart") as server:  # its own: this test restarts it
        db = server.client()
        controller.apply(db, "web", image=BUSYBOX, replicas=1)
        try:
            with controller.Controller(db, resync=30) as ctl:
                controller.wait_converged(db, "web", timeout=20)
                server.kill()
                deadline = time.monotonic() + 10
                while ctl.last_error is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert isinstance(ctl.last_error, etcd.Unreachable)  # it noticed, and keeps trying
                server.start()
                time.sleep(2)  # the loop finds etcd again and re-opens its watch
                controller.apply(db, "web", image=BUSYBOX, replicas=2)
                controller.wait_converged(db, "web", timeout=10)  # well before the 30 s resync
                assert ctl.last_error is None
        finally:
            controller.sweep()
