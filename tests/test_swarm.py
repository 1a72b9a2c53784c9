"""helpers.swarm: a one-node Docker Swarm, really run; left clean also when a test fails."""
import contextlib

import pytest

from helpers import images, swarm
from helpers.errors import BadInput
from helpers._core.names import LABEL

pytestmark = pytest.mark.requires("swarm")


def _state():
    with contextlib.closing(images.client()) as c:
        return c.info()["Swarm"]["LocalNodeState"]


def _course_containers():
    with contextlib.closing(images.client()) as c:
        return c.api.containers(all=True, filters={"label": [LABEL, "com.docker.swarm.service.id"]})


# These two make and end their own swarms: they run before the shared one below exists.

def test_a_swarm_the_course_did_not_make_is_left_alone():
    with contextlib.closing(images.client()) as c:
        c.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")  # no cnlab label
        try:
            with pytest.raises(swarm.ForeignSwarm, match="did not create"):
                with swarm.Swarm():
                    pass
            swarm.sweep()
            assert _state() == "active"
        finally:
            c.swarm.leave(force=True)
    assert _state() == "inactive"


def test_sweep_removes_services_and_leaves_a_course_swarm():
    sw = swarm.Swarm().init()  # and never left: as if the notebook crashed
    sw.create("stray", replicas=2)
    assert len(_course_containers()) == 2
    swarm.sweep()
    assert _state() == "inactive" and _course_containers() == []
    sw._client.close()


@pytest.fixture(scope="module")
def sw():
    with swarm.Swarm() as s:
        yield s
    assert _state() == "inactive" and _course_containers() == []


@pytest.fixture
def web(sw):
    service = sw.create("web", replicas=3)
    yield service
    service.remove()
    assert not [c for c in _course_containers() if "cnlab-web" in c["Names"][0]]


def test_bad_input_fails_before_anything_is_created(sw):
    with pytest.raises(BadInput):
        sw.create("Web!")
    with pytest.raises(BadInput):
        sw.create("web", replicas=-1)
    assert sw.services() == []


def test_three_replicas_run_each_in_its_slot(web):
    tasks = web.tasks()
    assert sorted(t.slot for t in tasks) == [1, 2, 3]
    assert {(t.desired, t.state, t.image) for t in tasks} == {("running", "running", "cnlab/busybox:latest")}
    with contextlib.closing(images.client()) as c:
        labels = c.containers.get(tasks[0].container).labels
    assert labels[LABEL] == "course" and labels["com.docker.swarm.service.name"] == "cnlab-web"


def test_a_killed_container_is_replaced_in_its_slot(web):
    victim = web.kill(slot=2)
    new = web.wait_replaced(victim, timeout=30)
    assert new.slot == 2 and new.id != victim.id and new.container != victim.container
    old = next(t for t in web.tasks() if t.id == victim.id)
    assert (old.desired, old.state) == ("shutdown", "failed") and "137" in old.error  # SIGKILL
    assert web.summary() == {("running", "running"): 3, ("shutdown", "failed"): 1}


def test_scale_up_and_down(web):
    web.scale(5)
    assert len(web.running()) == 5
    web.scale(2)
    assert len(web.running()) == 2 and web.summary() == {("running", "running"): 2}


def test_rolling_update_one_at_a_time_then_rollback(web):
    v2 = images.busybox("v2")
    steps = web.update(v2)
    assert steps == [0, 1, 2, 3]  # parallelism 1: one task replaced per step
    assert web.image == v2 and {t.image for t in web.running()} == {v2}
    back = web.rollback()
    assert back == [0, 1, 2, 3] and web.image == "cnlab/busybox:latest"
    assert web.update_state == "rollback_completed"
    assert {t.image for t in web.running()} == {"cnlab/busybox:latest"}


def test_an_unmet_constraint_leaves_a_pending_task_until_a_node_fits(sw):
    picky = sw.create("picky", constraints=["node.labels.disk==ssd"])
    try:
        pending = picky.wait_pending(timeout=30)
        assert [(t.desired, t.state) for t in pending] == [("running", "pending")]
        assert "no suitable node" in pending[0].error
        assert picky.running() == []
        sw.label_node(disk="ssd")
        picky.wait_converged(timeout=30)
        assert len(picky.running()) == 1
        assert picky.spec["TaskTemplate"]["Placement"]["Constraints"] == ["node.labels.disk==ssd"]
    finally:
        picky.remove()
