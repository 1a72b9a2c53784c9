"""helpers.etcd_cluster: a real 3-member etcd over network-namespace hosts, losing and regaining quorum."""
import pickle
import sys
import threading

import pytest

import helpers
from helpers import etcd, etcd_cluster, hosts
from helpers._core import names, procfs, wait
from helpers.errors import BadInput, LabTimeout, Unavailable

NAME = "etcdq"          # hosts cnlab-etcdq-1..3


def _ours():
    """What of this test's cluster is alive, as leftovers() lists it."""
    return [item for item in helpers.leftovers() if NAME in item]


# ---------------------------------------------------------------- no etcd needed

@pytest.mark.parametrize("kw", [{"size": 0}, {"size": True}, {"client_port": 2379, "peer_port": 2379},
                                {"client_port": 0}, {"name": "far-too-long-a-name"}])
def test_bad_input_fails_before_anything_is_created(kw):
    with pytest.raises(BadInput):
        etcd_cluster.Cluster(**{"name": NAME, **kw})


def test_quorum_lost_survives_pickling_and_is_an_unavailable_service():
    error = etcd_cluster.QuorumLost("cnlab-x-3 refused", fix="heal it")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is etcd_cluster.QuorumLost and str(back) == str(error)
    assert isinstance(back, etcd.EtcdError) and isinstance(back, Unavailable)
    assert not isinstance(back, LabTimeout)


# ---------------------------------------------------------------- a real cluster

needs = pytest.mark.requires("root", "etcd")


@pytest.fixture
def cluster():
    with etcd_cluster.Cluster(NAME) as c:
        yield c
    assert _ours() == []


@needs
def test_one_leader_is_elected_and_every_member_agrees(cluster):
    views = cluster.statuses()
    assert all(v is not None for v in views)
    assert len({v.leader for v in views}) == 1 and views[0].leader in [m.name for m in cluster.members]
    assert [v.role for v in views].count("leader") == 1
    assert len({v.term for v in views}) == 1
    assert cluster.leader() == views[0].leader
    # the members really are on the hosts' network, one per host
    assert [m.address for m in cluster.members] == [h.address for h in cluster.network.hosts]


@needs
def test_killing_the_leader_elects_another_within_a_bound_and_loses_no_acknowledged_write(cluster):
    old = cluster.leader()
    via = next(m for m in cluster.members if m.name != old)
    stop, failed, count = threading.Event(), [], [0]

    def writer():                        # writes all along, through a member that survives
        while not stop.is_set():
            try:
                cluster.put(f"/load/{count[0]:05d}", "x", via=via)
            except etcd.EtcdError as e:
                failed.append(e)
            count[0] += 1
    thread = threading.Thread(target=writer)
    thread.start()
    acked = lambda: len(cluster.acknowledged)  # noqa: E731
    try:
        wait.until(lambda: acked() >= 20, 15, "20 writes before the crash")
        election = cluster.measure_election()
        after = acked()
        wait.until(lambda: acked() >= after + 20, 30, "20 writes after the election")
    finally:
        stop.set()
        thread.join()
    assert election.old == old and election.new not in (old, None)
    assert 0 < election.seconds < 5, election
    assert election.term_after > election.term_before
    cluster.start(old)                   # it comes back as a follower, and catches up
    assert cluster.member(old).status().leader == election.new
    audit = cluster.audit()
    assert audit.acknowledged >= 40 and audit.lost == []
    assert set(audit.present.values()) == {audit.acknowledged}


@needs
def test_a_partitioned_member_refuses_linearizable_requests_but_serves_a_stale_serializable_read(cluster):
    cluster.put("/k", "before", via=1)
    isolated = cluster.partition(3)
    assert isolated.status().leader is None
    cluster.put("/k", "after", via=1)                     # the majority side still writes
    assert cluster.get("/k", via=2) == "after"
    with pytest.raises(etcd_cluster.QuorumLost, match="cnlab-etcdq-3 refused .*no leader"):
        cluster.put("/k", "lost?", via=3)
    with pytest.raises(etcd_cluster.QuorumLost):
        cluster.get("/k", via=3)
    assert cluster.get("/k", via=3, linearizable=False) == "before"    # stale, but an answer
    cluster.heal(3)
    assert cluster.get("/k", via=3, linearizable=False) == "after"
    assert cluster.get("/k", via=3) == "after"
    audit = cluster.audit()
    assert audit.lost == [] and audit.acknowledged == 2     # both writes, "before" too (as history)


@needs
def test_with_two_members_down_writes_fail_with_quorum_lost_and_come_back_with_nothing_lost(cluster):
    for i in range(5):
        cluster.put(f"/k/{i}", str(i), via=i % 3 + 1)
    cluster.stop(1)
    cluster.kill(2)
    cluster.leaderless(3)
    with pytest.raises(etcd_cluster.QuorumLost) as refused:
        cluster.put("/k/0", "during", via=3)
    assert "quorum (2 of the 3 members" in str(refused.value)
    assert cluster.get("/k/4", via=3, linearizable=False) == "4"
    with pytest.raises(etcd.Unreachable):               # a stopped member: not a quorum question
        cluster.put("/k/9", "x", via=1)
    cluster.start(1, 2)
    audit = cluster.audit()
    assert audit.acknowledged == 5 and audit.lost == [] and audit.present == dict.fromkeys(
        (m.name for m in cluster.members), 5)


@needs
def test_a_name_data_dir_or_port_in_use_is_refused_before_anything_is_created(cluster, tmp_path):
    before = sorted(_ours())
    with pytest.raises(hosts.InUse, match="cnlab-etcdq-1"):
        etcd_cluster.Cluster(NAME)                  # its members run
    assert sorted(_ours()) == before
    with hosts.Network("etcdr", count=3) as net:
        left = names.STATE / "etcd" / net.hosts[1].name
        left.mkdir(parents=True)
        try:
            with pytest.raises(hosts.InUse, match="data of an earlier member"):
                etcd_cluster.Cluster(network=net)
        finally:
            left.rmdir()
        squatter = net.hosts[0].daemon([sys.executable, "-m", "http.server", "--bind",
                                        net.hosts[0].address, "2380"], what="a squatter",
                                       log=tmp_path / "squatter.log")
        squatter.start(lambda: "2380" in net.hosts[0].run(["ss", "-Hltn"]).stdout)
        with pytest.raises(hosts.InUse, match="port 2380 is in use in cnlab-etcdr-1"):
            etcd_cluster.Cluster(network=net)
        assert not any("--name cnlab-etcdr" in line for line in helpers.leftovers())   # none started
        squatter.kill()
        with etcd_cluster.Cluster(network=net) as other:    # freed: it runs on the given hosts
            assert other.leader().startswith("cnlab-etcdr-")
        assert [h.name for h in net.hosts] == [f"cnlab-etcdr-{i}" for i in (1, 2, 3)]
        assert not (names.STATE / "etcd" / "cnlab-etcdr-1").exists()


@needs
def test_close_and_cleanup_remove_everything():
    with etcd_cluster.Cluster(NAME) as c:
        c.partition(2)
        assert any("process" in item for item in _ours())
    assert _ours() == []
    c = etcd_cluster.Cluster(NAME).start()          # as a crashed kernel leaves it
    pids = [m.pid for m in c.members]
    assert f"netns cnlab-{NAME}-1" in _ours()
    helpers.cleanup()
    assert _ours() == [] and not (names.STATE / "etcd").exists()
    assert not any(procfs.alive(pid) for pid in pids if pid)
