"""helpers.cluster: decisions on real API objects (the client's models), error mapping from real
Status bodies, the client code paths against a small fake API server, and (marked) a real cluster."""
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from helpers import cluster, operator
from helpers.errors import BadInput, LabTimeout

META = k.V1ObjectMeta


# ------------------------------------------------------------------------------ objects

def deployment(*, generation=2, observed=2, replicas=3, updated=3, total=3, available=3, conditions=(),
               revision="2", uid="dep-uid"):
    return k.V1Deployment(
        api_version="apps/v1", kind="Deployment",
        metadata=META(name="web", namespace="lab", generation=generation, uid=uid,
                      annotations={"deployment.kubernetes.io/revision": revision}),
        spec=k.V1DeploymentSpec(replicas=replicas, selector=k.V1LabelSelector(match_labels={"app": "web"}),
                                template=k.V1PodTemplateSpec(metadata=META(labels={"app": "web"}), spec=k.V1PodSpec(
                                    containers=[k.V1Container(name="web", image="cnlab/busybox:v2")]))),
        status=k.V1DeploymentStatus(observed_generation=observed, replicas=total, updated_replicas=updated,
                                    available_replicas=available, conditions=list(conditions)))


def test_plain_turns_models_into_the_api_json():
    d = cluster.plain(deployment())
    assert d["apiVersion"] == "apps/v1" and d["status"]["updatedReplicas"] == 3
    assert cluster.plain(d) is d and cluster.plain(None) is None
    with pytest.raises(BadInput):
        cluster.plain(42)


@pytest.mark.parametrize("kw, pending", [
    ({}, None),
    ({"observed": 1}, "the controller has not seen the latest spec yet"),
    ({"updated": 1, "total": 4, "available": 1}, "1 of 3 new replicas updated"),
    ({"total": 4}, "1 old replicas pending termination"),
    ({"available": 2}, "2 of 3 updated replicas available"),
])
def test_deployment_rollout_decided_like_kubectl(kw, pending):
    assert cluster.rollout_pending(deployment(**kw)) == pending


def test_a_deployment_past_its_deadline_failed():
    stuck = k.V1DeploymentCondition(type="Progressing", status="False", reason="ProgressDeadlineExceeded",
                                    message='ReplicaSet "web-5d8f" has timed out progressing.')
    with pytest.raises(cluster.RolloutFailed, match="web-5d8f\" has timed out"):
        cluster.rollout_pending(deployment(updated=1, conditions=[stuck]))


def test_statefulset_and_daemonset_rollouts():
    sts = k.V1StatefulSet(api_version="apps/v1", kind="StatefulSet", metadata=META(name="db", generation=1),
                          spec=k.V1StatefulSetSpec(replicas=3, selector=k.V1LabelSelector(), service_name="db",
                                                   template=k.V1PodTemplateSpec()),
                          status=k.V1StatefulSetStatus(observed_generation=1, replicas=3, ready_replicas=2,
                                                       current_revision="db-1", update_revision="db-1"))
    assert cluster.rollout_pending(sts) == "2 of 3 pods ready"
    sts.status.ready_replicas, sts.status.update_revision, sts.status.updated_replicas = 3, "db-2", 1
    assert cluster.rollout_pending(sts) == "1 of 3 pods at revision db-2"
    sts.status.current_revision = "db-2"
    assert cluster.rollout_pending(sts) is None
    ds = k.V1DaemonSet(api_version="apps/v1", kind="DaemonSet", metadata=META(name="agent", generation=1),
                       status=k.V1DaemonSetStatus(observed_generation=1, desired_number_scheduled=2,
                                                  current_number_scheduled=2, number_misscheduled=0,
                                                  number_ready=1, updated_number_scheduled=2, number_available=1))
    assert cluster.rollout_pending(ds) == "1 of 2 updated pods available"
    ds.status.number_available = 2
    assert cluster.rollout_pending(ds) is None
    with pytest.raises(BadInput):
        cluster.rollout_pending(k.V1Pod(kind="Pod", metadata=META(name="p")))


def node(name, ready):
    return k.V1Node(metadata=META(name=name), status=k.V1NodeStatus(conditions=[
        k.V1NodeCondition(type="MemoryPressure", status="False"), k.V1NodeCondition(type="Ready", status=ready)]))


def pod(name, phase, *, ready=True, waiting=None):
    state = k.V1ContainerState(waiting=k.V1ContainerStateWaiting(reason=waiting)) if waiting else \
        k.V1ContainerState(running=k.V1ContainerStateRunning())
    return k.V1Pod(metadata=META(name=name, namespace="kube-system"), status=k.V1PodStatus(
        phase=phase, container_statuses=[k.V1ContainerStatus(name="c", image="i", image_id="", ready=ready,
                                                              restart_count=0, state=state)]))


