"""helpers.swarm_cluster: real Swarms, one dockerd per network-namespace host.

Each test makes its own cluster (a few seconds) and gives it back: a cluster kept across tests
would start containers, shims and dockerd's helper processes in one test that the leak check
of that test rightly counts as its own.
"""
import pytest

import helpers
from helpers import errors, swarm_cluster
from helpers._core import procfs
from helpers.errors import BadInput

BOUND = 30.0      # seconds: a stopped node's tasks run elsewhere within this (1 s heartbeats)


@pytest.mark.parametrize("kw, word", [({"managers": 0}, "managers"), ({"workers": -1}, "workers"),
                                      ({"managers": 3, "workers": 3}, "at most"),
                                      ({"heartbeat": 0}, "heartbeat"), ({"name": "No_Good"}, "name"),
                                      ({"name": "much-too-long"}, "name")])
def test_bad_input_is_refused_before_anything_is_made(kw, word):
    with pytest.raises(BadInput, match=word):
        swarm_cluster.Cluster(**kw)


@pytest.fixture
def cluster():
    with swarm_cluster.Cluster("swt", managers=3) as made:
        yield made


@pytest.fixture
def web(cluster):
    return cluster.create("web", replicas=3)


@pytest.mark.requires("root", "docker")
def test_the_nodes_join_by_name_and_the_tasks_spread_over_them(cluster, web):
    assert [(r["name"], r["role"], r["state"], r["manager"]) for r in cluster.status()] == [
        (f"cnlab-swt-{i}", "manager", "ready", "reachable") for i in (1, 2, 3)]
    assert cluster.spread(web) == {"cnlab-swt-1": 1, "cnlab-swt-2": 1, "cnlab-swt-3": 1}
    assert {t.node for t in cluster.tasks(web)} == {"cnlab-swt-1", "cnlab-swt-2", "cnlab-swt-3"}
    # each engine is its own: its own containers, in its own network namespace
    for node in cluster.nodes:
        assert len(node.client.containers.list()) == 1
        assert node.host.run(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.count(node.address) == 1


@pytest.mark.requires("root", "docker")
def test_a_stopped_engine_s_tasks_are_rescheduled_within_a_bound(cluster, web):
    with pytest.raises(BadInput, match="talks to Swarm through"):
        cluster.stop_engine("cnlab-swt-1")
    with pytest.raises(BadInput, match="not stopped"):
        cluster.wait_moved(web, "cnlab-swt-3")
    cluster.stop_engine("cnlab-swt-3")
    failover = cluster.wait_moved(web, "cnlab-swt-3", timeout=BOUND)
    assert 0 <= failover.down <= failover.moved <= BOUND
    assert cluster.spread(web) in ({"cnlab-swt-1": 2, "cnlab-swt-2": 1, "cnlab-swt-3": 0},
                                   {"cnlab-swt-1": 1, "cnlab-swt-2": 2, "cnlab-swt-3": 0})
    assert [r["state"] for r in cluster.status()] == ["ready", "ready", "down"]
    cluster.start_engine("cnlab-swt-3")
    assert [r["state"] for r in cluster.status()] == ["ready", "ready", "ready"]
    assert sum(cluster.spread(web).values()) == 3      # nothing moves back by itself


@pytest.mark.requires("root", "docker")
def test_a_drained_node_gives_its_tasks_to_the_others():
    with swarm_cluster.Cluster("swd", managers=1, workers=2) as cluster:
        assert [(r["name"], r["role"]) for r in cluster.status()] == [
            ("cnlab-swd-1", "manager"), ("cnlab-swd-2", "worker"), ("cnlab-swd-3", "worker")]
        web = cluster.create("web", replicas=6)
        assert cluster.spread(web) == {"cnlab-swd-1": 2, "cnlab-swd-2": 2, "cnlab-swd-3": 2}
        cluster.drain("cnlab-swd-2", timeout=BOUND)
        assert cluster.spread(web) == {"cnlab-swd-1": 3, "cnlab-swd-2": 0, "cnlab-swd-3": 3}
        assert [r["availability"] for r in cluster.status()] == ["active", "drain", "active"]
        cluster.activate("cnlab-swd-2")
        web.scale(8)                                   # new tasks go to the emptiest node
        assert cluster.spread(web) == {"cnlab-swd-1": 3, "cnlab-swd-2": 2, "cnlab-swd-3": 3}


@pytest.mark.requires("root", "docker")
def test_two_managers_of_three_still_act_and_one_cannot(cluster, web):
    cluster.stop_engine("cnlab-swt-3")
    try:
        assert cluster.can_act()
        web.scale(2, wait=False)                       # 2 of 3 managers: a majority
        cluster.wait_running(web, timeout=BOUND)
        cluster.stop_engine("cnlab-swt-2")
        cluster.wait_quorum(False, timeout=2 * BOUND)  # the leader steps down without a majority
        with pytest.raises(swarm_cluster.QuorumLost, match="no leader") as lost:
            web.scale(3, wait=False)
        assert isinstance(lost.value, errors.QuorumLost) and not isinstance(lost.value, errors.LabTimeout)
        with pytest.raises(swarm_cluster.QuorumLost):
            cluster.status()
    finally:
        for name in ("cnlab-swt-2", "cnlab-swt-3"):
            if not cluster.get(name).running:
                cluster.start_engine(name)
    cluster.wait_quorum(True, timeout=2 * BOUND)
    web.scale(3)
    assert [r["state"] for r in cluster.status()] == ["ready"] * 3
    assert sum(cluster.spread(web).values()) == 3
    assert cluster.leader is not None


@pytest.mark.requires("root", "docker")
def test_a_name_or_subnet_in_use_is_refused_before_anything_is_made(cluster):
    def made():     # the running cluster's engines start helpers and write files: not counted
        return {item for item in helpers.leftovers()
                if not item.startswith("process") and "/swarm/cnlab-swt/" not in item}
    before = made()
    for kw in ({"name": "swt"}, {"name": "swu", "subnet": str(cluster.network.subnet)}):
        with pytest.raises(swarm_cluster.InUse, match="exists already|overlaps"):
            swarm_cluster.Cluster(managers=1, **kw).init()
    assert made() == before
    assert not any("swu" in p.line for p in procfs.processes())


def _ours_swc() -> list[str]:
    return [item for item in helpers.leftovers() if "swc" in item or "/swarm" in item]


@pytest.mark.requires("root", "docker")
def test_the_with_block_and_cleanup_leave_nothing():
    with swarm_cluster.Cluster("swc", managers=1, workers=1) as small:
        web = small.create("web", replicas=2)
        assert sum(small.spread(web).values()) == 2
    assert not _ours_swc()
    crashed = swarm_cluster.Cluster("swc", managers=1, workers=1).init()   # and never left
    crashed.create("web", replicas=2)
    removed = helpers.cleanup()
    assert any("swarm cluster cnlab-swc" in item for item in removed)
    assert not _ours_swc()
    assert not any("swc" in p.line for p in procfs.processes())
