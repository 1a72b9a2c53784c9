"""The course's own containerd, with its CRI plugin: a second instance beside Docker's.

Docker's containerd (/run/containerd/containerd.sock) is never touched. This one keeps its
config, metadata (root), state, sockets, CNI config and runc state under /run/cnlab/containerd,
so that everything it creates carries ``cnlab`` in a path::

    with containerd.Containerd() as daemon:           # started, its images imported
        client = cri.Client(daemon.address)            # speak CRI to it, as the kubelet does
        daemon.ctr("containers", "ls")                 # or look underneath with ctr

Its images are built here, never pulled: a busybox image and the pod sandbox ("pause") image,
written by helpers.oci and imported with ``ctr images import`` into the ``k8s.io`` namespace,
the one the CRI plugin serves. Leaving the block removes every pod, stops the daemon and its
shims, and removes its folder; ``sweep()`` does the same after a crash.

Used in: 27-containerd-cri, 35-api-controller, book/containers/oci-docker-cri, book/orchestration/kubernetes-api.
"""
import contextlib
import json
import os
import shutil
import subprocess
from typing import Any

from helpers.containers import cgroups, cri, oci
from helpers._core import daemon, names, owners, procfs
from helpers.errors import LabError, LabTimeout, MissingTool

HOME = names.STATE / "containerd"   # everything of this instance lives here
SOCKET = HOME / "containerd.sock"
NAMESPACE = "k8s.io"                    # containerd namespace of the CRI plugin
PAUSE = "localhost/cnlab/pause:1"       # "localhost/...": a local name, like podman's builds
BUSYBOX = "localhost/cnlab/busybox:1"
SUBNET = "10.88.77.0/24"                # pods' addresses: only this machine's own bridge
BRIDGE = names.name("br0")          # cnlab-br0, made by the CNI bridge plugin
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")   # Debian's, then upstream's
# The pause process: hold the pod's namespaces, do nothing, leave at once when asked to.
PAUSE_SCRIPT = """#!/bin/sh
# The pod's sandbox: it holds the pod's namespaces so that its containers can join them.
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
"""

_CONFIG = """\
# The course's containerd (written by helpers.containerd). Keys: containerd 1.6's
# `containerd config default`, and containerd-config.toml(5).
version = 2
root = "{home}/root"
state = "{home}/state"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{home}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This machine refuses to lower oom_score_adj; without this runc fails with
  # "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Pods' network namespaces under our state folder, not /var/run/netns.
  netns_mounts_under_state_dir = true

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{home}/cni"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{home}/runc"
"""


class ContainerdError(LabError):
    """The course's containerd would not start, or ctr refused a command."""


def _cni_bin():
    for folder in CNI_BIN_DIRS:
        if os.path.isfile(f"{folder}/bridge"):
            return folder
    raise MissingTool("the CNI plugins", package="containernetworking-plugins")


def conflist() -> dict[str, Any]:
    """The pod network: a bridge on this machine, addresses from SUBNET, no NAT to the outside."""
    return {"cniVersion": "1.0.0", "name": names.PREFIX, "plugins": [
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                  "dataDir": str(HOME / "cni-ipam")}}]}


def config(snapshotter: str = "overlayfs") -> str:
    """The config.toml text of the course's containerd."""
    return _CONFIG.format(home=HOME, socket=SOCKET, pause=PAUSE, cni_bin=_cni_bin(),
                          snapshotter=snapshotter)


def images() -> oci.Layout:
    """The course's two containerd images, in one OCI layout (they share the busybox layer)."""
    layout = oci.Layout.create(HOME / "images")
    base = oci.busybox_layer()
    layout.add_image(BUSYBOX, [base], cmd=["sh"])
    layout.add_image(PAUSE, [base, oci.layer({"pause": PAUSE_SCRIPT}, comment="the pause script")],
                     entrypoint=["/pause"])
    return layout


def _is_daemon(p: procfs.Process) -> bool:
    return p.line.startswith("containerd ") and f"--config {HOME / 'config.toml'}" in p.line


def _is_shim(p: procfs.Process) -> bool:
    return p.line.startswith("containerd-shim") and str(SOCKET) in p.line


def pid() -> int | None:
    """The pid of the course's containerd, or None."""
    return next((p.pid for p in procfs.processes(_is_daemon)), None)