def test_cluster_readiness_from_nodes_and_kube_system_pods():
    good = [pod("etcd-cp", "Running"), pod("coredns-1", "Running"), pod("job-1", "Succeeded", ready=False)]
    assert cluster.readiness([node("cp", "True"), node("w1", "True")], good, expected_nodes=2) == []
    found = cluster.readiness([node("cp", "True"), node("w1", "False")],
                              [pod("coredns-1", "Pending", ready=False, waiting="ContainerCreating"),
                               pod("kindnet-x", "Running", ready=False, waiting="CrashLoopBackOff")],
                              expected_nodes=3)
    assert found == ["2 of 3 nodes registered", "node w1 Ready=False",
                     "pod kube-system/coredns-1 Pending (ContainerCreating)",
                     "pod kube-system/kindnet-x running, not ready (CrashLoopBackOff)"]
    assert cluster.readiness([node("cp", "True")], []) == []  # a control plane of host processes has none
    assert cluster.readiness([node("cp", "True")], [], system_pods=True) == ["no kube-system pods yet"]


def test_condition_reads_status_conditions():
    job = k.V1Job(metadata=META(name="answer"), status=k.V1JobStatus(conditions=[
        k.V1JobCondition(type="SuccessCriteriaMet", status="True"), k.V1JobCondition(type="Complete", status="True")]))
    assert cluster.condition(job, "Complete") == "True"
    assert cluster.condition(job, "Failed") is None
    assert cluster.condition(node("n", "Unknown"), "Ready") == "Unknown"


def replica_set(revision, image, uid="dep-uid"):
    return k.V1ReplicaSet(metadata=META(name=f"web-{revision}", annotations={"deployment.kubernetes.io/revision": str(revision)},
                                        owner_references=[k.V1OwnerReference(api_version="apps/v1", kind="Deployment",
                                                                             name="web", uid=uid)]),
                          spec=k.V1ReplicaSetSpec(selector=k.V1LabelSelector(), template=k.V1PodTemplateSpec(
                              metadata=META(labels={"app": "web", "pod-template-hash": f"h{revision}"}),
                              spec=k.V1PodSpec(containers=[k.V1Container(name="web", image=image)]))))


def test_rollback_finds_the_previous_revision_of_this_deployment():
    sets = [replica_set(1, "cnlab/busybox:v1"), replica_set(3, "cnlab/busybox:bad"),
            replica_set(2, "cnlab/busybox:v2"), replica_set(5, "other", uid="someone-else")]
    revision, template = cluster.previous_template(deployment(revision="3"), sets)
    assert revision == 2
    assert template["spec"]["containers"][0]["image"] == "cnlab/busybox:v2"
    assert template["metadata"]["labels"] == {"app": "web"}  # the controller adds its own hash
    with pytest.raises(BadInput, match="no earlier revision"):
        cluster.previous_template(deployment(revision="1"), sets)


def test_field_owners_flattens_managed_fields():
    obj = k.V1Deployment(metadata=META(name="web", managed_fields=[
        k.V1ManagedFieldsEntry(manager="cnlab", operation="Apply", api_version="apps/v1", fields_type="FieldsV1",
                               fields_v1={"f:spec": {"f:template": {"f:spec": {"f:containers": {
                                   'k:{"name":"web"}': {".": {}, "f:image": {}, "f:name": {}}}}}}}),
        k.V1ManagedFieldsEntry(manager="ops-team", operation="Update", subresource="scale", api_version="apps/v1",
                               fields_type="FieldsV1", fields_v1={"f:spec": {"f:replicas": {}}})]))
    assert cluster.field_owners(obj) == {
        ".spec.replicas": ["ops-team (Update, scale)"],
        ".spec.template.spec.containers[name=web].image": ["cnlab (Apply)"],
        ".spec.template.spec.containers[name=web].name": ["cnlab (Apply)"]}


def test_load_reads_manifests_yaml_dicts_and_models(tmp_path):
    objs = cluster.load("43-workloads/statefulset.yaml")
    assert [o["kind"] for o in objs] == ["Service", "StatefulSet"]
    assert cluster.load("kind: ConfigMap\napiVersion: v1\nmetadata: {name: a}\n---\n")[0]["metadata"]["name"] == "a"
    assert cluster.load([deployment(), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}])[1]["kind"] \
        == "Namespace"
    with pytest.raises(BadInput, match="no manifest"):
        cluster.load("43-workloads/missing.yaml")
    with pytest.raises(BadInput, match="metadata.name"):
        cluster.load("apiVersion: v1\nkind: ConfigMap\n")


# ------------------------------------------------------------------------------ error mapping

def refusal(status, body):
    e = ApiException(status=status, reason={401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                                            409: "Conflict", 422: "Unprocessable Entity"}.get(status, "Error"))
    e.body = body if isinstance(body, (str, bytes)) else json.dumps(cluster.plain(body))
    return e


def status(code, reason, message, causes=(), **details):
    return k.V1Status(api_version="v1", kind="Status", status="Failure", code=code, reason=reason, message=message,
                      details=k.V1StatusDetails(causes=[k.V1StatusCause(reason=r, field=f, message=m)
                                                        for r, f, m in causes], **details))


def test_404_names_the_object():
    err = cluster.api_error(refusal(404, status(404, "NotFound", 'deployments.apps "web" not found')),
                            "Deployment", "web", "lab")
    assert isinstance(err, cluster.NotFound) and isinstance(err, cluster.LabError)
    assert str(err).startswith('Deployment lab/web: 404 NotFound: deployments.apps "web" not found: check the name')


