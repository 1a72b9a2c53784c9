"""A controller in the Kubernetes style, written with the kubernetes client's list and watch (lab 44).

``Controller`` is the generic part, on the course's one controller loop (``helpers._core.loop``):
level-triggered, a relist of every watched kind every ``resync`` seconds, one watch per kind that
only wakes it early, each key reconciled once however often it was queued. The Echo functions
are the example: an Echo custom resource (manifests/44-controller) owns a Deployment that says
its message.

Used in: 44-k8s-controller, book/orchestration/kubernetes.
"""
from helpers._core import loop
from helpers.errors import LabError
from helpers.kubernetes.cluster import ECHO_API, FIELD_MANAGER, connect, load, plain


class Controller(loop.Runs):
    """A level-triggered reconcile loop on the client's list and watch, in threads.

    ``sources`` are (kind, apiVersion, label selector, key): ``key(obj)`` turns an object of
    that kind into a key (the name of a primary object). Every ``resync`` seconds the controller
    lists every kind and queues every key (client-go's informers resync from their cache, and
    list again when a watch breaks; this controller keeps no cache, so it lists); a watch per kind
    queues the key of each event between. Each key queued is handed once to
    ``reconcile(cluster, key)``, which compares desired with actual state, acts, and returns a
    sentence saying what it did (or None); a failure is tried again a second later. A watch that
    keeps failing (an etcd without watch progress answers "504 Too large resource version") is
    opened again with a growing pause, and the relist still comes: a broken watch delays a fix
    but never loses it. Nothing is kept between runs, so a restarted controller simply catches up.
    """

    def __init__(self, cluster, reconcile, sources, *, resync=5):
        self.target, self.cluster = cluster, None
        self.reconcile, self.sources, self.resync = reconcile, list(sources), resync
        self._loop = loop.Loop(self._pass, resync=resync, name="cnlab-operator", on_error=self._failed,
                               watches=[loop.Watch(kind, self._watcher(kind, version, selector),
                                                   lambda event, key=key: key(event.object))
                                        for kind, version, selector, key in self.sources])
        self.log = self._loop.log
        self.stop_timeout = resync + 20   # a watch ends on the server's time, ``resync`` seconds

    def start(self):
        if self.running:
            return self
        # A client of its own: the notebook goes on using the cluster's while the threads run.
        t = self.target
        self.cluster = connect(t.context, kubeconfig=t.kubeconfig, namespace=t.namespace)
        return super().start()

    def stop(self, timeout=None):
        """Stop watching and working, and close its own client."""
        super().stop(timeout)
        if self.cluster is not None:
            self.cluster.close()

    def _watcher(self, kind, api_version, selector):
        """Open a watch of ``kind``: from a list of its own (ADDED for every object), ``resync`` seconds long."""
        return lambda: self.cluster.watch(kind, api_version=api_version, label_selector=selector,
                                          timeout=self.resync)

    def _pass(self, keys):
        """Reconcile ``keys``, or with None (a resync) every key a list of each kind names."""
        if keys is None:
            keys = {k for kind, version, selector, key in self.sources
                    for obj in self.cluster.get(kind, api_version=version, label_selector=selector)
                    if (k := key(obj))}
        for key in sorted(keys):
            try:
                did = self.reconcile(self.cluster, key)
                if did:
                    self.log.append(did)
            except LabError as e:  # level-triggered: try again soon, from the state as it is then
                self.log.append(f"{key}: {e.message}")
                self._loop.wake(key, after=1.0)

    def _failed(self, where, e):
        what = "list" if where == "pass" else f"watch {where}"
        self.log.append(f"{what}: {e.message if isinstance(e, LabError) else f'{type(e).__name__}: {e}'}")


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
    """What an Echo's status should say, from its Deployment's.

    Its Pods are counted as ready only if they are of the current template and available, and
    only once the Deployment controller has seen the current spec (``observedGeneration``): the
    Deployment's ``readyReplicas`` counts old and new Pods alike, so mid-rollout it would say
    Ready too soon. Ready is what kubectl calls "successfully rolled out", for as many replicas
    as the Echo asks: every Pod of the current template, and each available.
    """
    echo, dep = plain(echo), plain(deployment) or {}
    st, want = dep.get("status") or {}, echo["spec"].get("replicas", 1)
    seen = bool(dep) and (st.get("observedGeneration") or 0) >= (dep["metadata"].get("generation") or 0)
    updated = st.get("updatedReplicas") or 0
    old = (st.get("replicas") or 0) - updated  # Pods of an older template, still there
    ready = max(0, (st.get("availableReplicas") or 0) - old) if seen else 0
    done = seen and old == 0 and updated == ready == want
    return {"observedGeneration": echo["metadata"].get("generation"), "replicas": want, "readyReplicas": ready,
            "conditions": [{"type": "Ready", "status": "True" if done else "False",
                            "reason": "AllReplicasReady" if done else "WaitingForReplicas"}]}


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