class Containerd:
    """The course's containerd daemon; ``start()`` (or ``with``) runs it, ``stop()`` ends it.

    It runs as a ``helpers._core.daemon.Daemon``: it dies with the process that started it.
    """

    address = str(SOCKET)
    namespace = NAMESPACE

    def __init__(self) -> None:
        self.daemon: daemon.Daemon | None = None
        self.snapshotter: str | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        """The containerd process (a ``subprocess.Popen``) while it runs, else None."""
        return self.daemon.process if self.daemon else None

    def start(self, timeout: float = 30) -> "Containerd":
        """Write the config and the CNI network, start containerd, wait until its CRI plugin
        answers, then import the course's images. overlayfs is used where it works, else the
        ``native`` snapshotter (plain copies)."""
        for tool in ("containerd", "ctr", "runc"):
            if shutil.which(tool) is None:
                raise MissingTool(tool, package="containerd")
        running = pid()
        if running:
            raise ContainerdError(f"the course's containerd is already running (pid {running})",
                                  fix="stop it first: helpers.containerd.sweep()")
        try:
            self._run("overlayfs", timeout)
            if not self._plugin_ok("io.containerd.snapshotter.v1", "overlayfs"):
                self.stop()
                self._run("native", timeout)
            self.import_layout(images())
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, snapshotter, timeout):
        HOME.mkdir(parents=True, exist_ok=True)
        (HOME / "config.toml").write_text(config(snapshotter))
        (HOME / "cni").mkdir(exist_ok=True)
        (HOME / "cni" / "10-cnlab.conflist").write_text(json.dumps(conflist(), indent=2))
        self.snapshotter = snapshotter
        # The pods' bridge lives as long as the daemon: made now, not by the first pod's CNI call.
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], capture_output=True)
        self.daemon = daemon.Daemon(["containerd", "--config", str(HOME / "config.toml")],
                                    log=HOME / "containerd.log", what="containerd",
                                    error=ContainerdError)
        with cri.Client(self.address, timeout=2) as client:
            def answers():
                with contextlib.suppress(cri.RuntimeUnavailable, LabTimeout):
                    return SOCKET.exists() and client.version()
            self.daemon.start(answers, timeout=timeout, fix=f"read {HOME / 'containerd.log'}")

    def _plugin_ok(self, kind, name):
        for line in self.ctr("plugins", "ls").splitlines()[1:]:
            fields = line.split()
            if fields[:2] == [kind, name]:
                return fields[-1] == "ok"
        return False

    def ctr(self, *args: object, timeout: float = 60) -> str:
        """Run ``ctr -a <our socket> -n k8s.io <args>`` and return what it printed."""
        command = ["ctr", "--address", self.address, "--namespace", self.namespace, *map(str, args)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LabTimeout(f"`ctr {' '.join(map(str, args))}` did not finish within {timeout} s") from e
        if done.returncode != 0:
            raise ContainerdError(f"`ctr {' '.join(map(str, args))}` failed: {done.stderr.strip()}")
        return done.stdout

    def import_layout(self, layout: oci.Layout) -> list[str]:
        """Import every image of an oci.Layout (as one OCI archive) and unpack it for the CRI."""
        archive = layout.archive(layout.path.with_suffix(".tar"))
        try:
            self.ctr("images", "import", "--snapshotter", self.snapshotter, archive)
        finally:
            archive.unlink()
        return sorted(layout.images())

    def stop(self, timeout: float = 10) -> None:
        """Remove every pod (through the CRI), stop containerd, its shims and mounts, remove
        its folder. Safe to call twice."""
        _teardown(self.daemon, timeout)
        self.daemon = None

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _teardown(server: daemon.Daemon | None, timeout=10):
    """What ``stop()`` and ``sweep()`` share: ``server`` is ours to stop, or None after a crash
    (then whatever containerd of ours runs is found by its command line)."""
    if (server and server.running or pid()) and SOCKET.exists():
        with contextlib.suppress(LabError), cri.Client(str(SOCKET), timeout=timeout) as client:
            client.remove_all()
    if server:
        server.stop(timeout)
    daemon.strays(_is_daemon, timeout=timeout)
    daemon.strays(_is_shim, timeout=timeout)    # shims outlive containerd on purpose: end ours
    runc_root = HOME / "runc" / NAMESPACE
    if runc_root.is_dir():            # containers a crashed shim left behind
        listed = subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True,
                                text=True).stdout.split()
        for container in listed:
            subprocess.run(["runc", "--root", runc_root, "delete", "--force", container],
                           capture_output=True)
    # container roots, pods' netns and shm
    procfs.unmount(procfs.mount_points(lambda point: point.startswith(f"{HOME}/")))
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    shutil.rmtree(HOME, ignore_errors=True)


@owners.sweeper(owners.RUNTIMES)
def sweep() -> None:
    """Remove the course's containerd and everything it ran (pods, shims, mounts, bridge)."""
    _teardown(None)


@owners.sweeper(owners.WORKLOADS)
def sweep_pods() -> None:
    """Remove every cnlab pod of the course's containerd, if it is running, with the pods' logs
    and cgroups (the daemon itself and its state go with ``sweep()``)."""
    if pid() and SOCKET.exists():
        with contextlib.suppress(LabError), cri.Client(SOCKET, timeout=10) as client:
            client.remove_all(cri.OWNER)
    shutil.rmtree(cri.LOGS, ignore_errors=True)
    cgroups.remove_top(names.name("pod", "*"))