def test_409_already_exists_and_ssa_conflicts_say_who_owns_what():
    exists = cluster.api_error(refusal(409, status(409, "AlreadyExists", 'namespaces "lab" already exists')),
                               "Namespace", "lab")
    assert type(exists) is cluster.AlreadyExists and "apply it" in exists.fix
    message = 'Apply failed with 1 conflict: conflict with "ops-team" with subresource "scale" using apps/v1: .spec.replicas'
    err = cluster.api_error(refusal(409, status(409, "Conflict", message, [
        ("FieldManagerConflict", ".spec.replicas", 'conflict with "ops-team" with subresource "scale" using apps/v1')],
        name="web", group="apps", kind="deployments")), "Deployment", "web", "lab")
    assert type(err) is cluster.Conflict
    assert err.conflicts == [("ops-team", ".spec.replicas")]
    assert "another field manager owns .spec.replicas (ops-team)" in str(err) and "force=True" in str(err)
    stale = cluster.api_error(refusal(409, status(409, "Conflict", "the object has been modified")), "ConfigMap", "a")
    assert stale.conflicts == [] and "read it again" in stale.fix


def test_422_keeps_each_invalid_field():
    err = cluster.api_error(refusal(422, status(
        422, "Invalid", 'Deployment.apps "web" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0',
        [("FieldValueInvalid", "spec.replicas", "Invalid value: -1: must be greater than or equal to 0")])),
        "Deployment", "web", "lab")
    assert type(err) is cluster.Invalid
    assert err.causes == [("FieldValueInvalid", "spec.replicas", "Invalid value: -1: must be greater than or equal to 0")]
    assert "spec.replicas: Invalid value: -1" in str(err)


def test_403_401_and_500_are_told_apart():
    forbidden = cluster.api_error(refusal(403, status(
        403, "Forbidden", 'deployments.apps "web" is forbidden: User "viewer" cannot patch resource "deployments"')),
        "Deployment", "web", "lab")
    assert type(forbidden) is cluster.Forbidden and 'User "viewer" cannot patch' in str(forbidden)
    assert "RBAC" in forbidden.fix
    unauthorized = cluster.api_error(refusal(401, b"Unauthorized\n"), "Pod")  # a proxy's bare reply
    assert type(unauthorized) is cluster.Unauthorized and str(unauthorized).startswith("Pods: 401 Unauthorized")
    broken = cluster.api_error(refusal(500, status(500, "InternalError", "Internal error occurred: etcdserver: timeout")),
                               "ConfigMap", "a", "lab")
    assert type(broken) is cluster.ServerError and "etcdserver: timeout" in str(broken)


# ------------------------------------------------------------------------------ a fake API server

DISCOVERY = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.1"},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}, {
        "name": "storage.k8s.io", "versions": [{"groupVersion": "storage.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "storage.k8s.io/v1", "version": "v1"}}]},
    "/apis/storage.k8s.io/v1": {"kind": "APIResourceList", "groupVersion": "storage.k8s.io/v1", "resources": [
        {"name": "storageclasses", "singularName": "storageclass", "namespaced": False, "kind": "StorageClass",
         "verbs": ["get", "list"]}]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "configmaps", "singularName": "configmap", "namespaced": True, "kind": "ConfigMap", "verbs": ["get"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace", "verbs": ["get"]},
        {"name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node", "verbs": ["get", "patch"]},
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["get", "list"]},
        {"name": "services", "singularName": "service", "namespaced": True, "kind": "Service", "verbs": ["get"]},
        {"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy", "version": "v1",
         "kind": "Eviction", "verbs": ["create"]}]},
    "/apis/apps/v1": {"kind": "APIResourceList", "groupVersion": "apps/v1", "resources": [
        {"name": "deployments", "singularName": "deployment", "namespaced": True, "kind": "Deployment", "verbs": ["get"]},
        {"name": "deployments/scale", "singularName": "", "namespaced": True, "group": "autoscaling", "version": "v1",
         "kind": "Scale", "verbs": ["get", "patch"]}]},
}


