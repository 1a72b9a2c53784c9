"""helpers.operator: the Echo status decided from a Deployment's rollout, and the controller
converging on the real API server (helpers.apiserver) while every watch it opens fails."""
import time

import pytest

from helpers import apiserver, cluster, operator


def echo(replicas=3, generation=4):
    return {"apiVersion": cluster.ECHO_API, "kind": "Echo",
            "metadata": {"name": "hello", "namespace": "lab", "uid": "echo-uid", "generation": generation},
            "spec": {"message": "hello", "replicas": replicas}}


def deployment(*, generation=2, observed=2, replicas=3, total=3, updated=3, ready=3, available=3):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "echo-hello", "namespace": "lab", "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": available}}


def ready(status):
    return status["readyReplicas"], status["conditions"][0]["status"], status["conditions"][0]["reason"]


def test_an_echo_is_ready_once_its_deployment_rolled_out():
    st = operator.echo_status(echo(), deployment())
    assert st["observedGeneration"] == 4 and st["replicas"] == 3  # the Echo's own generation and size
    assert ready(st) == (3, "True", "AllReplicasReady")


@pytest.mark.parametrize("dep, counted", [
    # a new message mid-rollout: 3 old Pods still ready, 1 new one being made. readyReplicas says 3.
    (deployment(total=4, updated=1, ready=3, available=3), 0),
    # two new Pods available, one old one still terminating: only the new ones count
    (deployment(total=4, updated=3, ready=3, available=3), 2),
    # the Deployment controller has not seen the new spec yet: its counts are of the old one
    (deployment(generation=3, observed=2), 0),
    # scaled by hand to 5: all of the current template, but not the Echo's 3
    (deployment(replicas=5, total=5, updated=5, ready=5, available=5), 5),
    # new Pods running but not yet available (minReadySeconds, a readiness probe)
    (deployment(ready=3, available=1), 1),
])
def test_an_echo_is_not_ready_mid_rollout_whatever_readyreplicas_says(dep, counted):
    assert ready(operator.echo_status(echo(), dep)) == (counted, "False", "WaitingForReplicas")


def test_an_echo_without_a_deployment_or_a_status_yet():
    assert ready(operator.echo_status(echo(), None)) == (0, "False", "WaitingForReplicas")
    fresh = deployment()
    del fresh["status"]
    assert ready(operator.echo_status(echo(), fresh)) == (0, "False", "WaitingForReplicas")
    assert ready(operator.echo_status(echo(replicas=0), deployment(replicas=0, total=0, updated=0, ready=0,
                                                                   available=0))) == (0, "True", "AllReplicasReady")


# ---------------------------------------------------------------- the real API server, its watches broken

@pytest.fixture(scope="module")
def api():
    with apiserver.Server("operator") as server, server.cluster() as k:
        k.apply("44-controller/crd.yaml")
        k.wait_for("CustomResourceDefinition", "echoes.cnlab.example", "Established", timeout=30)
        yield k


def observe(c, name):
    """A reconcile function: the Echo's status records the generation it saw, as a controller's would."""
    obj = c.find("Echo", name)
    if obj is None or (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]:
        return None
    c.patch("Echo", name, {"status": {"observedGeneration": obj["metadata"]["generation"]}}, subresource="status")
    return f"{name}: generation {obj['metadata']['generation']}"


@pytest.mark.requires("apiserver")
def test_the_operator_converges_by_relisting_while_every_watch_fails(api, monkeypatch):
    """etcd 3.4 under kube-apiserver 1.36: every watch of a quiet resource answered 504, and an
    operator that only watched never reconciled. The relist every ``resync`` seconds still does."""
    opened = []

    def broken(self, kind, **kw):
        opened.append(time.monotonic())
        raise cluster.ServerError(cluster.what(kind, None, self.namespace), 504, "Timeout",
                                  "Too large resource version: 1043, current: 1002")
        yield  # a generator, as the real watch is: it fails when read

    monkeypatch.setattr(cluster.Cluster, "watch", broken)
    hello = cluster.load("44-controller/hello.yaml")[0]
    api.apply(hello)
    try:
        with operator.Controller(api, observe, [("Echo", cluster.ECHO_API, None, lambda o: o["metadata"]["name"])],
                                 resync=1) as ctl:
            api.wait("Echo", "hello", cluster.until("status.observedGeneration", 1), timeout=20)
            hello["spec"]["message"] = "changed while no watch works"
            api.apply(hello)  # generation 2: only a relist can see it
            api.wait("Echo", "hello", cluster.until("status.observedGeneration", 2), timeout=20)
            time.sleep(3)  # the watch goes on failing, and being retried, with a growing pause
        assert not ctl.running
    finally:
        api.delete("Echo", "hello")
    log = list(ctl.log)
    assert "hello: generation 1" in log and "hello: generation 2" in log
    assert any("watch Echo: " in line and "504 Timeout: Too large resource version" in line for line in log)
    pauses = [b - a for a, b in zip(opened, opened[1:])]
    assert len(opened) >= 3 and pauses[-1] > 2 * pauses[0], f"the watch was opened at {opened}"
