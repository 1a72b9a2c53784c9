"""A controller against the real Kubernetes API: ``Website`` objects reconciled into pods.

A ``Website`` (group ``cnlab.example``, a CustomResourceDefinition served by the real API
server of ``helpers.apiserver``) says *what* should run: an image, a page to serve, a number
of replicas. This controller makes it so through the CRI, as the kubelet would: one pod
sandbox per replica in the course's containerd, each with one ``web`` container serving the
page with busybox's httpd. It is a teaching model of a Kubernetes controller (a ReplicaSet and
a kubelet in one, for one machine), not something to run workloads on.

- Level-triggered: every pass lists all the Websites and all the pods and acts on the
  difference. A watch on Websites (from the resourceVersion of the list) only wakes it early;
  the runtime has no watch (the kubelet re-lists it too), so a pass also runs every ``resync``
  seconds. Nothing is kept between passes: stop the controller, change anything, start a new
  one, and it converges.
- Status is written back through the ``status`` subresource: what it saw, for the generation
  of the spec it saw (``observedGeneration``), and a ``Ready`` condition.
- A finalizer holds a Website's deletion until its pods are gone.

Used in: 34-kubernetes-api, 35-api-controller, book/orchestration/kubernetes-api.
"""
import contextlib
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from helpers._core import loop, wait
from helpers.containers import cri

if TYPE_CHECKING:
    import kubernetes.client

GROUP, VERSION, KIND, PLURAL = "cnlab.example", "v1", "Website", "websites"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = f"{GROUP}/pods"             # "my pods must go before this object does"
SITE = f"{GROUP}/website"               # pod label: the Website that owns it
TEMPLATE = f"{GROUP}/template"          # pod label: a hash of the spec it was made from
PORT = 8080
# The web container: write the page, then serve it (busybox's httpd, in the foreground).
SERVE = ["sh", "-c", f'mkdir -p /www && printf "%s\\n" "$PAGE" > /www/index.html '
                     f'&& exec httpd -f -p {PORT} -h /www']

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": KIND, "plural": PLURAL, "singular": "website", "shortNames": ["web"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
                {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "A web site: pods serving one page, as many as asked for.",
                "properties": {
                    "spec": {
                        "type": "object", "required": ["image", "replicas"],
                        "description": "What should run: the controller makes it so.",
                        "properties": {
                            "image": {"type": "string", "minLength": 1,
                                      "description": "The image of the web container."},
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 5,
                                         "description": "How many pods serve the page."},
                            "page": {"type": "string", "maxLength": 1024, "default": "hello",
                                     "description": "The text of index.html."},
                        },
                        # A rule in CEL, checked by the API server: images are built here, never pulled.
                        "x-kubernetes-validations": [{
                            "rule": "self.image.startsWith('localhost/')",
                            "message": "this machine pulls no images: use one built here, "
                                       "such as localhost/cnlab/busybox:1"}],
                    },
                    "status": {
                        "type": "object",
                        "description": "What the controller saw, for the spec of observedGeneration.",
                        "properties": {
                            "observedGeneration": {"type": "integer"},
                            "replicas": {"type": "integer"},
                            "readyReplicas": {"type": "integer"},
                            "conditions": {"type": "array", "items": {
                                "type": "object", "required": ["type", "status"],
                                "properties": {k: {"type": "string"}
                                               for k in ("type", "status", "reason", "message")}}},
                        },
                    },
                },
            }},
        }],
    },
}


def website(name: str, *, image: str, replicas: int, page: str | None = None,
            namespace: str = "default") -> dict[str, Any]:
    """A Website manifest (a dict). Nothing checks it here: the API server does, for real."""
    spec: dict[str, Any] = {"image": image, "replicas": replicas}
    if page is not None:
        spec["page"] = page
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _objects(api):
    from kubernetes import client
    return client.CustomObjectsApi(api)


# ---------------------------------------------------------------------- actual state (CRI)

@dataclass(frozen=True)
class Replica:
    """One pod of a Website, as the controller sees it through the CRI."""
    pod: cri.PodInfo
    site: str              # "<namespace>/<name>" of the owning Website
    template: str
    running: bool          # the sandbox is ready and its web container runs

    @property
    def name(self) -> str:
        return self.pod.name