class FakeApi(ThreadingHTTPServer):
    """Serves discovery, keeps objects by path, and answers from a script where a test set one."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.objects, self.script, self.requests, self.watch_events = {}, {}, [], []

    def answer(self, method, path, *replies):
        self.script[(method, path)] = list(replies)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        srv = self.server
        srv.requests.append((method, url.path, query, self.headers.get("Content-Type"), body))
        if srv.script.get((method, url.path)):
            code, reply = srv.script[(method, url.path)].pop(0)
            return self._send(code, cluster.plain(reply))
        if url.path in DISCOVERY:
            return self._send(200, DISCOVERY[url.path])
        if method == "POST" and url.path.endswith("/eviction"):
            srv.objects.pop(url.path.removesuffix("/eviction"), None)
            return self._send(201, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if method == "GET" and query.get("watch") in ("True", "true", "1"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for event in srv.watch_events:
                self.wfile.write(json.dumps(event).encode() + b"\n")
            time.sleep(0.2)
            return  # HTTP/1.0: closing the connection ends the stream, as the server's timeout would
        if method == "PATCH" and self.headers.get("Content-Type") == "application/apply-patch+yaml":
            srv.objects[url.path] = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
            return self._send(200, srv.objects[url.path])
        if method == "PATCH" and url.path in srv.objects:  # a merge patch changes only what is there
            srv.objects[url.path] = merge(srv.objects[url.path], body)
            return self._send(200, srv.objects[url.path])
        if method == "GET" and url.path.rsplit("/", 1)[-1] in COLLECTIONS:
            items = [o for path, o in srv.objects.items() if path.rsplit("/", 1)[0] == url.path]
            wanted = query.get("fieldSelector", "")
            if wanted.startswith("spec.nodeName="):
                items = [o for o in items if o.get("spec", {}).get("nodeName") == wanted.split("=", 1)[1]]
            return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
        if method == "DELETE" and url.path in srv.objects:
            del srv.objects[url.path]
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if method == "GET" and url.path in srv.objects:
            return self._send(200, srv.objects[url.path])
        name = url.path.rsplit("/", 1)[-1]
        self._send(404, cluster.plain(status(404, "NotFound", f'"{name}" not found')))

    def do_GET(self):
        self._handle("GET")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_POST(self):
        self._handle("POST")


COLLECTIONS = {"pods", "nodes", "configmaps", "storageclasses"}


def merge(obj, patch):
    """RFC 7386 merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return patch
    out = dict(obj) if isinstance(obj, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")  # never the machine's own
    server = FakeApi()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
              "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
              "users": [{"name": "fake", "user": {"token": "t"}}],
              "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    c = cluster.connect(kubeconfig=str(tmp_path / "kubeconfig"), namespace="lab")
    yield server, c
    c.close()
    server.shutdown()
    server.server_close()


CM = "/api/v1/namespaces/lab/configmaps/site"
WEB = "/apis/apps/v1/namespaces/lab/deployments/web"


def test_apply_is_a_server_side_apply_patch(fake):
    server, c = fake
    [out] = c.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: site}\ndata: {a: b}\n")
    method, path, query, content_type, body = server.requests[-1]
    assert (method, path, content_type) == ("PATCH", CM, "application/apply-patch+yaml")
    assert query == {"fieldManager": "cnlab"} and body["metadata"]["namespace"] == "lab"
    assert out["data"] == {"a": "b"}
    c.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "site"}}, force=True, dry_run=True,
            field_manager="ops-team")
    assert server.requests[-1][2] == {"fieldManager": "ops-team", "force": "True", "dryRun": "All"}


def test_a_refused_apply_is_a_typed_error_naming_the_object(fake):
    server, c = fake
    message = 'Apply failed with 1 conflict: conflict with "ops-team" using apps/v1: .spec.replicas'
    server.answer("PATCH", WEB, (409, status(409, "Conflict", message, [
        ("FieldManagerConflict", ".spec.replicas", 'conflict with "ops-team" using apps/v1')])))
    with pytest.raises(cluster.Conflict, match=r"Deployment lab/web: 409 Conflict") as e:
        c.apply(cluster.plain(deployment()))
    assert e.value.conflicts == [("ops-team", ".spec.replicas")]
    assert isinstance(e.value.__cause__, ApiException)


def test_get_find_and_unknown_kinds(fake):
    server, c = fake
    with pytest.raises(cluster.NotFound, match="ConfigMap lab/site: 404"):
        c.get("ConfigMap", "site")
    assert c.find("ConfigMap", "site") is None
    with pytest.raises(cluster.UnknownKind, match="serves no kind 'Echo'"):
        c.get("Echo", "hello")


def test_scale_patches_the_scale_subresource(fake):
    server, c = fake
    server.answer("PATCH", WEB + "/scale", (200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                                  "metadata": {"name": "web"}, "spec": {"replicas": 5}}))
    c.scale("Deployment", "web", 5, field_manager="ops-team")
    method, path, query, content_type, body = server.requests[-1]
    assert (path, content_type, body) == (WEB + "/scale", "application/merge-patch+json", {"spec": {"replicas": 5}})
    assert query == {"fieldManager": "ops-team"}


def test_delete_waits_until_gone_and_is_false_when_nothing_was_there(fake):
    server, c = fake
    c.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "site"}})
    assert c.delete("ConfigMap", "site") is True
    assert c.find("ConfigMap", "site") is None
    assert c.delete("ConfigMap", "site") is False


def test_wait_rollout_polls_until_done_and_times_out_with_what_is_missing(fake):
    server, c = fake
    server.answer("GET", WEB, (200, deployment(updated=1, total=4, available=1)), (200, deployment(total=4)),
                  (200, deployment()))
    assert c.wait_rollout("Deployment", "web", timeout=10)["status"]["availableReplicas"] == 3
    server.answer("GET", WEB, *[(200, deployment(available=2))] * 10)
    with pytest.raises(LabTimeout, match="Deployment lab/web: waiting for the rollout for 1 s, still 2 of 3 updated"):
        c.wait_rollout("Deployment", "web", timeout=1)


