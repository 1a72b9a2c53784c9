"""helpers.websites: a controller against the real API server, running pods through the CRI.

One API server (helpers.apiserver) and one course containerd serve the module. The scenario
is the lab's: converge, heal a container deleted behind the controller's back, scale, change
the page (pods replaced), survive a controller restart, and clean up through the finalizer.
"""
import pytest

from helpers import apiserver, cluster, containerd, cri, websites

IMAGE = containerd.BUSYBOX


def test_the_template_changes_with_the_pod_spec_not_with_replicas():
    one = websites._template({"image": "localhost/a:1", "replicas": 1, "page": "x"})
    assert one == websites._template({"image": "localhost/a:1", "replicas": 5, "page": "x"})
    assert one != websites._template({"image": "localhost/a:1", "replicas": 1, "page": "y"})
    assert one != websites._template({"image": "localhost/a:2", "replicas": 1, "page": "x"})


def test_a_website_manifest_is_a_plain_kubernetes_object():
    site = websites.website("web", image=IMAGE, replicas=2, page="hi")
    assert site == {"apiVersion": "cnlab.example/v1", "kind": "Website",
                    "metadata": {"name": "web", "namespace": "default"},
                    "spec": {"image": IMAGE, "replicas": 2, "page": "hi"}}
    assert cluster.load(site) == [site]


@pytest.fixture(scope="module")
def world():
    with apiserver.Server("websites") as server, containerd.Containerd() as daemon, \
            cri.Client(daemon.address) as runtime, server.cluster() as k, server.client() as api:
        k.apply(websites.CRD)
        k.wait_for("CustomResourceDefinition", websites.CRD["metadata"]["name"], "Established", timeout=30)
        yield server, k, runtime, api


WEB = {"api_version": websites.API_VERSION}   # see test_apiserver.py: this server has no core group


def _status(k, name):
    return k.get(websites.KIND, name, **WEB).get("status", {})


@pytest.mark.requires("apiserver", "containerd")
def test_the_controller_converges_heals_scales_and_survives_a_restart(world):
    _, k, runtime, api = world
    k.apply(websites.website("shop", image=IMAGE, replicas=2, page="v1"))
    with websites.Controller(api, runtime, resync=1) as controller:
        websites.wait_converged(api, runtime, "shop", timeout=60)
        status = _status(k, "shop")
        assert status["readyReplicas"] == 2 and cluster.condition({"status": status}, "Ready") == "True"
        assert websites.FINALIZER in k.get(websites.KIND, "shop", **WEB)["metadata"]["finalizers"]
        pods = websites.replicas(runtime, "default/shop")
        assert len(pods) == 2 and all(p.running for p in pods)
        # the page is served, from inside the pod
        web = next(c for c in runtime.containers(pod_id=pods[0].pod.id) if c.name == "web")
        assert runtime.exec_sync(web.id, ["wget", "-qO-", f"http://127.0.0.1:{websites.PORT}/"]).stdout == "v1\n"

        # a container deleted behind its back: its pod is replaced
        runtime.remove_container(web.id)          # a running container: killed, then removed
        websites.wait_converged(api, runtime, "shop", timeout=60)
        assert pods[0].name not in [p.name for p in websites.replicas(runtime, "default/shop")]

        # a new page: every pod is replaced; more replicas: more pods
        k.apply(websites.website("shop", image=IMAGE, replicas=3, page="v2"))
        websites.wait_converged(api, runtime, "shop", timeout=60)
        now = websites.replicas(runtime, "default/shop")
        assert len(now) == 3 and not {p.name for p in pods} & {p.name for p in now}
        assert _status(k, "shop")["observedGeneration"] == k.get(websites.KIND, "shop", **WEB)["metadata"]["generation"]
        assert any(a.verb == "delete" and "older spec" in a.why for a in controller.actions)

    # the controller is gone: change the spec, break a pod, and start a new controller
    k.apply(websites.website("shop", image=IMAGE, replicas=1, page="v2"))
    runtime.stop_pod(now[0].pod.id)
    assert not websites.converged(api, runtime, "shop")
    with websites.Controller(api, runtime, resync=1):
        websites.wait_converged(api, runtime, "shop", timeout=60)
        assert len(websites.replicas(runtime, "default/shop")) == 1
        k.delete(websites.KIND, "shop", timeout=60, **WEB)    # each test leaves nothing behind
    assert websites.replicas(runtime) == []


@pytest.mark.requires("apiserver", "containerd")
def test_an_image_that_is_not_there_is_reported_in_the_status(world):
    _, k, runtime, api = world
    k.apply(websites.website("missing", image="localhost/cnlab/nothing:1", replicas=1))
    with websites.Controller(api, runtime, resync=1):
        found = k.wait(websites.KIND, "missing", cluster.until("status.conditions"), timeout=60, **WEB)
        k.delete(websites.KIND, "missing", timeout=60, **WEB)
    ready = found["status"]["conditions"][0]
    assert ready["status"] == "False" and ready["reason"] == "CreateFailed" and "nothing" in ready["message"]
    assert websites.replicas(runtime, "default/missing") == []  # the failed pod was not left behind


@pytest.mark.requires("apiserver", "containerd")
def test_the_finalizer_holds_the_deletion_until_the_pods_are_gone(world):
    _, k, runtime, api = world
    k.apply(websites.website("doomed", image=IMAGE, replicas=2))
    with websites.Controller(api, runtime, resync=1):
        websites.wait_converged(api, runtime, "doomed", timeout=60)
    k.delete(websites.KIND, "doomed", wait=False, **WEB)
    held = k.get(websites.KIND, "doomed", **WEB)          # no controller: the finalizer holds it
    assert held["metadata"]["deletionTimestamp"] and len(websites.replicas(runtime, "default/doomed")) == 2
    with websites.Controller(api, runtime, resync=1) as controller:
        k.wait_gone(websites.KIND, "doomed", timeout=60, **WEB)
    assert websites.replicas(runtime, "default/doomed") == []
    assert any(a.verb == "finalize" for a in controller.actions)
