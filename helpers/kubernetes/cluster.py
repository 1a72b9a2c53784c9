"""The Kubernetes API from Python, on any cluster a kubeconfig names: kind's, or yours.

Everything goes through the API server, as with kubectl. Objects are sent with server-side
apply: the server merges them and records which field manager owns which field. Waits are
decided from the objects' own status. A refusal becomes a typed error that names the object
and says why::

    c = cluster.connect()                          # the current kubeconfig context
    c.apply("43-workloads/deployment.yaml")        # a file under manifests/ (or YAML, dicts, models)
    c.wait_rollout("Deployment", "web")
    for event in c.watch("Pod", timeout=10):       # stops on its own
        print(event)

Nothing here needs kind. A node's own view (its processes, a Pod's cgroups, kube-proxy's rules)
comes through a privileged Pod on that node, as ``kubectl debug node/...`` gives it, so it works
on any cluster. ``helpers.kind`` adds the nodes-as-containers side (stopping a node); on any
other cluster those calls print what they would show and how to see it on kind, and return.

A Cluster gives back what it changed: ``tear_down()`` (also run by ``with``, and registered so
that ``helpers.cleanup()`` or the next run does it after a crash) removes its labels and
cordons and deletes the namespaces and CRDs it applied.

Used in: 34-kubernetes-api, 35-api-controller, 41-kind-cluster, 42-pods, 43-workloads, 44-k8s-controller, 45-services, 46-declarative, book/orchestration/kubernetes, book/orchestration/kubernetes-api.
"""
import contextlib
import copy
import difflib
import hashlib
import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers import errors
from helpers.errors import BadInput, LabError, LabTimeout
from helpers._core import names, owners, wait
from helpers._core.names import LABEL, PREFIX, ROOT, STATE

MANIFESTS = ROOT / "manifests"
FIELD_MANAGER = PREFIX
ECHO_API = "cnlab.example/v1"   # the small CRD of the controller lab (manifests/44-controller)
# The apiVersion of kinds named without one (several groups serve an "Event", for instance).
_KINDS = {**dict.fromkeys(("Pod", "Service", "ConfigMap", "Secret", "Namespace", "Node", "Event", "Endpoints",
                           "PersistentVolumeClaim", "PersistentVolume", "ServiceAccount"), "v1"),
          **dict.fromkeys(("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "ControllerRevision"), "apps/v1"),
          "Job": "batch/v1", "CronJob": "batch/v1", "EndpointSlice": "discovery.k8s.io/v1",
          "CustomResourceDefinition": "apiextensions.k8s.io/v1", "StorageClass": "storage.k8s.io/v1",
          "Echo": ECHO_API}
_OWNED_KINDS = ("Namespace", "CustomResourceDefinition")  # cluster-wide things a lab makes and removes
_PATCH_TYPES = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
                "json": "application/json-patch+json"}


# ------------------------------------------------------------------------------ errors

class ApiError(LabError):
    """The API server refused a request: ``status`` (HTTP), ``reason`` and ``detail`` are its Status's."""
    hint = "read the API server's message"

    def __init__(self, what, status, reason, detail, *, causes=()):
        self.what, self.status, self.reason, self.detail = what, status, reason, detail
        self.causes = list(causes)  # (type, field, message) from the Status's details
        super().__init__(f"{what}: {status} {reason}: {detail}", fix=self.hint)


class Unauthorized(ApiError, errors.Refused):
    hint = ("the cluster refused the kubeconfig's credentials: refresh them "
            "(for kind: `kind export kubeconfig --name <cluster>`)")


class Forbidden(ApiError, errors.Refused):
    hint = "the kubeconfig's user may not do this (RBAC): use a context with more rights, or get a Role granting it"


class NotFound(ApiError, errors.NotFound):
    hint = "check the name and the namespace, and that it was created (c.get(kind) lists them)"


class Conflict(ApiError, errors.Refused):
    """409. After server-side apply, ``conflicts`` lists (field manager, field) that another manager owns."""

    @property
    def conflicts(self):
        return [(re.search(r'conflict with "([^"]*)"', m).group(1), f) for t, f, m in self.causes
                if t == "FieldManagerConflict" and 'conflict with "' in m]

    @property
    def hint(self):
        if self.conflicts:
            return (f"another field manager owns {', '.join(f'{f} ({m})' for m, f in self.conflicts)}: leave "
                    "those fields out of your manifest, or apply with force=True to take them over")
        return "the object changed since it was read: read it again, then retry"


class AlreadyExists(Conflict):
    hint = "it exists already: apply it (server-side apply updates it), or delete it first"


class Invalid(ApiError):
    """422: ``causes`` holds each invalid field and why."""
    hint = "fix the fields named above in the manifest"


class ServerError(ApiError):
    hint = "the API server failed: retry; if it goes on, read its logs (the kube-apiserver Pod in kube-system)"


class UnknownKind(LabError):
    def __init__(self, kind, api_version, context):
        super().__init__(f"the cluster {context} serves no kind {kind!r}" + (f" in {api_version}" if api_version else ""),
                         fix="check apiVersion and kind; a custom kind needs its CustomResourceDefinition applied first")


class NoCluster(errors.Unavailable):
    """No kubeconfig, no such context, or its API server does not answer."""


class MissingImages(LabError):
    """The nodes lack images the lab's Pods use (``imagePullPolicy: Never``: no registry)."""


class RolloutFailed(LabError):
    """A rollout that the cluster itself gave up on (a Deployment's progress deadline passed)."""


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 422: Invalid}


def what(kind, name=None, namespace=None):
    """How errors name an object: ``Deployment cnlab-lab/web``, ``Node n1``, ``Pods in cnlab-lab``."""
    if name:
        return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    return f"{kind}s in {namespace}" if namespace else f"{kind}s"


def api_error(exc, kind, name=None, namespace=None):
    """The typed error for an ApiException, from the Status object the API server sent back."""
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body or ""
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        status = {}
    status = status if isinstance(status, dict) and status.get("kind") == "Status" else {}
    reason = status.get("reason") or exc.reason or ""
    detail = status.get("message") or body.strip()[:300] or exc.reason or "no message"
    causes = [(c.get("reason") or c.get("type", ""), c.get("field", ""), c.get("message", ""))
              for c in (status.get("details") or {}).get("causes") or []]
    code = exc.status or 0
    cls = AlreadyExists if code == 409 and reason == "AlreadyExists" else \
        _BY_STATUS.get(code) or (ServerError if code >= 500 else ApiError)
    return cls(what(kind, name, namespace), code, reason, detail, causes=causes)


# ------------------------------------------------------------------------------ objects

_serializer = None


def plain(obj):
    """An API object as the plain dict of its JSON (camelCase), from a model, a dynamic object or a dict."""
    global _serializer
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "openapi_types"):  # kubernetes.client models: V1Deployment, V1Pod, ...
        if _serializer is None:
            from kubernetes.client import ApiClient
            _serializer = ApiClient()
        return _serializer.sanitize_for_serialization(obj)
    if hasattr(obj, "to_dict"):  # the dynamic client's ResourceInstance
        return obj.to_dict()
    raise BadInput(f"not a Kubernetes object: {obj!r}")