def test_watch_yields_events_and_ends_when_the_server_ends_it(fake):
    server, c = fake
    cm = lambda rv: {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "site", "resourceVersion": rv}}
    server.watch_events = [{"type": "ADDED", "object": cm("1")}, {"type": "MODIFIED", "object": cm("2")},
                           {"type": "DELETED", "object": cm("3")}]
    start = time.monotonic()
    events = list(c.watch("ConfigMap", timeout=5))
    assert [str(e) for e in events] == ["ADDED    ConfigMap site", "MODIFIED ConfigMap site", "DELETED  ConfigMap site"]
    assert time.monotonic() - start < 5
    assert server.requests[-1][2]["timeoutSeconds"] == "5"


def test_a_controller_reconciles_each_key_once_per_burst_and_retries_failures(fake):
    server, c = fake
    cm = lambda name: {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
    server.watch_events = [{"type": "ADDED", "object": cm("a")}, {"type": "MODIFIED", "object": cm("a")},
                           {"type": "ADDED", "object": cm("b")}]
    seen, failed = [], []

    def reconcile(cl, key):
        assert cl is not c and cl.namespace == "lab"  # the controller's threads have a client of their own
        if key == "b" and not failed:
            failed.append(key)
            raise cluster.NotFound("ConfigMap lab/b", 404, "NotFound", "not yet")
        seen.append(key)
        return f"reconciled {key}"

    ctl = operator.Controller(c, reconcile, [("ConfigMap", "v1", None, lambda o: o["metadata"]["name"])], resync=1)
    with ctl:
        deadline = time.monotonic() + 10
        while not {"a", "b"} <= set(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not ctl.running
    assert {"a", "b"} <= set(seen) and failed == ["b"]
    assert "b: ConfigMap lab/b: 404 NotFound: not yet" in ctl.log
    assert "reconciled a" in ctl.log


def test_until_and_controller_of():
    pending = cluster.until("status.readyReplicas", 3)
    assert pending(cluster.plain(deployment())) == "status.readyReplicas is None, not 3"
    assert pending({"status": {"readyReplicas": 3}}) is None
    assert cluster.until("status.lastSuccessfulTime")({"status": {}}) == "status.lastSuccessfulTime is None"
    assert cluster.until("spec.replicas")(None) == "spec.replicas is None"
    mirror = k.V1Pod(metadata=META(name="etcd-cp", owner_references=[k.V1OwnerReference(
        api_version="v1", kind="Node", name="cp", uid="u", controller=True)]))
    assert cluster.controller_of(mirror) == "Node/cp"
    assert cluster.controller_of(k.V1Pod(metadata=META(name="bare"))) is None


def test_an_unreachable_server_is_no_cluster(tmp_path):
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "gone",
              "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
              "users": [{"name": "u", "user": {}}], "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    c = cluster.connect(kubeconfig=str(tmp_path / "kubeconfig"))
    with pytest.raises(cluster.NoCluster, match="does not answer"):
        c.get("ConfigMap", "x")
    with pytest.raises(cluster.NoCluster, match="no context 'other'"):
        cluster.connect("other", kubeconfig=str(tmp_path / "kubeconfig"))
    with pytest.raises(cluster.NoCluster, match="no usable kubeconfig"):
        cluster.connect(kubeconfig=str(tmp_path / "missing"))


def test_kind_only_steps_print_what_they_would_show_and_return(fake, capsys):
    _, c = fake
    assert c.node_containers() == []
    assert c.stop_node("n1") is None and c.start_node("n1") is None
    assert c.kind_only("stopping a node", "the node going Unknown") is False
    out = capsys.readouterr().out
    assert out.count("[kind only]") == 4 and "fake is not a kind cluster" in out and "unset CNLAB_CONTEXT" in out
    assert "stopping node n1: this step would show its kubelet going silent" in out


NODE = "/api/v1/nodes/n1"


def test_label_on_a_missing_object_raises_and_creates_nothing(fake):
    server, c = fake
    with pytest.raises(cluster.NotFound, match="Node n1: 404"):
        c.label("Node", "n1", {"cnlab/doomed": "true"})
    assert server.objects == {}
    assert [r[3] for r in server.requests if r[0] == "PATCH"] == ["application/merge-patch+json"]  # never an apply


def test_label_patches_an_existing_node_and_tear_down_takes_the_labels_off(fake, tmp_path, monkeypatch):
    server, c = fake
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")
    server.objects[NODE] = {"apiVersion": "v1", "kind": "Node", **cluster.plain(node("n1", "True"))}
    server.objects[NODE]["metadata"]["labels"] = {"kubernetes.io/hostname": "n1"}
    c.label("Node", "n1", {"cnlab/agent": "yes", "cnlab/doomed": "true"})
    c.label("Node", "n1", {"cnlab/agent": "yes"})   # the course's other label goes
    assert server.objects[NODE]["metadata"]["labels"] == {"kubernetes.io/hostname": "n1", "cnlab/agent": "yes"}
    c.cordon("n1")
    assert server.objects[NODE]["spec"]["unschedulable"] is True
    assert c.tear_down() == ["labels cnlab/agent taken off Node n1", "Node n1 uncordoned"]
    assert server.objects[NODE]["metadata"]["labels"] == {"kubernetes.io/hostname": "n1"}
    assert "unschedulable" not in server.objects[NODE].get("spec", {})
    assert not list((tmp_path / "records").glob("*"))


def test_drain_cordons_and_evicts_only_the_labs_pods_on_that_node(fake, tmp_path, monkeypatch):
    server, c = fake
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")
    server.objects[NODE] = {"apiVersion": "v1", "kind": "Node", **cluster.plain(node("n1", "True"))}
    for name, where in (("lonely", "n1"), ("guarded-x", "n1"), ("elsewhere", "n2")):
        server.objects[f"/api/v1/namespaces/lab/pods/{name}"] = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "lab"}, "spec": {"nodeName": where}}
    assert c.drain("n1") == ["guarded-x", "lonely"]
    assert sorted(p.rsplit("/", 1)[-1] for p in server.objects if "/pods/" in p) == ["elsewhere"]
    assert server.objects[NODE]["spec"]["unschedulable"] is True
    assert c.tear_down() == ["Node n1 uncordoned"]


