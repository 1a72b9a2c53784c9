"""A controller in the Kubernetes style, written with the kubernetes client's watch (lab 44).

``Controller`` is the generic part: level-triggered, one watch thread per kind, one worker
reconciling each key once however often it was queued. The Echo functions are the example:
an Echo custom resource (manifests/44-controller) owns a Deployment that says its message.
"""
import queue
import threading
from collections import deque

from helpers.kubernetes.cluster import ECHO_API, FIELD_MANAGER, connect, load, plain
from helpers.errors import LabError


class Controller:
    """A level-triggered reconcile loop, on the client's watch, in threads.

    ``sources`` are (kind, apiVersion, label selector, key): one thread watches each kind and
    turns every event into a key (the name of a primary object) with ``key(obj)``; one worker
    takes keys off a queue, each once however often it was queued, and calls
    ``reconcile(cluster, key)``, which compares desired with actual state, acts, and returns a
    sentence saying what it did (or None). Each watch ends after ``resync`` seconds and a new
    one starts with an ADDED event per object: a missed event delays a fix but never loses it.
    Nothing is kept between runs, so a restarted controller simply catches up.
    """

    def __init__(self, cluster, reconcile, sources, *, resync=5):
        self.target, self.cluster = cluster, None
        self.reconcile, self.sources, self.resync = reconcile, list(sources), resync
        self.log = deque(maxlen=200)
        self._queue, self._queued, self._lock = queue.Queue(), set(), threading.Lock()
        self._stop, self._threads = threading.Event(), []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        # A client of its own: the notebook goes on using the cluster's while the threads run.
        t = self.target
        self.cluster = connect(t.context, kubeconfig=t.kubeconfig, namespace=t.namespace)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._watch, args=s, daemon=True) for s in self.sources]
        self._threads.append(threading.Thread(target=self._work, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        """Stop watching and working (within ``resync`` seconds: a watch ends on the server's time)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.resync + 20)
        self.cluster.close()

    @property
    def running(self):
        return any(t.is_alive() for t in self._threads)

    def _enqueue(self, key):
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
        self._queue.put(key)

    def _watch(self, kind, api_version, selector, key):
        while not self._stop.is_set():
            try:
                for event in self.cluster.watch(kind, api_version=api_version, label_selector=selector,
                                                timeout=self.resync):
                    if k := key(event.object):
                        self._enqueue(k)
                    if self._stop.is_set():
                        return
            except LabError as e:
                self.log.append(f"watch {kind}: {e.message}")
                self._stop.wait(1)

    def _work(self):
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._queued.discard(key)
            try:
                did = self.reconcile(self.cluster, key)
                if did:
                    self.log.append(did)
            except LabError as e:  # level-triggered: try again soon, from the state as it is then
                self.log.append(f"{key}: {e.message}")
                self._stop.wait(1)
                self._enqueue(key)


def echo_deployment(echo):
    """The Deployment an Echo asks for: manifests/44-controller/echo-deployment.yaml, named, sized, owned."""
    echo = plain(echo)
    meta, spec = echo["metadata"], echo["spec"]
    labels = {"app.kubernetes.io/name": "echo", "cnlab/echo": meta["name"]}
    dep = load("44-controller/echo-deployment.yaml")[0]
    dep["metadata"] = {"name": f"echo-{meta['name']}", "namespace": meta.get("namespace"), "labels": labels,
                       "ownerReferences": [{"apiVersion": ECHO_API, "kind": "Echo", "name": meta["name"],
                                            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]}
    dep["spec"]["replicas"] = spec.get("replicas", 1)
    dep["spec"]["selector"] = {"matchLabels": {"cnlab/echo": meta["name"]}}
    dep["spec"]["template"]["metadata"]["labels"] = labels
    dep["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "MESSAGE", "value": spec["message"]}]
    return dep


def echo_drift(live, desired):
    """How the live Deployment differs from the desired one, in the fields the controller owns."""
    if live is None:
        return [f"created Deployment {desired['metadata']['name']} ({desired['spec']['replicas']} replicas)"]
    live, found = plain(live), []
    if live["spec"].get("replicas") != desired["spec"]["replicas"]:
        found.append(f"replicas {live['spec'].get('replicas')} -> {desired['spec']['replicas']}")
    env = lambda d: d["spec"]["template"]["spec"]["containers"][0].get("env")
    if env(live) != env(desired):
        found.append(f"message -> {env(desired)[0]['value']!r}")
    return found


def echo_status(echo, deployment):
    """What an Echo's status should say, from its Deployment's."""
    echo, st = plain(echo), (plain(deployment) or {}).get("status") or {}
    want, ready = echo["spec"].get("replicas", 1), st.get("readyReplicas") or 0
    return {"observedGeneration": echo["metadata"].get("generation"), "replicas": want, "readyReplicas": ready,
            "conditions": [{"type": "Ready", "status": "True" if ready == want else "False",
                            "reason": "AllReplicasReady" if ready == want else "WaitingForReplicas"}]}


def reconcile_echo(c, name):
    """One pass for Echo ``name``: its Deployment made to match its spec, then its status updated."""
    echo = c.find("Echo", name)
    if echo is None or echo["metadata"].get("deletionTimestamp"):
        return None  # the garbage collector deletes its Deployment: the ownerReference says so
    desired = echo_deployment(echo)
    drift = echo_drift(c.find("Deployment", desired["metadata"]["name"]), desired)
    [live] = c.apply(desired, field_manager=f"{FIELD_MANAGER}-echo-controller", force=True)
    status = echo_status(echo, live)
    if status != echo.get("status"):
        c.patch("Echo", name, {"status": status}, subresource="status",
                field_manager=f"{FIELD_MANAGER}-echo-controller")
    if drift or status != echo.get("status"):
        return f"echo {name}: " + "; ".join(drift + [f"{status['readyReplicas']}/{status['replicas']} ready"])
    return None


def echo_controller(c, *, resync=5):
    """The controller for Echo objects in ``c.namespace``: reconcile_echo on every Echo and owned Deployment."""
    return Controller(c, reconcile_echo, [
        ("Echo", ECHO_API, None, lambda o: o["metadata"]["name"]),
        ("Deployment", "apps/v1", "cnlab/echo", lambda o: o["metadata"]["labels"]["cnlab/echo"])], resync=resync)