def replicas(runtime: cri.Client, site: str | None = None) -> list[Replica]:
    """The Websites' pods in the runtime (all of them, or those of ``"namespace/name"``)."""
    running_in = {c.pod_id for c in runtime.containers(labels=cri.OWNER)
                  if c.name == "web" and c.state == "CONTAINER_RUNNING"}
    found = []
    for pod in runtime.pods(labels=cri.OWNER):
        owner = pod.labels.get(SITE)
        if owner is None or (site is not None and owner != site):
            continue
        found.append(Replica(pod, owner, pod.labels.get(TEMPLATE, ""),
                             pod.state == "SANDBOX_READY" and pod.id in running_in))
    return sorted(found, key=lambda r: r.name)


def remove_pod(runtime: cri.Client, pod: cri.PodInfo) -> None:
    """Stop and remove one pod and what ``cri.Pod`` made for it (its log folder, its cgroup)."""
    with contextlib.suppress(cri.NotFound):
        runtime.stop_pod(pod.id)
        runtime.remove_pod(pod.id)
    cri.forget(pod.namespace, pod.name, pod.uid)


def _template(spec):
    """What a pod is made from: a change here replaces the pods; a change of replicas does not."""
    text = json.dumps({"image": spec["image"], "page": spec.get("page", "")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _start_pod(runtime, namespace, name, spec):
    pod = cri.Pod(runtime, f"{name}-{secrets.token_hex(3)}", namespace=namespace,
                  labels={SITE: f"{namespace}/{name}", TEMPLATE: _template(spec)})
    pod.start()
    try:
        pod.add("web", spec["image"], SERVE, env={"PAGE": spec.get("page", "")})
    except BaseException:
        pod.remove()
        raise
    return pod.name


# ---------------------------------------------------------------------- the controller

@dataclass(frozen=True)
class Action:
    verb: str     # "create", "delete", "finalize", "adopt" or "failed"
    site: str
    why: str

    def __str__(self) -> str:
        return f"{self.verb} {self.site}: {self.why}"


class Controller(loop.Runs):
    """Reconcile every Website of ``namespace`` with the runtime's pods, in a thread.

    ``api``: a ``kubernetes.client.ApiClient``; ``runtime``: a ``cri.Client``. ``actions``
    keeps the last 200 things it did, newest last.
    """

    def __init__(self, api: "kubernetes.client.ApiClient", runtime: cri.Client, *,
                 namespace: str = "default", resync: float = 2.0) -> None:
        self.api, self.runtime = api, runtime
        self.namespace = namespace
        self.resync = resync
        self.passes = 0
        self._version: str | None = None  # of the last pass's list: the watch wakes the loop for what came after
        self._loop = loop.Loop(lambda keys: self.reconcile_once(), resync=resync, name="cnlab-websites",
                               watches=[loop.Watch(PLURAL, self._watch)], on_error=self._failed)
        self.actions = self._loop.log

    # -- one pass --

    def reconcile_once(self) -> str:
        """List everything, act on the differences; return the list's resourceVersion."""
        listing = _objects(self.api).list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        by_site: dict[str, list[Replica]] = {}
        for replica in replicas(self.runtime):
            by_site.setdefault(replica.site, []).append(replica)
        for obj in listing["items"]:
            meta = obj["metadata"]
            self._reconcile(obj, by_site.pop(f"{meta['namespace']}/{meta['name']}", []))
        for site, orphans in by_site.items():  # pods whose Website is gone (a finalizer was forced)
            if site.startswith(self.namespace + "/"):
                for replica in orphans:
                    remove_pod(self.runtime, replica.pod)
                    self._did("delete", site, f"pod {replica.name}: its Website no longer exists")
        self.passes += 1
        self._version = listing["metadata"]["resourceVersion"]
        return self._version

    def _did(self, verb, site, why):
        self.actions.append(Action(verb, site, why))

    def _reconcile(self, obj, pods):
        from kubernetes.client.exceptions import ApiException
        meta, spec = obj["metadata"], obj["spec"]
        site = f"{meta['namespace']}/{meta['name']}"
        try:
            if meta.get("deletionTimestamp"):
                return self._finalize(obj, pods)
            if FINALIZER not in meta.get("finalizers", []):
                self._patch(obj, {"metadata": {"finalizers": [*meta.get("finalizers", []), FINALIZER],
                                               "resourceVersion": meta["resourceVersion"]}})
                self._did("adopt", site, f"finalizer {FINALIZER} added")
            template = _template(spec)
            keep = [p for p in pods if p.running and p.template == template]
            for p in pods:
                if p not in keep:
                    why = "made from an older spec" if p.template != template else "its web container is not running"
                    remove_pod(self.runtime, p.pod)
                    self._did("delete", site, f"pod {p.name}: {why}")
            for p in keep[spec["replicas"]:]:
                remove_pod(self.runtime, p.pod)
                self._did("delete", site, f"pod {p.name}: more than {spec['replicas']} replicas")
            ready, problem = min(len(keep), spec["replicas"]), None
            for _ in range(spec["replicas"] - len(keep)):
                try:
                    name = _start_pod(self.runtime, meta["namespace"], meta["name"], spec)
                except cri.CriError as e:
                    problem = str(e)
                    self._did("failed", site, problem)
                    break
                ready += 1
                self._did("create", site, f"pod {name}")
            self._write_status(obj, ready, problem)
        except ApiException as e:
            if e.status not in (404, 409):  # gone, or changed since the list: the next pass sees it
                raise

    def _finalize(self, obj, pods):
        meta = obj["metadata"]
        site = f"{meta['namespace']}/{meta['name']}"
        for p in pods:
            remove_pod(self.runtime, p.pod)
            self._did("delete", site, f"pod {p.name}: its Website is being deleted")
        if FINALIZER in meta.get("finalizers", []):
            rest = [f for f in meta["finalizers"] if f != FINALIZER]
            self._patch(obj, {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}})
            self._did("finalize", site, f"pods gone, finalizer {FINALIZER} removed")

    def _patch(self, obj, body):
        """A merge patch carrying the resourceVersion we read: refused (409) if it changed."""
        meta = obj["metadata"]
        _objects(self.api).patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL,
                                                          meta["name"], body)

    def _write_status(self, obj, ready, problem):
        meta, spec = obj["metadata"], obj["spec"]
        done = ready == spec["replicas"]
        condition = {"type": "Ready", "status": "True" if done else "False",
                     "reason": "AllReplicasRunning" if done else ("CreateFailed" if problem else "Reconciling"),
                     "message": problem or f"{ready}/{spec['replicas']} pods running"}
        status = {"observedGeneration": meta["generation"], "replicas": ready, "readyReplicas": ready,
                  "conditions": [condition]}
        if obj.get("status") != status:  # writing only changes keeps the watch (and etcd) quiet
            _objects(self.api).patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
                {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status})

    # -- the loop (running, start, stop: loop.Runs) --

    stop_timeout = 15.0

    def _watch(self):
        """Websites changed since the last pass's list: wake up. It ends after ``resync`` seconds."""
        from kubernetes import watch
        w = watch.Watch()
        events = w.stream(_objects(self.api).list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          PLURAL, resource_version=self._version, timeout_seconds=max(1, round(self.resync)))
        return loop.Stream(events, w.stop)

    def _failed(self, where, e):
        """An API or runtime hiccup: say so; the loop tries again."""
        line = (str(e).splitlines() or [""])[0][:200]
        self._did("failed", "-", ("" if where == "pass" else f"watch {where}: ") + f"{type(e).__name__}: {line}")

    def __repr__(self) -> str:
        return f"<websites.Controller {self.namespace} {'running' if self.running else 'stopped'}>"


