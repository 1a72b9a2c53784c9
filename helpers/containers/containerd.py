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
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from helpers.containers import cri, oci
from helpers._core import names, owners
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


def conflist():
    """The pod network: a bridge on this machine, addresses from SUBNET, no NAT to the outside."""
    return {"cniVersion": "1.0.0", "name": names.PREFIX, "plugins": [
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                  "dataDir": str(HOME / "cni-ipam")}}]}


def config(snapshotter="overlayfs"):
    """The config.toml text of the course's containerd."""
    return _CONFIG.format(home=HOME, socket=SOCKET, pause=PAUSE, cni_bin=_cni_bin(),
                          snapshotter=snapshotter)


def images():
    """The course's two containerd images, in one OCI layout (they share the busybox layer)."""
    layout = oci.Layout.create(HOME / "images")
    base = oci.busybox_layer()
    layout.add_image(BUSYBOX, [base], cmd=["sh"])
    layout.add_image(PAUSE, [base, oci.layer({"pause": PAUSE_SCRIPT}, comment="the pause script")],
                     entrypoint=["/pause"])
    return layout


def pid():
    """The pid of the course's containerd, or None."""
    wanted = f"--config {HOME / 'config.toml'}"
    for p in _processes():
        if p[1].startswith("containerd ") and wanted in p[1]:
            return p[0]
    return None


def _processes():
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            found.append((int(entry), " ".join([os.path.basename(args[0].decode())]
                                               + [a.decode() for a in args[1:]])))
    return found


class Containerd:
    """The course's containerd daemon; ``start()`` (or ``with``) runs it, ``stop()`` ends it."""

    address = str(SOCKET)
    namespace = NAMESPACE

    def __init__(self):
        self.process = None
        self.snapshotter = None

    def start(self, timeout=30):
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
        with open(HOME / "containerd.log", "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(HOME / "config.toml")], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)   # Ctrl-C in a cell spares it
        deadline = time.monotonic() + timeout
        with cri.Client(self.address, timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise ContainerdError(f"containerd exited with status {self.process.returncode}: "
                                          f"{self.log(5)}", fix=f"read {HOME / 'containerd.log'}")
                with contextlib.suppress(cri.RuntimeUnavailable, LabTimeout):
                    if SOCKET.exists() and client.version():
                        return
                if time.monotonic() > deadline:
                    raise LabTimeout(f"containerd's CRI plugin did not answer within {timeout} s",
                                     fix=f"read {HOME / 'containerd.log'}")
                time.sleep(0.1)

    def log(self, lines=20):
        """The last lines containerd wrote to its log."""
        with contextlib.suppress(FileNotFoundError):
            return "\n".join((HOME / "containerd.log").read_text().splitlines()[-lines:])
        return ""

    def _plugin_ok(self, kind, name):
        for line in self.ctr("plugins", "ls").splitlines()[1:]:
            fields = line.split()
            if fields[:2] == [kind, name]:
                return fields[-1] == "ok"
        return False

    def ctr(self, *args, timeout=60):
        """Run ``ctr -a <our socket> -n k8s.io <args>`` and return what it printed."""
        command = ["ctr", "--address", self.address, "--namespace", self.namespace, *map(str, args)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LabTimeout(f"`ctr {' '.join(map(str, args))}` did not finish within {timeout} s") from e
        if done.returncode != 0:
            raise ContainerdError(f"`ctr {' '.join(map(str, args))}` failed: {done.stderr.strip()}")
        return done.stdout

    def import_layout(self, layout):
        """Import every image of an oci.Layout (as one OCI archive) and unpack it for the CRI."""
        archive = layout.archive(layout.path.with_suffix(".tar"))
        try:
            self.ctr("images", "import", "--snapshotter", self.snapshotter, archive)
        finally:
            archive.unlink()
        return sorted(layout.images())

    def stop(self, timeout=10):
        """Remove every pod (through the CRI), stop containerd, its shims and mounts, remove
        its folder. Safe to call twice."""
        _teardown(self.process.pid if self.process else pid(), timeout)
        if self.process:
            self.process.wait()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _teardown(daemon, timeout=10):
    if daemon and SOCKET.exists():
        with contextlib.suppress(LabError), cri.Client(str(SOCKET), timeout=timeout) as client:
            client.remove_all()
    if daemon:
        _end(daemon, timeout)
    for p, args in _processes():      # shims outlive containerd on purpose: end ours
        if args.startswith("containerd-shim") and str(SOCKET) in args:
            _end(p, timeout)
    runc_root = HOME / "runc" / NAMESPACE
    if runc_root.is_dir():            # containers a crashed shim left behind
        listed = subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True,
                                text=True).stdout.split()
        for container in listed:
            subprocess.run(["runc", "--root", runc_root, "delete", "--force", container],
                           capture_output=True)
    _unmount_under(HOME)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    shutil.rmtree(HOME, ignore_errors=True)


def _end(process, timeout):
    """SIGTERM; SIGKILL if it is still alive after ``timeout`` seconds; return once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(process):
            if time.monotonic() > deadline:
                os.kill(process, signal.SIGKILL)
            time.sleep(0.05)


def _alive(process):
    """Running (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        return Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _unmount_under(folder):
    """Detach every mount under ``folder`` (container roots, pods' netns and shm), deepest first."""
    prefix = str(folder) + "/"
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f if line.split()[4].startswith(prefix)}
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@owners.sweeper(owners.RUNTIMES)
def sweep():
    """Remove the course's containerd and everything it ran (pods, shims, mounts, bridge)."""
    _teardown(pid())


@owners.sweeper(owners.WORKLOADS)
def sweep_pods():
    """Remove every cnlab pod of the course's containerd, if it is running, with the pods' logs
    and cgroups (the daemon itself and its state go with ``sweep()``)."""
    if pid() and SOCKET.exists():
        with contextlib.suppress(LabError), cri.Client(SOCKET, timeout=10) as client:
            client.remove_all(cri.OWNER)
    shutil.rmtree(cri.LOGS, ignore_errors=True)
    root = Path("/sys/fs/cgroup")
    for top in {p.name for p in [*root.glob("cnlab-pod-*"), *root.glob("*/cnlab-pod-*")]}:
        cri.remove_cgroup(top)
