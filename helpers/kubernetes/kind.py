"""kind: a Kubernetes cluster whose nodes are Docker containers on this machine.

kind ("Kubernetes IN Docker") starts one privileged container per node, each running systemd,
containerd and a kubelet, and joins them with kubeadm. Everything a real cluster has is there;
only the "machines" are containers, which is what lets a lab stop a node::

    c = kind.create("pods", workers=2)        # cluster cnlab-pods: a cluster.Cluster
    c.apply("42-pods/single.yaml")
    c.stop_node("cnlab-pods-worker")          # docker stop: the node dies, its Pods with it
    c.tear_down()                             # kind delete cluster

This module is the kind side: the cluster config, the preflight, the ``kind`` command line,
and the node containers (through the Docker SDK). The Kubernetes side, which works on any
cluster, is ``helpers.cluster``; ``KindCluster`` is a ``cluster.Cluster`` that adds the nodes.

Each cluster gets its own kubeconfig file under ``STATE/kind``: creating one never changes
your ``~/.kube/config`` or its current context.

Used in: 41-kind-cluster, 42-pods, 43-workloads, 44-k8s-controller, 45-services, 46-declarative, book/orchestration/kubernetes.
"""
import atexit
import contextlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers._core import names, owners
from helpers.kubernetes import cluster
from helpers.containers import images
from helpers import errors
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool
from helpers._core.names import PREFIX, state_dir

KIND_VERSION = "v0.29.0"       # the kind release the node image below was built for
KUBERNETES_VERSION = "1.33.1"  # what that image runs; manifests are validated against it
KUBECTL_VERSION = f"v{KUBERNETES_VERSION}"  # the workflow and the devcontainer install this one
NODE_IMAGE = ("kindest/node:v1.33.1"
              "@sha256:050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f")
PROXY_MODES = ("iptables", "nftables", "ipvs")  # ipvs: deprecated since Kubernetes 1.35, history here
IPVS_MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack")
MIN_WATCHES, MIN_INSTANCES = 524288, 512   # kind's "known issues": too many open files
MIN_FREE = 5 * 2**30                        # a node image is ~1 GiB; each node writes more
CLUSTER_LABEL, ROLE_LABEL = "io.x-k8s.kind.cluster", "io.x-k8s.kind.role"  # on node containers
_INSTALL = f"install kind {KIND_VERSION}: `go install sigs.k8s.io/kind@{KIND_VERSION}` or its release page"


class KindError(LabError):
    """kind failed, or a cluster is not what was asked for."""


class ClusterExists(KindError, errors.Refused):
    def __init__(self, name, detail=""):
        super().__init__(f"kind cluster {name} already exists{detail}",
                         fix=f"reuse it with reuse=True, or delete it first: kind.delete({name!r})")


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self):
        return f"{self.what}\n    fix: {self.fix}"