def test_a_crashed_labs_namespace_is_deleted_by_the_registered_sweep(fake, tmp_path, monkeypatch):
    """The kernel died mid-lab: no tear_down ran. The record it left lets cleanup() (or the next run's
    lab_cluster) delete the namespace, in another process, later."""
    server, c = fake
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")
    c.ensure_namespace()
    [record] = (tmp_path / "records").glob("*.json")
    assert json.loads(record.read_text())["owned"] == [["v1", "Namespace", "lab"]]
    c.close()  # ... and the kernel is gone
    assert "/api/v1/namespaces/lab" in server.objects
    from helpers._core import owners
    assert "helpers.kubernetes.cluster.sweep" in [key for _, key, _ in owners._sweeps]
    cluster.sweep("another-lab")  # the next run of another lab leaves it alone
    assert "/api/v1/namespaces/lab" in server.objects
    cluster.sweep()
    assert "/api/v1/namespaces/lab" not in server.objects and not record.exists()
    cluster.sweep()  # twice is fine


def test_a_failing_check_still_tears_down(fake, tmp_path, monkeypatch):
    server, c = fake
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")
    c.ensure_namespace()
    with pytest.raises(AssertionError):
        with c:                       # a check cell: try: assert ... finally: c.tear_down()
            assert c.find("ConfigMap", "site") is not None, "the check fails"
    assert "/api/v1/namespaces/lab" not in server.objects and not list((tmp_path / "records").glob("*"))


# ------------------------------------------------------------------------------ the Echo controller's logic

def echo(replicas=2, message="hello", ready=None):
    obj = {"apiVersion": cluster.ECHO_API, "kind": "Echo",
           "metadata": {"name": "hello", "namespace": "lab", "uid": "echo-uid", "generation": 3},
           "spec": {"message": message, "replicas": replicas}}
    return obj


def test_echo_deployment_is_the_template_named_sized_and_owned():
    dep = operator.echo_deployment(echo())
    assert dep["metadata"]["name"] == "echo-hello" and dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0] == {"apiVersion": "cnlab.example/v1", "kind": "Echo",
                                                     "name": "hello", "uid": "echo-uid", "controller": True,
                                                     "blockOwnerDeletion": True}
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "MESSAGE", "value": "hello"}]


def test_echo_drift_and_status():  # the status, mid-rollout and after: tests/test_operator.py
    desired = operator.echo_deployment(echo())
    assert operator.echo_drift(None, desired) == ["created Deployment echo-hello (2 replicas)"]
    live = operator.echo_deployment(echo(replicas=5, message="edited by hand"))
    assert operator.echo_drift(live, desired) == ["replicas 5 -> 2", "message -> 'hello'"]
    assert operator.echo_drift(desired, desired) == []
    st = operator.echo_status(echo(), deployment(replicas=2, total=2, updated=2, available=1))
    assert st["readyReplicas"] == 1 and st["conditions"][0] == {"type": "Ready", "status": "False",
                                                                "reason": "WaitingForReplicas"}
    dep = cluster.plain(deployment(replicas=2, total=2, updated=2, available=2))
    assert operator.echo_status(echo(), dep)["conditions"][0]["status"] == "True"


# ------------------------------------------------------------------------------ facts about any cluster

def tainted(name, *taints, images=(), unschedulable=None):
    return k.V1Node(api_version="v1", kind="Node", metadata=META(name=name, labels={
        "node-role.kubernetes.io/control-plane": ""} if taints else {}),
        spec=k.V1NodeSpec(taints=[k.V1Taint(key=key, effect=effect) for key, effect in taints],
                          unschedulable=unschedulable),
        status=k.V1NodeStatus(node_info=k.V1NodeSystemInfo(
            architecture="amd64", boot_id="", container_runtime_version="containerd://1.6.20", kernel_version="6.1",
            kube_proxy_version="", kubelet_version="v1.36.0", machine_id="", operating_system="linux",
            os_image="Debian GNU/Linux 12", system_uuid=""),
            images=[k.V1ContainerImage(names=list(names)) for names in images]))