def load(source):
    """Objects as plain dicts from a manifest file (relative to manifests/), YAML text, dicts or models."""
    if isinstance(source, (list, tuple)):
        return [obj for item in source for obj in load(item)]
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                    and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        path = path if path.is_absolute() or path.exists() else MANIFESTS / path
        if not path.is_file():
            raise BadInput(f"no manifest {source}", fix=f"the labs' manifests live under {MANIFESTS}")
        docs = list(yaml.safe_load_all(path.read_text()))
    elif isinstance(source, str):
        docs = list(yaml.safe_load_all(source))
    else:
        docs = [plain(source)]
    objs = [copy.deepcopy(d) for d in docs if d]
    for obj in objs:
        if not (isinstance(obj, dict) and obj.get("apiVersion") and obj.get("kind")
                and (obj.get("metadata") or {}).get("name")):
            raise BadInput(f"not a Kubernetes object (apiVersion, kind and metadata.name are needed): {obj!r:.120}")
    return objs


def condition(obj, type_):
    """The status ("True", "False", "Unknown") of condition ``type_`` in .status.conditions, or None."""
    obj = plain(obj) or {}
    return next((c.get("status") for c in (obj.get("status") or {}).get("conditions") or []
                 if c.get("type") == type_), None)


_PRESENT = object()


def until(path, value=_PRESENT):
    """A ``pending`` test for ``Cluster.wait``: field ``path`` (``status.readyReplicas``) is set, or is ``value``."""
    def pending(obj):
        got = obj
        for key in path.split("."):
            got = got.get(key) if isinstance(got, dict) else None
        if got is not None if value is _PRESENT else got == value:
            return None
        return f"{path} is {got!r}" + ("" if value is _PRESENT else f", not {value!r}")
    return pending


def controller_of(obj):
    """``kind/name`` of the object that controls this one (a Pod's ReplicaSet, a mirror Pod's Node), or None."""
    refs = (plain(obj)["metadata"].get("ownerReferences") or [])
    ref = next((r for r in refs if r.get("controller")), None)
    return f"{ref['kind']}/{ref['name']}" if ref else None