class PreflightFailed(KindError):
    """This machine cannot run the cluster asked for; nothing was created."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("kind cannot create this cluster here yet:\n  - "
                         + "\n  - ".join(map(str, self.problems)))


# ------------------------------------------------------------------------------ the config

def cluster_name(name):
    """``pods`` -> ``cnlab-pods``; a name that already carries the prefix is kept."""
    return names.check(names.prefixed(str(name)), "cluster name")


def config(name, *, workers=1, proxy_mode="iptables", image=NODE_IMAGE):
    """kind's Cluster config: one control plane, ``workers`` workers, kube-proxy's mode, the node image."""
    if not isinstance(workers, int) or not 0 <= workers <= 5:
        raise BadInput(f"workers={workers!r}: a kind cluster here has 0 to 5 workers")
    cfg = {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "name": cluster_name(name),
           # one dict per node: a repeated dict would be dumped as YAML anchors (&id001, *id001)
           "nodes": [{"role": role, "image": image} for role in ["control-plane"] + ["worker"] * workers],
           "networking": {"kubeProxyMode": proxy_mode}}
    check_config(cfg)
    return cfg


_SCHEMA = {  # the part of kind.x-k8s.io/v1alpha4 Cluster that the course writes; nothing else
    "type": "object", "additionalProperties": False,
    "required": ["kind", "apiVersion", "name", "nodes"],
    "properties": {
        "kind": {"const": "Cluster"}, "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
        "name": {"type": "string", "pattern": rf"^{PREFIX}-[a-z0-9-]+$"},
        "nodes": {"type": "array", "minItems": 1,
                  "contains": {"properties": {"role": {"const": "control-plane"}}},
                  "items": {"type": "object", "additionalProperties": False, "required": ["role", "image"],
                            "properties": {"role": {"enum": ["control-plane", "worker"]},
                                           "image": {"type": "string", "pattern": r"^[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}$"}}}},
        "networking": {"type": "object", "additionalProperties": False,
                       "properties": {"kubeProxyMode": {"enum": list(PROXY_MODES)}}}}}


def check_config(cfg):
    """Raise BadInput naming every field of a kind config that kind (or the course) would refuse."""
    import jsonschema
    errors = sorted(jsonschema.Draft202012Validator(_SCHEMA).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        raise BadInput("kind config: " + "; ".join(
            f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors))


# ------------------------------------------------------------------------------ preflight

@dataclass(frozen=True)
class Machine:
    """What the preflight needs to know about a machine (``read_machine()`` reads this one)."""
    kind: str | None              # path of the kind binary
    docker_error: str | None      # why no Docker engine answers, or None
    docker_root: str
    free_bytes: int               # free space under docker_root
    max_user_watches: int
    max_user_instances: int
    modules: frozenset            # kernel modules loaded or built in


def problems(machine, proxy_mode="iptables"):
    """Everything that would make ``kind create cluster`` fail or half-fail on this machine."""
    found = []
    if machine.kind is None:
        found.append(Problem("kind is not installed", _INSTALL))
    if machine.docker_error:
        found.append(Problem(machine.docker_error, "start dockerd (`sudo dockerd &`, or `make test` as root)"))
    if machine.max_user_watches < MIN_WATCHES or machine.max_user_instances < MIN_INSTANCES:
        found.append(Problem(
            f"inotify limits too low (max_user_watches {machine.max_user_watches}, max_user_instances "
            f"{machine.max_user_instances}; kind needs {MIN_WATCHES} and {MIN_INSTANCES}): "
            "kubelets fail with 'too many open files'",
            f"sudo sysctl -w fs.inotify.max_user_watches={max(MIN_WATCHES, machine.max_user_watches)} "
            f"fs.inotify.max_user_instances={max(MIN_INSTANCES, machine.max_user_instances)}"))
    if proxy_mode == "ipvs":
        missing = [m for m in IPVS_MODULES if m not in machine.modules]
        if missing:
            found.append(Problem(f"kube-proxy's ipvs mode needs kernel modules that are not loaded: "
                                 f"{', '.join(missing)}", f"sudo modprobe -a {' '.join(missing)}"))
    if machine.free_bytes < MIN_FREE:
        found.append(Problem(f"only {machine.free_bytes / 2**30:.1f} GiB free under {machine.docker_root}"
                             f" (a cluster needs {MIN_FREE // 2**30} GiB)",
                             "free some space, e.g. `docker system prune`"))
    return found


def _modules():
    names = set()
    with contextlib.suppress(OSError):
        names |= {line.split()[0] for line in Path("/proc/modules").read_text().splitlines() if line}
    with contextlib.suppress(OSError):
        builtin = Path("/lib/modules", platform.release(), "modules.builtin").read_text().split()
        names |= {Path(p).name.removesuffix(".ko") for p in builtin}
    with contextlib.suppress(OSError):
        names |= set(os.listdir("/sys/module"))
    return frozenset(n.replace("-", "_") for n in names)


def read_machine():
    docker_error, root = None, "/var/lib/docker"
    try:
        with contextlib.closing(images.client(timeout=10)) as c:
            root = c.info().get("DockerRootDir", root)
    except images.EngineUnavailable as e:
        docker_error = e.message
    where = root if os.path.isdir(root) else "/"
    sysctl = lambda key: int(Path("/proc/sys/fs/inotify", key).read_text())
    return Machine(shutil.which("kind"), docker_error, root, shutil.disk_usage(where).free,
                   sysctl("max_user_watches"), sysctl("max_user_instances"), _modules())


def preflight(proxy_mode="iptables"):
    """Raise PreflightFailed, listing every problem with its fix, unless this machine can run kind."""
    found = problems(read_machine(), proxy_mode)
    if found:
        raise PreflightFailed(found)


# ------------------------------------------------------------------------------ the kind CLI

def _kind(*args, timeout=600):
    if shutil.which("kind") is None:
        raise MissingTool("kind", package=f"kind (not in Debian): {_INSTALL}")
    try:
        out = subprocess.run(["kind", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LabTimeout(f"`kind {' '.join(args)}` did not finish within {timeout} s",
                         fix="is Docker overloaded, or pulling the node image slowly? `docker ps -a` shows the nodes") from e
    if out.returncode:
        tail = "\n".join(out.stderr.strip().splitlines()[-8:])
        raise KindError(f"`kind {' '.join(args)}` failed:\n{tail}",
                        fix="read kind's message above; `docker ps -a` shows the node containers")
    return out.stdout


def clusters():
    """The names of every kind cluster on this machine (the course's are cnlab-*)."""
    return [] if shutil.which("kind") is None else sorted(_kind("get", "clusters").split())


def kubeconfig(name):
    return state_dir("kind") / f"{cluster_name(name)}.kubeconfig"


def create(name, *, workers=1, proxy_mode="iptables", reuse=False, image=NODE_IMAGE, namespace="default",
           timeout=300):
    """Create kind cluster ``cnlab-<name>`` and wait until it is Ready; return its KindCluster.

    A cluster of that name already there is ClusterExists, unless ``reuse``: then it must have
    the same shape, and is returned. Bad arguments and a failed preflight raise before anything
    is made. The readiness wait raises on timeout (kind's own ``--wait`` only warns).
    """
    cfg = config(name, workers=workers, proxy_mode=proxy_mode, image=image)
    full, path = cfg["name"], kubeconfig(name)
    if full in clusters():
        if not reuse:
            raise ClusterExists(full)
        _kind("export", "kubeconfig", "--name", full, "--kubeconfig", str(path))
        found = KindCluster(full, path, namespace=namespace)
        found.check_shape(workers=workers, proxy_mode=proxy_mode)
    else:
        preflight(proxy_mode)
        config_file = state_dir("kind") / f"{full}.yaml"
        config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        _kind("create", "cluster", "--name", full, "--config", str(config_file), "--kubeconfig", str(path),
              timeout=timeout + 300)
        found = KindCluster(full, path, namespace=namespace)
    found.wait_ready(nodes=1 + workers, timeout=timeout, system_pods=True)
    return found


def lab_cluster(lab, *, workers=1, proxy_mode=None, load=(), storage=False, dns=False):
    """The cluster a lab runs on, working in a fresh namespace ``cnlab-<lab>``, with images ``load`` on its nodes.

    By default the kind cluster ``cnlab-<lab>`` (made, or reused after an interrupted run), with
    the images built here and loaded into its nodes. With ``CNLAB_CONTEXT=<context>``, that
    context of your kubeconfig: its nodes must have the images already (a MissingImages error
    says how to import them), and what the lab asks for that the cluster lacks (``workers``
    nodes for ordinary Pods, ``proxy_mode`` if one is named, a default StorageClass with
    ``storage``, cluster DNS with ``dns``) is printed and kept in ``c.lacks``, for the lab's cells to adapt to.

    What an earlier, interrupted run of the lab left in the namespace is deleted first; the
    lab's ``tear_down`` (in its last cell's ``finally``, and at the kernel's exit) gives the
    cluster back as it was.
    """
    context = os.environ.get("CNLAB_CONTEXT")
    namespace = names.name(lab)
    if context:
        c = cluster.connect(context, namespace=namespace)
        c.check_images(list(load))              # before anything is made
    else:
        c = create(lab, workers=workers, proxy_mode=proxy_mode or "iptables", reuse=True, namespace=namespace)
        if load:
            c.load_image(*[_build(ref) for ref in load])
    cluster.sweep(namespace)                   # what a crashed run left
    c.delete("Namespace", namespace, timeout=300)
    c.ensure_namespace()
    atexit.register(_quietly, c.tear_down)     # the kernel's normal exit gives the cluster back too
    c.facts_ = c.facts()                       # (kube-proxy's mode may need the node view: after the namespace)
    c.lacks = cluster.lacking(c.facts_, workers=workers, proxy_mode=proxy_mode, storage=storage, dns=dns) \
        if context else []
    for line in c.lacks:
        print(f"note: {context}: {line}")
    return c


def _quietly(tear_down):
    with contextlib.suppress(LabError):  # at exit, an unreachable cluster is the sweep's to retry
        tear_down()


def _build(ref):
    """A course image named ``cnlab/busybox:<tag>``, built here if this engine lacks it."""
    repo, _, tag = ref.partition(":")
    if repo != images.BUSYBOX:
        return ref
    return images.busybox(tag or "latest")


def delete(name):
    """Delete kind cluster ``cnlab-<name>`` and its kubeconfig; "already gone" is success."""
    full = cluster_name(name)
    if shutil.which("kind") is not None:
        _kind("delete", "cluster", "--name", full, "--kubeconfig", str(kubeconfig(full)))
    for suffix in (".kubeconfig", ".yaml"):
        (state_dir("kind") / f"{full}{suffix}").unlink(missing_ok=True)


def _current_kind_cluster():
    """The kind cluster that the user's own kubeconfig currently points at (never swept)."""
    try:
        from kubernetes import config as kube_config
        _, active = kube_config.list_kube_config_contexts()
        return active["context"]["cluster"].removeprefix("kind-")
    except Exception:  # no kubeconfig, or no current context: nothing to spare
        return None


@owners.sweeper(owners.CLUSTERS)
def sweep():
    """Delete every cnlab-* kind cluster, except the one your current kubeconfig context names."""
    keep = _current_kind_cluster()
    try:
        found = clusters()
    except KindError:  # no Docker engine: no node container can be alive
        return
    for name in found:
        if name.startswith(f"{PREFIX}-") and name != keep:
            delete(name)


# ------------------------------------------------------------------------------ nodes

@dataclass(frozen=True)
class Node:
    """A node as Docker sees it: a container."""
    name: str
    role: str      # control-plane or worker
    state: str     # Docker's: running, exited, ...
    ip: str


class KindCluster(cluster.Cluster):
    """A cluster.Cluster whose nodes are containers: list, stop, start and exec into them."""

    def __init__(self, name, kubeconfig_path, *, namespace="default"):
        super().__init__(f"kind-{name}", kubeconfig=str(kubeconfig_path), namespace=namespace)
        self.kind = name

    def kind_only(self, what, shows):
        return True

    def node_containers(self):
        with contextlib.closing(images.client()) as c:
            found = c.containers.list(all=True, filters={"label": f"{CLUSTER_LABEL}={self.kind}"})
            return sorted((Node(n.name, n.labels.get(ROLE_LABEL, "?"), n.status,
                                n.attrs["NetworkSettings"]["Networks"].get("kind", {}).get("IPAddress", ""))
                           for n in found), key=lambda n: (n.role != "control-plane", n.name))

    def _container(self, client, node):
        if node not in {n.name for n in self.node_containers()}:
            raise BadInput(f"{node!r} is not a node of {self.kind}",
                           fix=f"its nodes: {', '.join(n.name for n in self.node_containers())}")
        return client.containers.get(node)

    def node_exec(self, node, *command):
        """Run a command inside a node container (it has iptables, nft, crictl, ip, ...): the same
        view as the node Pod's, through Docker."""
        with contextlib.closing(images.client()) as c:
            code, (out, err) = self._container(c, node).exec_run(list(command), demux=True)
        return cluster.Result(code, (out or b"").decode(), (err or b"").decode())

    def stop_node(self, node):
        """``docker stop`` the node: its kubelet stops reporting, as when a machine dies."""
        with contextlib.closing(images.client()) as c:
            self._container(c, node).stop(timeout=10)

    def start_node(self, node, *, timeout=180):
        with contextlib.closing(images.client()) as c:
            self._container(c, node).start()
        self.wait_for("Node", node, "Ready", timeout=timeout)

    def load_image(self, *refs):
        """Copy locally built images into every node's containerd (no registry needed)."""
        with contextlib.closing(images.client()) as c:
            for ref in refs:
                try:
                    c.images.get(ref)
                except Exception as e:
                    raise BadInput(f"no local image {ref}", fix="build it first, e.g. images.busybox()") from e
        _kind("load", "docker-image", *refs, "--name", self.kind)

    def check_shape(self, *, workers, proxy_mode):
        roles = [n.role for n in self.node_containers()]
        mode = self.proxy_mode()
        if roles.count("control-plane") != 1 or roles.count("worker") != workers or mode != proxy_mode:
            raise ClusterExists(self.kind, f" with {roles.count('worker')} workers and kube-proxy mode {mode}, "
                                           f"not {workers} and {proxy_mode}")

    def tear_down(self):
        """Delete the whole cluster: the namespace and everything else go with it."""
        self.close()
        self._owned, self._labelled, self._cordoned = [], {}, []
        self._record()
        if self.kind in clusters():
            delete(self.kind)
            return [f"kind cluster {self.kind} deleted"]
        return []