def test_workers_and_the_control_planes_taint_come_from_the_api_not_from_names():
    nodes = [tainted("m1", ("node-role.kubernetes.io/control-plane", "NoSchedule")), tainted("b"), tainted("a"),
             tainted("c", unschedulable=True), tainted("d", ("dedicated", "PreferNoSchedule"))]
    roles = cluster.node_roles(nodes)
    assert roles["workers"] == ["a", "b", "d"]  # PreferNoSchedule still takes Pods; a cordoned node does not
    assert roles["tainted"] == {"c": [], "m1": ["node-role.kubernetes.io/control-plane:NoSchedule"]}


def test_missing_images_are_found_on_the_nodes_that_run_pods_and_the_fix_names_each():
    busybox = ("docker.io/cnlab/busybox:latest", "sha256:abc")
    nodes = [tainted("cp", ("node-role.kubernetes.io/control-plane", "NoSchedule")),
             tainted("w1", images=[busybox, ("docker.io/cnlab/busybox:v1",)]), tainted("w2", images=[busybox])]
    assert cluster.missing_images(nodes, ["cnlab/busybox:latest"]) == {}
    missing = cluster.missing_images(nodes, ["cnlab/busybox:latest", "cnlab/busybox:v1"])
    assert missing == {"w2": ["cnlab/busybox:v1"]}
    assert cluster.import_hint(missing).startswith("on w2: `docker save cnlab/busybox:v1 | sudo ctr -n k8s.io images import -`")


def test_what_a_lab_needs_that_the_cluster_lacks():
    facts = {"workers": ["w1"], "tainted": {}, "proxy_mode": "iptables", "storage_class": None, "dns": False}
    assert cluster.lacking(facts) == []
    assert cluster.lacking(facts, workers=2, proxy_mode="nftables", storage=True, dns=True) == [
        "1 node(s) take ordinary Pods (w1); the lab asks for 2", "kube-proxy runs in iptables mode, not nftables",
        "no default StorageClass: PersistentVolumeClaims without a class stay Pending",
        "no cluster DNS (no Service kube-system/kube-dns): the lab uses ClusterIPs instead of names"]


def test_architecture_from_nodes_and_static_pods():
    apiserver = k.V1Pod(metadata=META(name="kube-apiserver-m1", labels={"component": "kube-apiserver",
                                                                       "tier": "control-plane"}),
                        spec=k.V1PodSpec(node_name="m1", containers=[]))
    arch = cluster.architecture([tainted("w1"), tainted("m1", ("node-role.kubernetes.io/control-plane", "NoSchedule"))],
                                [apiserver, pod("coredns-1", "Running")], ["10.0.0.1:6443"])
    assert arch["nodes"][0] == {"node": "m1", "roles": "control-plane", "kubelet": "v1.36.0",
                                "runtime": "containerd://1.6.20", "os": "Debian GNU/Linux 12"}
    assert arch["nodes"][1]["roles"] == "worker"
    assert arch["components"] == [("kube-apiserver", "m1")] and arch["api_servers"] == ["10.0.0.1:6443"]
    assert cluster.architecture([], [pod("coredns-1", "Running")], [])["components"] == []  # host processes


UID = "6b1c7a5e-0f1e-4d2a-9e57-3c0a1d2b4f60"
# What _POD_PROCESSES prints on a systemd-driven cgroup v2 node for the sidecar Pod: the pause
# process, then one process per container (their cgroup names carry the container IDs).
PROCESSES = "\n".join("\t".join(f) for f in [
    ("812", "/pause ", f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     "cri-containerd-aaaa.scope", "net:[4026532300]", "ipc:[4026532298]", "uts:[4026532297]", "pid:[4026532299]",
     "mnt:[4026532295]"),
    ("845", "sh -c echo 'written by app' > /shared/index.html; sleep 86400 ", "0::/kubepods.slice/.../cri-containerd-bbbb.scope",
     "net:[4026532300]", "ipc:[4026532298]", "uts:[4026532297]", "pid:[4026532301]", "mnt:[4026532302]"),
    ("861", "httpd -f -p 8080 -h /shared ", "0::/kubepods.slice/.../cri-containerd-cccc.scope",
     "net:[4026532300]", "ipc:[4026532298]", "uts:[4026532297]", "pid:[4026532303]", "mnt:[4026532304]"),
]) + "\nnot a process line\n"


def test_the_sandbox_seen_from_the_node_holds_the_shared_namespaces():
    sidecar = k.V1Pod(metadata=META(name="sidecar", uid=UID), status=k.V1PodStatus(container_statuses=[
        k.V1ContainerStatus(name=n, container_id=f"containerd://{cid}", image="i", image_id="", ready=True, restart_count=0)
        for n, cid in (("app", "bbbb"), ("web", "cccc"))]))
    procs = cluster.pod_processes(PROCESSES, sidecar)
    assert [(p["pid"], p["container"]) for p in procs] == [(812, None), (845, "app"), (861, "web")]
    assert cluster.sandbox_view(procs) == {"pause": "/pause", "containers": ["app", "web"],
                                           "shared": ["net", "ipc", "uts"], "own": ["pid", "mnt"]}
    with pytest.raises(cluster.LabError, match="no pause process"):
        cluster.sandbox_view(procs[1:])