def rollout_pending(obj, kind=None):
    """What a Deployment, StatefulSet or DaemonSet rollout still waits for; None once it is complete.

    Decided as ``kubectl rollout status`` does; a Deployment past its progress deadline raises
    RolloutFailed (the controller gave up: waiting longer will not help).
    """
    obj = plain(obj)
    kind, meta = kind or obj.get("kind"), obj["metadata"]
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    if (st.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return "the controller has not seen the latest spec yet"
    if kind == "Deployment":
        for c in st.get("conditions") or []:
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
                raise RolloutFailed(f"Deployment {meta.get('namespace')}/{meta['name']}: {c.get('message')}",
                                    fix="look at its new Pods (c.events(...)), fix the spec, or roll back")
        want, updated = spec.get("replicas", 1), st.get("updatedReplicas") or 0
        if updated < want:
            return f"{updated} of {want} new replicas updated"
        if (st.get("replicas") or 0) > updated:
            return f"{st['replicas'] - updated} old replicas pending termination"
        if (st.get("availableReplicas") or 0) < updated:
            return f"{st.get('availableReplicas') or 0} of {updated} updated replicas available"
        return None
    if kind == "StatefulSet":
        want = spec.get("replicas", 1)
        if (st.get("readyReplicas") or 0) < want:
            return f"{st.get('readyReplicas') or 0} of {want} pods ready"
        if (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate" \
                and st.get("updateRevision") != st.get("currentRevision"):
            return f"{st.get('updatedReplicas') or 0} of {want} pods at revision {st.get('updateRevision')}"
        return None
    if kind == "DaemonSet":
        want = st.get("desiredNumberScheduled") or 0
        if (st.get("updatedNumberScheduled") or 0) < want:
            return f"{st.get('updatedNumberScheduled') or 0} of {want} updated pods scheduled"
        if (st.get("numberAvailable") or 0) < want:
            return f"{st.get('numberAvailable') or 0} of {want} updated pods available"
        return None
    raise BadInput(f"no rollout to wait for on a {kind}", fix="use wait_for(kind, name, condition) instead")


def readiness(nodes, pods, *, expected_nodes=None, system_pods=False):
    """What keeps a cluster from being ready: nodes not Ready, kube-system pods not running. [] when ready.

    Only a cluster known to run its control plane and add-ons as Pods (kind's, with
    ``system_pods``) must have kube-system Pods: elsewhere the control plane may be host
    processes, or a provider's, and there are none.
    """
    nodes, pods = [plain(n) for n in nodes], [plain(p) for p in pods]
    found = [f"{len(nodes)} of {expected_nodes} nodes registered"] if expected_nodes and len(nodes) < expected_nodes else []
    for node in nodes:
        if condition(node, "Ready") != "True":
            found.append(f"node {node['metadata']['name']} Ready={condition(node, 'Ready') or 'not reported'}")
    if system_pods and not pods:
        found.append("no kube-system pods yet")
    for pod in pods:
        st, name = pod.get("status") or {}, pod["metadata"]["name"]
        statuses = st.get("containerStatuses") or []
        waiting = [s["state"]["waiting"].get("reason", "waiting") for s in statuses
                   if (s.get("state") or {}).get("waiting")]
        if st.get("phase") == "Succeeded":
            continue
        if st.get("phase") != "Running":
            found.append(f"pod kube-system/{name} {st.get('phase', 'Pending')}" + (f" ({waiting[0]})" if waiting else ""))
        elif not statuses or not all(s.get("ready") for s in statuses):
            found.append(f"pod kube-system/{name} running, not ready" + (f" ({waiting[0]})" if waiting else ""))
    return found


_NO_PODS = ("NoSchedule", "NoExecute")


def schedulable(node):
    """Whether an ordinary Pod (no tolerations) can land on the node: not cordoned, not tainted away."""
    spec = plain(node).get("spec") or {}
    return not spec.get("unschedulable") and not any(t.get("effect") in _NO_PODS for t in spec.get("taints") or [])


def node_roles(nodes):
    """{"workers": [names of schedulable nodes], "tainted": {name: ["key:effect", ...]}}, from the API
    alone: no cluster's naming scheme (kind's ``-worker``) is assumed."""
    nodes = sorted((plain(n) for n in nodes), key=lambda n: n["metadata"]["name"])
    return {"workers": [n["metadata"]["name"] for n in nodes if schedulable(n)],
            "tainted": {n["metadata"]["name"]: [f"{t['key']}:{t['effect']}" for t in (n.get("spec") or {}).get("taints") or []
                                                 if t.get("effect") in _NO_PODS]
                        for n in nodes if not schedulable(n)}}


def _image_names(ref):
    """The names a node's runtime may list an image under: containerd spells out the registry
    (``cnlab/busybox:v1`` is ``docker.io/cnlab/busybox:v1``)."""
    host = ref.split("/")[0]
    return {ref} if "/" in ref and ("." in host or ":" in host) else {ref, f"docker.io/{ref}", f"docker.io/library/{ref}"}


def missing_images(nodes, refs):
    """{node: [refs it lacks]} from each node's ``status.images``, for the nodes ordinary Pods run on."""
    found = {}
    for node in map(plain, nodes):
        if not schedulable(node):
            continue
        have = {name for image in (node.get("status") or {}).get("images") or [] for name in image.get("names") or []}
        lacks = [ref for ref in refs if not _image_names(ref) & have]
        if lacks:
            found[node["metadata"]["name"]] = lacks
    return found


def import_hint(missing):
    """How to put local images onto nodes that pull from no registry: one command per node."""
    return "; ".join(f"on {node}: `docker save {' '.join(refs)} | sudo ctr -n k8s.io images import -`"
                     f" (copy the tarball there first, e.g. with scp)" for node, refs in sorted(missing.items()))


def lacking(facts, *, workers=1, proxy_mode=None, storage=False, dns=False):
    """What a lab asks for that a cluster (``Cluster.facts()``) does not have, one sentence each."""
    found = []
    if len(facts["workers"]) < workers:
        found.append(f"{len(facts['workers'])} node(s) take ordinary Pods ({', '.join(facts['workers']) or 'none'}); "
                     f"the lab asks for {workers}")
    if proxy_mode and facts["proxy_mode"] != proxy_mode:
        found.append(f"kube-proxy runs in {facts['proxy_mode'] or 'no known'} mode, not {proxy_mode}")
    if storage and not facts["storage_class"]:
        found.append("no default StorageClass: PersistentVolumeClaims without a class stay Pending")
    if dns and not facts["dns"]:
        found.append("no cluster DNS (no Service kube-system/kube-dns): the lab uses ClusterIPs instead of names")
    return found


def architecture(nodes, pods, api_servers):
    """The cluster as the API shows it: each node with its roles, kubelet and runtime; each
    control-plane component and the node it runs on (kubeadm runs them as static Pods labelled
    ``tier=control-plane``; elsewhere they are host processes or the provider's, and are not Pods)."""
    rows = []
    for node in sorted(map(plain, nodes), key=lambda n: n["metadata"]["name"]):
        info = (node.get("status") or {}).get("nodeInfo") or {}
        roles = sorted(k.split("/", 1)[1] for k in node["metadata"].get("labels") or {}
                       if k.startswith("node-role.kubernetes.io/")) or ["worker" if schedulable(node) else "-"]
        rows.append({"node": node["metadata"]["name"], "roles": ",".join(roles), "kubelet": info.get("kubeletVersion"),
                     "runtime": info.get("containerRuntimeVersion"), "os": info.get("osImage")})
    components = sorted(((p["metadata"].get("labels") or {}).get("component", p["metadata"]["name"]),
                         (p.get("spec") or {}).get("nodeName")) for p in map(plain, pods)
                        if (p["metadata"].get("labels") or {}).get("tier") == "control-plane")
    return {"nodes": rows, "components": components, "api_servers": sorted(api_servers)}


def previous_template(deployment, replica_sets):
    """The Pod template of a Deployment's previous revision, as ``kubectl rollout undo`` finds it."""
    dep = plain(deployment)
    revision = lambda o: int(((o["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision")) or 0)
    owned = [rs for rs in map(plain, replica_sets)
             if any(ref.get("uid") == dep["metadata"]["uid"] for ref in rs["metadata"].get("ownerReferences") or [])]
    older = sorted((rs for rs in owned if revision(rs) < revision(dep)), key=revision)
    if not older:
        raise BadInput(f"Deployment {dep['metadata']['name']} has no earlier revision to roll back to")
    template = copy.deepcopy(older[-1]["spec"]["template"])
    template["metadata"]["labels"].pop("pod-template-hash", None)
    return revision(older[-1]), template


def field_owners(obj):
    """Who owns each field, from .metadata.managedFields: {".spec.replicas": ["cnlab (Apply)"], ...}."""
    def paths(fields, prefix=""):
        for key, sub in fields.items():
            if key == ".":
                continue
            if key.startswith("k:"):
                step = "[" + ",".join(f"{k}={v}" for k, v in json.loads(key[2:]).items()) + "]"
            else:
                step = f"[{key[2:]}]" if key[:2] in ("v:", "i:") else f".{key[2:]}"
            children = {k: v for k, v in (sub or {}).items() if k != "."}
            yield from paths(children, prefix + step) if children else [prefix + step]

    owners = {}
    for entry in plain(obj)["metadata"].get("managedFields") or []:
        label = f"{entry['manager']} ({entry['operation']}" + (f", {entry['subresource']})" if entry.get("subresource") else ")")
        for path in paths(entry.get("fieldsV1") or {}):
            owners.setdefault(path, []).append(label)
    return {path: sorted(who) for path, who in sorted(owners.items())}


# ------------------------------------------------------------------------------ a node's own view

# Run in the node Pod (host PID namespace): every process of the Pod with this UID, found by
# the Pod's cgroup (the kubelet names it pod<uid>, or pod<uid with _> under systemd), with its
# command line, the line of /proc/<pid>/cgroup that names the Pod, and its namespaces.
_POD_PROCESSES = r"""uid=$1; alt=$(echo "$uid" | tr - _)
for d in /proc/[0-9]*; do
  line=$(grep -m1 -E "pod($uid|$alt)" "$d/cgroup" 2>/dev/null) || continue
  printf '%s\t%s\t%s' "${d#/proc/}" "$(tr '\0' ' ' < "$d/cmdline")" "$line"
  for n in net ipc uts pid mnt; do printf '\t%s' "$(readlink "$d/ns/$n")"; done
  echo
done"""

# The Pod's own cgroup folders on the node (v1: one per hierarchy; v2: one), and the files the
# kubelet wrote there for the Pod's requests and limits.
_POD_CGROUPS = r"""uid=$1; alt=$(echo "$uid" | tr - _)
for d in $(find /host/sys/fs/cgroup -maxdepth 7 -type d \( -name "*pod$uid*" -o -name "*pod$alt*" \) 2>/dev/null); do
  for f in cpu.max cpu.weight memory.max cpu.cfs_quota_us cpu.cfs_period_us cpu.shares memory.limit_in_bytes; do
    [ -f "$d/$f" ] && printf '%s\t%s\t%s\n' "${d#/host/sys/fs/cgroup/}" "$f" "$(cat "$d/$f")"
  done
done"""

NAMESPACE_TYPES = ("net", "ipc", "uts", "pid", "mnt")


def pod_processes(text, pod):
    """Decode ``_POD_PROCESSES``' output: one dict per process, named by its container (the Pod's
    ``containerStatuses`` give each container's ID; the sandbox's process belongs to none)."""
    ids = {(s.get("containerID") or "").split("://")[-1]: s["name"]
           for s in (plain(pod).get("status") or {}).get("containerStatuses") or [] if s.get("containerID")}
    found = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 3 + len(NAMESPACE_TYPES) or not fields[0].isdigit():
            continue
        pid, cmdline, cgroup, *links = fields
        container = next((name for cid, name in ids.items() if cid and cid in cgroup), None)
        found.append({"pid": int(pid), "cmdline": cmdline.strip(), "container": container,
                      "ns": dict(zip(NAMESPACE_TYPES, links))})
    return sorted(found, key=lambda p: p["pid"])


def sandbox_view(processes):
    """What the pause process holds: its command, which namespaces every container shares with it,
    and which each container has of its own."""
    pause = next((p for p in processes if p["container"] is None and p["cmdline"].split(" ")[0].endswith("pause")), None)
    if pause is None:
        raise LabError("no pause process among the Pod's processes on its node",
                       fix="is the Pod running? (its sandbox is made before any container)")
    others = [p for p in processes if p["container"]]
    shared = [t for t in NAMESPACE_TYPES if others and all(p["ns"][t] == pause["ns"][t] for p in others)]
    return {"pause": pause["cmdline"], "containers": sorted({p["container"] for p in others}),
            "shared": shared, "own": [t for t in NAMESPACE_TYPES if t not in shared]}


def cgroup_limits(text):
    """The Pod-level limits the kubelet wrote (``_POD_CGROUPS``' output): {"cpus", "memory",
    "weight" (v2) or "shares" (v1), "files": {path/file: value}}."""
    files = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3:
            files[f"{fields[0]}/{fields[1]}"] = fields[2].strip()
    by_name = {key.rsplit("/", 1)[1]: value for key, value in files.items()}
    cpus = memory = None
    if "cpu.max" in by_name:
        quota, period = by_name["cpu.max"].split()
        cpus = None if quota == "max" else int(quota) / int(period)
    elif "cpu.cfs_quota_us" in by_name and int(by_name["cpu.cfs_quota_us"]) > 0:
        cpus = int(by_name["cpu.cfs_quota_us"]) / int(by_name["cpu.cfs_period_us"])
    raw = by_name.get("memory.max") or by_name.get("memory.limit_in_bytes")
    if raw and raw != "max" and int(raw) < 2**62:
        memory = int(raw)
    out = {"cpus": cpus, "memory": memory, "files": files}
    if "cpu.weight" in by_name:
        out["weight"] = int(by_name["cpu.weight"])
    if "cpu.shares" in by_name:
        out["shares"] = int(by_name["cpu.shares"])
    return out


def node_pod(node, namespace, image="cnlab/busybox:latest"):
    """The Pod that gives the course a node's own view, like ``kubectl debug node/<node>``: the
    node's PID and network namespaces, privileged, the node's root read-only at /host."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": names.name("node", hashlib.sha1(node.encode()).hexdigest()[:10]), "namespace": namespace,
                         "labels": {LABEL: "node-view", "app.kubernetes.io/name": names.name("node")}},
            "spec": {"nodeName": node, "hostPID": True, "hostNetwork": True, "restartPolicy": "Never",
                     "terminationGracePeriodSeconds": 1, "tolerations": [{"operator": "Exists"}],
                     "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
                     "containers": [{"name": "node", "image": image, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 86400 & wait"],
                                     "securityContext": {"privileged": True},
                                     "volumeMounts": [{"name": "host", "mountPath": "/host", "readOnly": True}]}]}}


# ------------------------------------------------------------------------------ kube-proxy's rules

def iptables_service(iptables_save, service):
    """What kube-proxy's iptables mode wrote for ``namespace/name``: its chain and endpoints.

    ``iptables_save`` is ``iptables-save -t nat`` read on a node. KUBE-SERVICES jumps to the
    service's KUBE-SVC chain; that chain picks a KUBE-SEP chain per endpoint with ``statistic
    --mode random --probability p`` (1/n, then 1/(n-1), ... so each gets an equal share); each
    KUBE-SEP chain DNATs to one Pod. Returns {"chain", "cluster_ip", "endpoints": [(ip:port, p)]}.
    """
    rules = [line for line in iptables_save.splitlines() if line.startswith("-A ")]
    comment = re.compile(r'--comment "?' + re.escape(service) + r'[:" ]')
    svc = next((r for r in rules if r.startswith("-A KUBE-SERVICES ") and comment.search(r)
                and "-j KUBE-SVC-" in r), None)
    if svc is None:
        return None
    chain = re.search(r"-j (KUBE-SVC-\S+)", svc).group(1)
    ip, port = re.search(r"-d (\S+?)(?:/32)? ", svc).group(1), re.search(r"--dport (\d+)", svc).group(1)
    endpoints = []
    for rule in rules:
        sep = re.search(r"-j (KUBE-SEP-\S+)", rule)
        if rule.startswith(f"-A {chain} ") and sep:
            p = re.search(r"--probability (\S+)", rule)
            dnat = next(re.search(r"--to-destination (\S+)", r).group(1) for r in rules
                        if r.startswith(f"-A {sep.group(1)} ") and "--to-destination" in r)
            endpoints.append((dnat, float(p.group(1)) if p else 1.0))
    return {"chain": chain, "cluster_ip": f"{ip}:{port}", "endpoints": endpoints}


def shares(probabilities):
    """The fraction of new connections each rule of a KUBE-SVC chain receives, in order."""
    left, result = 1.0, []
    for p in probabilities:
        result.append(left * p)
        left *= 1 - p
    return result


def _nft_blocks(text):
    """{"chain <name>" or "map <name>": body} from ``nft list table`` output."""
    blocks, current, body, depth = {}, None, [], 0
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            head = re.fullmatch(r"(chain|map|set) (\S+) \{", stripped)
            if head:
                current, body, depth = f"{head.group(1)} {head.group(2)}", [], 1
            continue
        depth += stripped.count("{") - stripped.count("}")
        if depth <= 0:
            blocks[current], current = "\n".join(body), None
        else:
            body.append(stripped)
    return blocks


def nftables_service(nft_table, service):
    """What kube-proxy's nftables mode wrote for ``namespace/name`` (``nft list table ip kube-proxy``).

    The ``service-ips`` verdict map sends ClusterIP . protocol . port to the Service's chain;
    that chain picks an endpoint chain with ``numgen random mod n vmap`` (each gets 1/n), and each
    endpoint chain DNATs to one Pod. Returns {"chain", "cluster_ip", "endpoints": [(ip:port, 1/n)]}.
    """
    blocks = _nft_blocks(nft_table)
    name = re.compile(r"service-[A-Z0-9]+-" + re.escape(service) + r"/")
    chain = next((key.split(" ", 1)[1] for key in blocks if key.startswith("chain ") and name.match(key.split(" ", 1)[1])),
                 None)
    if chain is None:
        return None
    elements = re.search(r"(\S+) \. \w+ \. (\d+) : goto " + re.escape(chain) + r"\b", blocks.get("map service-ips", ""))
    picks = re.findall(r"goto (endpoint-[^\s,}]+)", blocks[f"chain {chain}"])
    endpoints = []
    for ep in picks:
        dnat = re.search(r"dnat to (\S+)", blocks.get(f"chain {ep}", ""))
        endpoints.append((dnat.group(1) if dnat else ep.rsplit("__", 1)[-1].replace("/", ":"), 1 / len(picks)))
    return {"chain": chain, "cluster_ip": f"{elements.group(1)}:{elements.group(2)}" if elements else None,
            "endpoints": endpoints}


def ipvs_services(proc_net_ip_vs):
    """``/proc/net/ip_vs`` (read on a node: IPVS tables are per network namespace), decoded.

    Returns {"TCP 10.96.0.10:53": {"scheduler": "rr", "destinations": [("10.244.0.2:53", "Masq", 1)]}}.
    The kernel prints addresses and ports in hex; ipvsadm is not in kind's node image.
    """
    def addr(hexpair):
        ip, port = hexpair.split(":")
        return ".".join(str(int(ip[i:i + 2], 16)) for i in range(0, 8, 2)) + f":{int(port, 16)}"

    found, current = {}, None
    for line in proc_net_ip_vs.splitlines():
        fields = line.split()
        if fields[:1] in (["TCP"], ["UDP"], ["SCTP"]) and ":" in fields[1]:
            current = found.setdefault(f"{fields[0]} {addr(fields[1])}",
                                       {"scheduler": fields[2], "destinations": []})
        elif fields[:1] == ["->"] and current is not None and ":" in fields[1] and not fields[1].startswith("Remote"):
            current["destinations"].append((addr(fields[1]), fields[2], int(fields[3])))
    return found


# ------------------------------------------------------------------------------ what a crash leaves

# One file per Cluster that changed something: what to give back. A record is an instruction
# for the sweep (on a remote cluster), not a resource of this machine: kept, not a leak.
RECORDS = owners.keeps(STATE / "kubernetes")


def _load_record(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Result:
    """What a command run in a Pod or a node gave back."""
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Event:
    """One watch event: ADDED, MODIFIED or DELETED, and the object as it was then."""
    type: str
    object: dict

    def __str__(self):
        return f"{self.type:8} {self.object['kind']} {self.object['metadata']['name']}"


# ------------------------------------------------------------------------------ the cluster

class Cluster:
    """One cluster, through one kubeconfig context; ``namespace`` is where namespaced objects go."""
    kind = None  # the kind cluster's name, on a KindCluster

    def __init__(self, context=None, *, kubeconfig=None, namespace="default"):
        from kubernetes import config
        try:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            self.context = context or (active or {}).get("name")
            if self.context not in [c["name"] for c in contexts]:
                raise NoCluster(f"no context {self.context!r} in the kubeconfig",
                                fix=f"its contexts: {', '.join(c['name'] for c in contexts)}")
            self.api = config.new_client_from_config(config_file=kubeconfig, context=self.context,
                                                     persist_config=False)
        except config.ConfigException as e:
            raise NoCluster(f"no usable kubeconfig ({e})", fix="create a cluster with kind.create(...), "
                            "or point KUBECONFIG at your cluster's kubeconfig") from e
        self.kubeconfig, self.namespace = kubeconfig, namespace
        self._dynamic, self._cache, self._resources, self._owned = None, None, {}, []
        self._labelled, self._cordoned = {}, []   # {(kind, name, namespace): [keys]}, [node]

    def __repr__(self):
        return f"<{type(self).__name__} {self.context} namespace={self.namespace}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tear_down()

    @contextlib.contextmanager
    def _errors(self, kind, name=None, namespace=None):
        import urllib3
        from kubernetes.client.rest import ApiException
        try:
            yield
        except ApiException as e:  # the dynamic client's errors are ApiExceptions too
            raise api_error(e, kind, name, namespace) from e
        except urllib3.exceptions.HTTPError as e:
            raise NoCluster(f"the API server of {self.context} ({self.api.configuration.host}) does not answer",
                            fix="is the cluster running? (for kind: `docker ps` lists its nodes)") from e

    @property
    def dynamic(self):
        """The client's DynamicClient: any kind the server serves, custom ones included."""
        if self._dynamic is None:
            from kubernetes.dynamic import DynamicClient
            self._cache = tempfile.TemporaryDirectory(prefix="kube-discovery-")  # never stale across clusters
            with self._errors("API discovery"):
                self._dynamic = DynamicClient(self.api, cache_file=os.path.join(self._cache.name, "cache.json"))
        return self._dynamic

    def resource(self, kind, api_version=None):
        """The API resource serving ``kind``, from its group version's own discovery document.

        Read directly (``/apis/<group>/<version>``) rather than through the list of all groups,
        which a lone apiextensions-apiserver does not fill with its CRDs' groups; and retried
        for a few seconds, since a just-Established CRD can take a moment to appear there.
        """
        from kubernetes.dynamic.exceptions import ResourceNotFoundError, ResourceNotUniqueError
        from kubernetes.dynamic.resource import ResourceList
        api_version = api_version or _KINDS.get(kind) or self._custom_kind_version(kind)
        if api_version is None:  # an unusual kind named alone: search every group
            try:
                with self._errors(kind):
                    return self.dynamic.resources.get(kind=kind)
            except ResourceNotFoundError as e:
                raise UnknownKind(kind, None, self.context) from e
            except ResourceNotUniqueError as e:
                raise BadInput(f"several API groups serve a {kind}: say which with api_version=") from e
        if (api_version, kind) not in self._resources:
            prefix, group, version = ("apis", *api_version.split("/")) if "/" in api_version else ("api", "", api_version)

            def served():  # a CRD just applied is served a moment later
                try:
                    with self._errors(kind):
                        found = self.dynamic.resources.get_resources_for_api_version(prefix, group, version, True)
                except NotFound:
                    found = {}
                return next((r for r in found.get(kind, []) if not isinstance(r, ResourceList)), None)
            self._resources[(api_version, kind)] = wait.until(
                served, 5, f"{api_version} {kind} to be served", interval=0.5,
                error=lambda: UnknownKind(kind, api_version, self.context))
        return self._resources[(api_version, kind)]

    def _custom_kind_version(self, kind):
        """The storage version of the CRD that defines ``kind``, or None. Asked before a search
        of every group, which a lone apiextensions-apiserver (no ``/api``) cannot answer."""
        try:
            crds = self.resource("CustomResourceDefinition", "apiextensions.k8s.io/v1").get()
        except ApiError:  # not allowed to list CRDs: the search may still find it
            return None
        for crd in crds.items:
            if crd.spec.names.kind == kind:
                return f"{crd.spec.group}/{next(v.name for v in crd.spec.versions if v.storage)}"
        return None

    def _ns(self, resource, namespace):
        return (namespace or self.namespace) if resource.namespaced else None

    def close(self):
        self.api.close()
        if self._cache:
            self._cache.cleanup()
        self._dynamic = self._cache = None
        self._resources.clear()

    # ---- reading and writing objects

    def get(self, kind, name=None, *, namespace=None, api_version=None, label_selector=None,
            field_selector=None, all_namespaces=False):
        """One object (a dict), or with no name the list of them (in every namespace if asked)."""
        res = self.resource(kind, api_version)
        ns = None if all_namespaces else self._ns(res, namespace)
        with self._errors(kind, name, ns):
            got = self.dynamic.get(res, name=name, namespace=ns, label_selector=label_selector,
                                   field_selector=field_selector).to_dict()
        return got if name else got.get("items", [])

    def find(self, kind, name, *, namespace=None, api_version=None):
        """The object, or None if there is none."""
        try:
            return self.get(kind, name, namespace=namespace, api_version=api_version)
        except NotFound:
            return None

    def apply(self, source, *, namespace=None, force=False, field_manager=FIELD_MANAGER, dry_run=False):
        """Server-side apply every object in ``source``; return them as the server now has them.

        The server merges each object into what it stores and records ``field_manager`` as the
        owner of the fields it sets. Setting a field another manager owns is a Conflict, unless
        ``force``. With ``dry_run`` the server computes the result and stores nothing.
        """
        done = []
        for obj in load(source):
            res = self.resource(obj["kind"], obj["apiVersion"])
            ns = self._ns(res, obj["metadata"].get("namespace") or namespace)
            if ns:
                obj["metadata"]["namespace"] = ns
            with self._errors(obj["kind"], obj["metadata"]["name"], ns):
                out = self.dynamic.server_side_apply(res, body=obj, namespace=ns, field_manager=field_manager,
                                                     force_conflicts=True if force else None,
                                                     dry_run="All" if dry_run else None)
            ref = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
            if obj["kind"] in _OWNED_KINDS and not dry_run and ref not in self._owned:
                self._owned.append(ref)
                self._record()
            done.append(out.to_dict())
        return done

    def patch(self, kind, name, body, *, namespace=None, api_version=None, subresource=None, type="merge",
              field_manager=f"{FIELD_MANAGER}-patch"):
        """PATCH one object (or its ``scale``/``status`` subresource): a merge, strategic or JSON patch."""
        res = self.resource(kind, api_version)
        ns = self._ns(res, namespace)
        target = res.subresources[subresource] if subresource else res
        with self._errors(kind, name, ns):
            return self.dynamic.patch(target, body=body, name=name, namespace=ns, content_type=_PATCH_TYPES[type],
                                      field_manager=field_manager).to_dict()

    def scale(self, kind, name, replicas, *, namespace=None, field_manager=f"{FIELD_MANAGER}-scale"):
        """Set replicas through the scale subresource, as ``kubectl scale`` does."""
        return self.patch(kind, name, {"spec": {"replicas": replicas}}, namespace=namespace, subresource="scale",
                          field_manager=field_manager)

    def set_image(self, kind, name, image, *, container=None, namespace=None):
        """Change one container's image in a workload's Pod template, as ``kubectl set image`` does."""
        names = [c["name"] for c in self.get(kind, name, namespace=namespace)["spec"]["template"]["spec"]["containers"]]
        if container is None and len(names) > 1 or container not in (None, *names):
            raise BadInput(f"{kind} {name} has containers {names}: say which one with container=")
        body = {"spec": {"template": {"spec": {"containers": [{"name": container or names[0], "image": image}]}}}}
        return self.patch(kind, name, body, namespace=namespace, type="strategic",
                          field_manager=f"{FIELD_MANAGER}-set-image")

    def rollback(self, name, *, namespace=None):
        """Put a Deployment's previous Pod template back (``kubectl rollout undo``); return its revision."""
        dep = self.get("Deployment", name, namespace=namespace)
        revision, template = previous_template(dep, self.get("ReplicaSet", namespace=namespace))
        self.patch("Deployment", name, [{"op": "replace", "path": "/spec/template", "value": template}],
                   namespace=namespace, type="json", field_manager=f"{FIELD_MANAGER}-rollback")
        return revision

    def label(self, kind, name, labels, *, namespace=None):
        """Set labels on an existing object (a Node, say); the course's earlier ones not in ``labels`` go.

        A merge patch, never an apply: on a missing object it is NotFound, and nothing is created
        (server-side apply would make a phantom Node). ``tear_down`` takes them all off again.
        """
        key = (kind, name, namespace)
        before = self._labelled.get(key, [])
        body = {"metadata": {"labels": {**dict.fromkeys(before), **dict(labels)}}}
        self.patch(kind, name, body, namespace=namespace, field_manager=f"{FIELD_MANAGER}-labels")
        if labels:
            self._labelled[key] = sorted(labels)
        else:
            self._labelled.pop(key, None)
        self._record()

    def cordon(self, node, *, on=True):
        """Mark a node unschedulable (``kubectl cordon``), or schedulable again; ``tear_down`` uncordons."""
        self.patch("Node", node, {"spec": {"unschedulable": True if on else None}},
                   field_manager=f"{FIELD_MANAGER}-cordon")
        if on and node not in self._cordoned:
            self._cordoned.append(node)
        elif not on and node in self._cordoned:
            self._cordoned.remove(node)
        self._record()

    def drain(self, node):
        """Cordon the node and evict this namespace's Pods from it (``kubectl drain``, kept to the
        lab's own Pods: other people's Pods on your cluster stay). Return the evicted Pods' names."""
        from kubernetes import client
        self.cordon(node)
        names = sorted(p["metadata"]["name"] for p in self.get("Pod", field_selector=f"spec.nodeName={node}")
                       if not p["metadata"].get("deletionTimestamp"))
        for name in names:
            body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=self.namespace))
            with self._errors("Pod", name, self.namespace):
                client.CoreV1Api(self.api).create_namespaced_pod_eviction(name, self.namespace, body)
        return names

    def owners(self, kind, name, *, namespace=None):
        """Which field manager owns which field of an object (see ``field_owners``)."""
        return field_owners(self.get(kind, name, namespace=namespace))

    def diff(self, source, *, namespace=None, field_manager=FIELD_MANAGER):
        """What applying ``source`` would change, as a unified diff: a server-side dry run, compared."""
        lines = []
        for obj in load(source):
            kind, name = obj["kind"], obj["metadata"]["name"]
            live = self.find(kind, name, namespace=obj["metadata"].get("namespace") or namespace,
                             api_version=obj["apiVersion"])
            merged = self.apply(obj, namespace=namespace, field_manager=field_manager, dry_run=True)[0]
            lines += difflib.unified_diff(_comparable(live), _comparable(merged), f"live/{kind}/{name}",
                                          f"applied/{kind}/{name}", lineterm="")
        return "\n".join(lines)

    def delete(self, kind, name, *, namespace=None, api_version=None, wait=True, timeout=120,
               propagation="Background"):
        """Delete one object and (with ``wait``) return once it is gone; False if it was not there.

        "Gone" is this object, by uid: a StatefulSet makes a new Pod of the same name at once.
        """
        res = self.resource(kind, api_version)
        ns = self._ns(res, namespace)
        obj = self.find(kind, name, namespace=ns, api_version=api_version)
        try:
            with self._errors(kind, name, ns):
                self.dynamic.delete(res, name=name, namespace=ns, propagation_policy=propagation)
        except NotFound:
            return False
        if wait:
            self.wait_gone(kind, name, namespace=ns, api_version=api_version, timeout=timeout,
                           uid=(obj or {}).get("metadata", {}).get("uid"))
        return True

    def ensure_namespace(self):
        """Create (apply) this cluster object's namespace, labelled as the course's. The node view
        needs privileged Pods, which Pod Security admission allows where the namespace says so."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace, "labels": {
            LABEL: "course", "pod-security.kubernetes.io/enforce": "privileged"}}})

    def tear_down(self):
        """Give the cluster back as it was: labels off, nodes uncordoned, then the namespaces and
        CRDs this object applied deleted. Returns what it did, one line each; safe to call twice."""
        done = []
        for (kind, name, namespace), keys in list(self._labelled.items()):
            with contextlib.suppress(NotFound):
                self.label(kind, name, {}, namespace=namespace)
                done.append(f"labels {', '.join(keys)} taken off {kind} {name}")
        for node in list(self._cordoned):
            with contextlib.suppress(NotFound):
                self.cordon(node, on=False)
                done.append(f"Node {node} uncordoned")
        for api_version, kind, name in reversed(self._owned):
            if self.delete(kind, name, api_version=api_version, timeout=300):
                done.append(f"{kind} {name} deleted")
        self._owned.clear()
        self._labelled.clear()
        self._cordoned.clear()
        self._record()
        self.close()
        return done

    def _record_path(self):
        key = f"{self.kubeconfig or ''}|{self.context}|{self.namespace}"
        return RECORDS / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"

    def _record(self):
        """Write down (or, once nothing is left, remove) what this object changed, so that
        ``sweep()`` in another process can give it back after a crash."""
        path = self._record_path()
        if not (self._owned or self._labelled or self._cordoned):
            path.unlink(missing_ok=True)
            return
        RECORDS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "kubeconfig": self.kubeconfig, "context": self.context, "namespace": self.namespace,
            "owned": self._owned, "labelled": [[*k, v] for k, v in self._labelled.items()],
            "cordoned": self._cordoned}))

    def proxy_mode(self):
        """kube-proxy's mode: from the config kubeadm writes (ConfigMap kube-system/kube-proxy),
        else from kube-proxy itself (its ``/proxyMode`` endpoint, on a node); None if no kube-proxy
        answers (a CNI that replaces it, say)."""
        cm = self.find("ConfigMap", "kube-proxy", namespace="kube-system")
        conf = ((cm or {}).get("data") or {}).get("config.conf")
        if conf:
            return yaml.safe_load(conf).get("mode") or "iptables"
        roles = node_roles(self.get("Node"))
        for node in roles["workers"][:1] or list(roles["tainted"])[:1]:
            out = self.node_shell(node, "wget -qO- -T 5 http://127.0.0.1:10249/proxyMode")
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        return None

    def facts(self):
        """What a lab may need to know about this cluster, from the API (and kube-proxy)."""
        nodes = self.get("Node")
        classes = self.get("StorageClass")
        default = next((sc["metadata"]["name"] for sc in classes if (sc["metadata"].get("annotations") or {}).get(
            "storageclass.kubernetes.io/is-default-class") == "true"), None)
        return {**node_roles(nodes), "proxy_mode": self.proxy_mode(), "storage_class": default,
                "dns": self.find("Service", "kube-dns", namespace="kube-system") is not None}

    def check_images(self, refs):
        """Raise MissingImages, saying how to import them, unless every node that takes ordinary
        Pods has ``refs`` (the labs' Pods never pull: no registry)."""
        missing = missing_images(self.get("Node"), refs)
        if missing:
            raise MissingImages(f"nodes of {self.context} lack images: " + "; ".join(
                f"{node}: {', '.join(r)}" for node, r in sorted(missing.items())), fix=import_hint(missing))

    # ---- waiting and watching

    def wait(self, kind, name, pending, *, namespace=None, api_version=None, timeout=120, doing="waiting"):
        """Poll one object until ``pending(obj)`` returns None; return the object.

        ``pending`` gets the object, or None while there is none, and returns what it still waits
        for (a sentence); on timeout that sentence is the LabTimeout's message.
        """
        res = self.resource(kind, api_version)
        ns = self._ns(res, namespace)
        obj, left = None, None

        def done():
            nonlocal obj, left
            obj = self.find(kind, name, namespace=ns, api_version=api_version)
            left = pending(obj)
            return left is None
        wait.until(done, timeout, f"{what(kind, name, ns)}: {doing}", interval=0.5,
                   error=lambda: LabTimeout(f"{what(kind, name, ns)}: {doing} for {timeout:g} s, still {left}",
                                            fix="c.events(kind, name) and the Pods' logs say why; or allow more time"))
        return obj

    def wait_for(self, kind, name, type_, status="True", *, namespace=None, api_version=None, timeout=120):
        """Wait until condition ``type_`` in .status.conditions has ``status``."""
        def pending(obj):
            got = condition(obj, type_) if obj else None
            return None if got == status else ("not there" if obj is None else f"{type_}={got or 'not reported'}")
        return self.wait(kind, name, pending, namespace=namespace, api_version=api_version, timeout=timeout,
                         doing=f"waiting for {type_}={status}")

    def wait_rollout(self, kind, name, *, namespace=None, timeout=180):
        """Wait until a Deployment, StatefulSet or DaemonSet runs its current spec everywhere."""
        return self.wait(kind, name, lambda o: "not there" if o is None else rollout_pending(o, kind),
                         namespace=namespace, timeout=timeout, doing="waiting for the rollout")

    def wait_gone(self, kind, name, *, namespace=None, api_version=None, timeout=120, uid=None):
        """Wait until there is no such object (or, given its ``uid``, until that one is gone)."""
        gone = lambda o: o is None or uid is not None and o["metadata"].get("uid") != uid
        self.wait(kind, name, lambda o: None if gone(o) else "there", namespace=namespace,
                  api_version=api_version, timeout=timeout, doing="waiting for it to be gone")

    def wait_ready(self, *, nodes=None, timeout=300, system_pods=False):
        """Wait until every node is Ready (and ``nodes`` of them registered) and kube-system's pods run."""
        left = ["the API server to answer"]

        def ready():
            nonlocal left
            with contextlib.suppress(NoCluster, ServerError):
                left = readiness(self.get("Node"), self.get("Pod", namespace="kube-system"), expected_nodes=nodes,
                                 system_pods=system_pods)
                return not left
            return False
        wait.until(ready, timeout, f"cluster {self.context} to be ready", interval=2,
                   error=lambda: LabTimeout(f"cluster {self.context} not ready after {timeout:g} s: " + "; ".join(left[:6]),
                                            fix="look at the nodes and kube-system pods; on kind, `docker logs <node>`"))

    def watch(self, kind, *, namespace=None, name=None, label_selector=None, api_version=None, timeout=30,
              resource_version=None):
        """Yield Events as the API server streams them; stop after ``timeout`` seconds (the server ends it).

        Without ``resource_version`` the stream starts with an ADDED event for every object that
        exists (a list, then the changes).
        """
        from kubernetes import watch
        res = self.resource(kind, api_version)
        ns = self._ns(res, namespace)
        with self._errors(kind, name, ns):
            for event in watch.Watch().stream(
                    self.dynamic.get, res, namespace=ns, label_selector=label_selector, serialize=False,
                    field_selector=f"metadata.name={name}" if name else None, resource_version=resource_version,
                    timeout_seconds=max(1, int(timeout)), _request_timeout=timeout + 15):
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    yield Event(event["type"], {"kind": kind, **event["raw_object"]})

    def events(self, kind=None, name=None, *, namespace=None):
        """The Event objects about an object (or a whole namespace), oldest first."""
        selector = ",".join(f"involvedObject.{k}={v}" for k, v in (("kind", kind), ("name", name)) if v)
        found = self.get("Event", namespace=namespace, field_selector=selector or None)
        return sorted(found, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or "")

    # ---- inside Pods

    def logs(self, pod, *, namespace=None, container=None, tail=None, previous=False):
        from kubernetes import client
        ns = namespace or self.namespace
        with self._errors("Pod", pod, ns):
            return client.CoreV1Api(self.api).read_namespaced_pod_log(
                pod, ns, container=container, tail_lines=tail, previous=previous)

    def exec(self, pod, *command, namespace=None, container=None, timeout=60):
        """Run a command in a Pod's container (as ``kubectl exec``); return its Result."""
        from kubernetes import client, stream
        ns = namespace or self.namespace
        with self._errors("Pod", pod, ns):
            ws = stream.stream(client.CoreV1Api(self.api).connect_get_namespaced_pod_exec, pod, ns,
                               command=list(command), container=container, stdin=False, stdout=True,
                               stderr=True, tty=False, _preload_content=False)
        try:
            ws.run_forever(timeout=timeout)
            if ws.is_open():
                raise LabTimeout(f"{' '.join(command)} in Pod {ns}/{pod} still running after {timeout:g} s")
            return Result(ws.returncode, ws.read_stdout() or "", ws.read_stderr() or "")
        finally:
            ws.close()

    # ---- a node's own view, on any cluster

    def node_shell(self, node, script, *args, timeout=60):
        """Run a shell script (busybox sh, ``$1``... from ``args``) in the node Pod on ``node``: the
        node's processes and network, its root at /host. The Pod stays until the namespace goes."""
        pod = node_pod(node, self.namespace)
        name = pod["metadata"]["name"]
        self.apply(pod)
        self.wait_for("Pod", name, "Ready", timeout=120)
        return self.exec(name, "sh", "-c", script, "node-view", *args, timeout=timeout)

    def node_exec(self, node, *command):
        """Run one of the node's own programs (iptables-save, nft, crictl) on the node."""
        return self.node_shell(node, f"exec chroot /host {shlex.join(command)}")

    def pod_processes(self, pod, *, namespace=None):
        """The Pod's processes as its node sees them: pid, command line, container, namespaces."""
        obj = self.get("Pod", pod, namespace=namespace)
        text = self.node_shell(obj["spec"]["nodeName"], _POD_PROCESSES, obj["metadata"]["uid"]).stdout
        return pod_processes(text, obj)

    def sandbox(self, pod, *, namespace=None):
        """The Pod's sandbox on its node: the pause process and the namespaces it holds for the containers."""
        return {"pod": pod, **sandbox_view(self.pod_processes(pod, namespace=namespace))}

    def pod_cgroup(self, pod, *, namespace=None):
        """The Pod-level cgroup files the kubelet wrote on its node, decoded (``cgroup_limits``)."""
        obj = self.get("Pod", pod, namespace=namespace)
        found = cgroup_limits(self.node_shell(obj["spec"]["nodeName"], _POD_CGROUPS, obj["metadata"]["uid"]).stdout)
        if not found["files"]:
            raise LabError(f"no cgroup of Pod {pod} found under /sys/fs/cgroup on {obj['spec']['nodeName']}",
                           fix="is it running? c.get('Pod', name)['status'] says")
        return found

    def service_rules(self, node, service, mode):
        """kube-proxy's rules for ``namespace/name`` on ``node`` in its ``mode``, decoded; None if none."""
        commands = {"nftables": (nftables_service, ("nft", "list", "table", "ip", "kube-proxy")),
                    "iptables": (iptables_service, ("iptables-save", "-t", "nat"))}
        if mode not in commands:
            raise BadInput(f"no rules decoder for kube-proxy mode {mode!r}", fix="iptables or nftables")
        decode, command = commands[mode]
        out = self.node_exec(node, *command)
        if out.returncode:
            raise LabError(f"`{' '.join(command)}` failed on node {node}: {(out.stderr or out.stdout).strip()[:200]}",
                           fix=f"the node needs the {command[0]} program (kube-proxy brings its own, in its container)")
        return decode(out.stdout, service)

    def wait_rules(self, node, service, mode, endpoints, *, timeout=60):
        """Wait until kube-proxy on ``node`` has written all ``endpoints`` of the Service (it syncs
        a moment after the EndpointSlice changes); return the rules."""
        rules, got = None, 0

        def written():
            nonlocal rules, got
            rules = self.service_rules(node, service, mode)
            got = len(rules["endpoints"]) if rules else 0
            return got == endpoints
        wait.until(written, timeout, f"kube-proxy on {node} to write {service}", interval=1,
                   error=lambda: LabTimeout(f"kube-proxy on {node} wrote {got} of {endpoints} endpoints of "
                                            f"{service} in {timeout:g} s",
                                            fix="is kube-proxy running on that node? read its logs"))
        return rules

    # ---- what only kind can do (helpers.kind.KindCluster does it)

    def kind_only(self, what, shows):
        """True on a kind cluster. Elsewhere print what the step would show and how to see it, and
        return False, so that the notebook goes on."""
        print(f"[kind only] {what}: this step would show {shows}. {self.context} is not a kind cluster; "
              "to see it, run this lab on its own kind cluster (unset CNLAB_CONTEXT, install kind).")
        return False

    def node_containers(self):
        self.kind_only("listing the node containers", "each node as a Docker container on this machine")
        return []

    def stop_node(self, node):
        self.kind_only(f"stopping node {node}", "its kubelet going silent, the node Unknown, its Pods evicted")

    def start_node(self, node, *, timeout=180):
        self.kind_only(f"starting node {node}", "the node Ready again and its kubelet finishing the evictions")


def _comparable(obj):
    """An object as YAML lines, without what the server changes on every write."""
    if obj is None:
        return []
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    for key in ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp"):
        obj.get("metadata", {}).pop(key, None)
    return yaml.safe_dump(obj, sort_keys=True).splitlines()


def connect(context=None, *, kubeconfig=None, namespace="default"):
    """A Cluster for a kubeconfig context: the current one unless named."""
    return Cluster(context, kubeconfig=kubeconfig, namespace=namespace)


@owners.sweeper(owners.CLUSTERS)
def sweep(namespace=None):
    """Give back what a Cluster changed and a crash (a dead kernel, an interrupted cell) left:
    its labels, cordons, namespaces and CRDs, from its record. ``namespace`` limits it to one lab's.

    A record whose kubeconfig or context is gone (a deleted kind cluster) has nothing left to give
    back; one whose cluster does not answer now is kept for the next sweep.
    """
    for path in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        record = _load_record(path)
        if record is None:
            path.unlink(missing_ok=True)
            continue
        if namespace and record["namespace"] != namespace:
            continue
        try:
            c = Cluster(record["context"], kubeconfig=record["kubeconfig"], namespace=record["namespace"])
        except NoCluster:
            path.unlink(missing_ok=True)
            continue
        c._owned = [tuple(o) for o in record["owned"]]
        c._labelled = {tuple(item[:3]): item[3] for item in record["labelled"]}
        c._cordoned = list(record["cordoned"])
        try:
            c.tear_down()
        except NoCluster:
            c.close()