def converged(api: "kubernetes.client.ApiClient", runtime: cri.Client, name: str, *,
              namespace: str = "default") -> bool:
    """True when the pods and the status of Website ``name`` both match its current spec."""
    obj = _objects(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    spec, status = obj["spec"], obj.get("status", {})
    pods = replicas(runtime, f"{namespace}/{name}")
    good = [p for p in pods if p.running and p.template == _template(spec)]
    return (len(good) == len(pods) == spec["replicas"]
            and status.get("observedGeneration") == obj["metadata"]["generation"]
            and status.get("readyReplicas") == spec["replicas"])


def wait_converged(api: "kubernetes.client.ApiClient", runtime: cri.Client, name: str, *,
                   namespace: str = "default", timeout: float = 60.0) -> float:
    """Wait until ``converged()``; return the seconds it took."""
    started = time.monotonic()
    wait.until(lambda: converged(api, runtime, name, namespace=namespace), timeout,
               f"Website {namespace}/{name} converging", interval=0.2,
               fix="is the controller running? read its .actions")
    return time.monotonic() - started


def sweep() -> None:
    """Remove every Website pod left in the course's containerd (``containerd.sweep_pods()`` removes every
    course pod, these included; this is the narrower one a lab can call)."""
    from helpers.containers import containerd
    if containerd.pid() and containerd.SOCKET.exists():
        with contextlib.suppress(cri.CriError), cri.Client(containerd.SOCKET, timeout=10) as runtime:
            for replica in replicas(runtime):
                remove_pod(runtime, replica.pod)