def test_the_kubelets_cgroup_files_for_half_a_cpu_and_512mi():
    v2 = "kubepods.slice/kubepods-podX.slice\tcpu.max\t50000 100000\n" \
         "kubepods.slice/kubepods-podX.slice\tcpu.weight\t20\n" \
         "kubepods.slice/kubepods-podX.slice\tmemory.max\t536870912\n"
    got = cluster.cgroup_limits(v2)
    assert (got["cpus"], got["memory"], got["weight"]) == (0.5, 512 * 2**20, 20)
    assert got["files"]["kubepods.slice/kubepods-podX.slice/cpu.max"] == "50000 100000"
    v1 = "cpu,cpuacct/kubepods/podX\tcpu.cfs_quota_us\t50000\ncpu,cpuacct/kubepods/podX\tcpu.cfs_period_us\t100000\n" \
         "cpu,cpuacct/kubepods/podX\tcpu.shares\t512\nmemory/kubepods/podX\tmemory.limit_in_bytes\t536870912\n"
    got = cluster.cgroup_limits(v1)
    assert (got["cpus"], got["memory"], got["shares"]) == (0.5, 512 * 2**20, 512)
    unlimited = cluster.cgroup_limits("p\tcpu.max\tmax 100000\np\tmemory.max\tmax\n")
    assert unlimited["cpus"] is None and unlimited["memory"] is None


def test_lab_cluster_on_cnlab_context_checks_images_first_and_says_what_the_cluster_lacks(
        fake, tmp_path, monkeypatch, capsys):
    server, _ = fake
    from helpers import kind
    monkeypatch.setattr(cluster, "RECORDS", tmp_path / "records")
    from kubernetes.config import kube_config
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))  # $KUBECONFIG
    monkeypatch.setenv("CNLAB_CONTEXT", "fake")
    exits = []
    monkeypatch.setattr(kind.atexit, "register", lambda fn, *args: exits.append((fn, args)))
    server.objects["/api/v1/nodes/w1"] = cluster.plain(tainted("w1", images=[("docker.io/cnlab/busybox:latest",)]))
    server.objects["/api/v1/namespaces/kube-system/configmaps/kube-proxy"] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-proxy"}, "data": {"config.conf": "mode: nftables\n"}}
    with pytest.raises(cluster.MissingImages, match="w1: cnlab/busybox:v1") as e:
        kind.lab_cluster("pods", load=["cnlab/busybox:latest", "cnlab/busybox:v1"])
    assert "docker save cnlab/busybox:v1 | sudo ctr -n k8s.io images import -" in e.value.fix
    assert [r for r in server.requests if r[0] != "GET"] == [] and exits == []  # nothing was made
    c = kind.lab_cluster("pods", workers=2, proxy_mode="iptables", storage=True, dns=True, load=["cnlab/busybox:latest"])
    try:
        assert c.context == "fake" and c.namespace == "cnlab-pods" and c.kind is None
        assert server.objects["/api/v1/namespaces/cnlab-pods"]["metadata"]["labels"]["cnlab"] == "course"
        assert c.facts_ == {"workers": ["w1"], "tainted": {}, "proxy_mode": "nftables", "storage_class": None,
                            "dns": False}
        assert len(c.lacks) == 4 and "kube-proxy runs in nftables mode, not iptables" in c.lacks
        assert capsys.readouterr().out.count("note: fake: ") == 4
        assert len(exits) == 1
    finally:
        assert c.tear_down() == ["Namespace cnlab-pods deleted"]
    exits[0][0](*exits[0][1])   # at the kernel's exit: nothing left to do, and no error
    assert "/api/v1/namespaces/cnlab-pods" not in server.objects


# ------------------------------------------------------------------------------ a real cluster

@pytest.mark.requires("cluster")
def test_generic_calls_on_the_current_cluster():
    """Any cluster (the hosted CI's cnlab-ci): apply, conflicts, 404, watch, delete; then nothing left."""
    c = cluster.connect(namespace=f"cnlab-test-{int(time.time())}")
    try:
        c.ensure_namespace()
        c.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {k: a}\n")
        with pytest.raises(cluster.Conflict) as e:
            c.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "b"}},
                    field_manager="someone-else")
        assert e.value.conflicts == [("cnlab", ".data.k")]
        c.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "b"}},
                field_manager="someone-else", force=True)
        assert c.owners("ConfigMap", "cm")[".data.k"] == ["someone-else (Apply)"]
        assert [e.type for e in c.watch("ConfigMap", name="cm", timeout=2)] == ["ADDED"]
        with pytest.raises(cluster.NotFound, match=f"ConfigMap {c.namespace}/nope: 404"):
            c.get("ConfigMap", "nope")
        assert c.delete("ConfigMap", "cm") is True and c.find("ConfigMap", "cm") is None
    finally:
        c.tear_down()
    assert cluster.connect().find("Namespace", c.namespace) is None
