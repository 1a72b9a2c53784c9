"""A CRI client: speak the Container Runtime Interface to a runtime, as the kubelet does.

The CRI is two gRPC services on a unix socket, defined by Kubernetes' ``api.proto``:
RuntimeService (pod sandboxes, containers, exec, status) and ImageService. The stubs come from
the ``container-runtime-interface-api`` package (``cri_api.v1``)::

    with cri.Client(containerd.SOCKET) as client, cri.Pod(client, "web") as pod:
        pod.add("server", image, ["httpd", "-f", "-p", "8080"])      # CreateContainer + Start
        pod.add("client", image, ["sh", "-c", "wget -qO- 127.0.0.1:8080"])
        pod.exec("client", ["hostname"])                             # ExecSync
        pod.logs("client")                                           # the CRI log file, parsed
    # leaving: StopContainer/RemoveContainer each, then StopPodSandbox/RemovePodSandbox

Errors are typed: NotFound names the missing pod, container or image; RuntimeUnavailable
says that nothing answers on the socket; a deadline is a LabTimeout.

Used in: 27-containerd-cri, 35-api-controller, book/containers/oci-docker-cri, book/orchestration/kubernetes-api.
"""
import contextlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass

from helpers.containers import cgroups
from helpers._core import names, wait
from helpers import errors
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool

LOGS = names.STATE / "pods"    # like the kubelet's /var/log/pods: <ns>_<name>_<uid>/<ctr>/0.log
OWNER = {names.LABEL: "cri"}   # the label on every pod and container made here


def _api():
    try:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc
    except ImportError as e:
        raise MissingTool("the CRI stubs (Python package container-runtime-interface-api)",
                          package="container-runtime-interface-api (pip), via `make setup`") from e
    return grpc, api_pb2, api_pb2_grpc


class CriError(LabError):
    """The runtime refused a CRI call; ``code`` is the gRPC status name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, message, *, code=None, fix=None):
        super().__init__(message, fix=fix)
        self.code = code


class NotFound(CriError, errors.NotFound):
    """The pod sandbox, container or image named in a call does not exist (NOT_FOUND)."""


class RuntimeUnavailable(CriError, errors.Unavailable):
    """Nothing answers on the CRI socket."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class LogLine:
    """One line of a CRI container log. On disk: ``<RFC3339 time> <stdout|stderr> <P|F> <message>``,
    where P marks a partial line (the runtime split a long one) and F the full line's end."""
    time: str
    stream: str
    message: str


def parse_log(text):
    """The lines of a CRI log file, with partial (P) lines joined to the full line they begin."""
    lines, pending = [], ""
    for raw in text.splitlines():
        parts = raw.split(" ", 3) + [""] * (raw.count(" ") == 2)     # an empty message
        if len(parts) != 4 or parts[1] not in ("stdout", "stderr") \
                or parts[2].split(":")[0] not in ("P", "F"):
            raise BadInput(f"not a CRI log line: {raw!r}",
                           fix="expected '<time> <stdout|stderr> <P|F> <message>'")
        when, stream, tag, message = parts
        if tag.startswith("P"):
            pending += message
            continue
        lines.append(LogLine(when, stream, pending + message))
        pending = ""
    return lines


def shares(cpus):
    """The kubelet's CPU request to cgroup v1 shares: 1024 a core, at least 2
    (milliCPUToShares). runc turns shares into cgroup v2's ``cpu.weight`` where v2 has the CPU."""
    return max(2, round(cpus * 1024))


def no_swap(memory: int, layout: cgroups.Layout | None = None) -> int:
    """The memory-and-swap limit that lets a container no swap: its memory limit, as the
    kubelet's default swap behaviour ``NoSwap`` asks (KEP-2400), so a hog is OOM-killed at its
    limit on a machine with swap too. runc writes it as ``memory.swap.max`` 0 on v2 (and skips
    that where there is no swap accounting); on v1 it needs ``memory.memsw.*``, and where those
    are missing it is 0, unset, as the kubelet leaves it there."""
    layout = layout or cgroups.detect()
    memory_v1 = layout.v1.get("memory")
    if not memory or (memory_v1 and not (memory_v1 / "memory.memsw.limit_in_bytes").exists()):
        return 0
    return memory


@dataclass(frozen=True)
class Resources:
    """A container's limits as its cgroup holds them: ``files`` (path -> text, the files runc
    wrote: v1 or v2 names, whichever this machine has) and what they mean."""
    files: dict
    memory: int | None          # bytes
    cpus: float | None          # quota / period
    cpu_quota_us: int | None
    cpu_period_us: int | None
    cpu_shares: int | None      # cgroup v1's cpu.shares, where the CPU controller is on v1
    cpu_weight: int | None      # cgroup v2's cpu.weight, where it is on v2


@dataclass(frozen=True)
class CpuUse:
    """What a container's CPU quota did over a measured stretch of wall-clock time."""
    seconds: float              # wall-clock time measured
    cores: float                # CPU time used / wall-clock time
    periods: int                # enforcement periods in which it wanted to run
    throttled: int              # ... in which it used up its quota and was stopped
    throttled_seconds: float    # time it spent stopped


@dataclass(frozen=True)
class PodInfo:
    id: str
    name: str
    namespace: str
    uid: str
    state: str            # SANDBOX_READY or SANDBOX_NOTREADY
    labels: dict


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    pod_id: str
    name: str
    image: str
    state: str            # CONTAINER_CREATED, _RUNNING, _EXITED or _UNKNOWN
    labels: dict


class Client:
    """A connection to a CRI runtime's unix socket. Every call has a deadline (``timeout``)."""

    def __init__(self, address, timeout=30):
        grpc, self._pb, stubs = _api()
        self.address = str(address)
        self.timeout = timeout
        self._grpc = grpc
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self._runtime = stubs.RuntimeServiceStub(self._channel)
        self._images = stubs.ImageServiceStub(self._channel)

    def _call(self, service, method, what, deadline=None, **fields):
        """One RPC; ``what`` names the object for the error message."""
        stub = self._runtime if service == "runtime" else self._images
        request = getattr(self._pb, f"{method}Request")(**fields)
        deadline = deadline or self.timeout
        try:
            return getattr(stub, method)(request, timeout=deadline)
        except self._grpc.RpcError as e:
            code, details = e.code(), e.details()
            if code == self._grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{what}: not found ({details})", code=code.name,
                               fix="list what exists with pods() / containers() / images()") from e
            if code == self._grpc.StatusCode.UNAVAILABLE:
                raise RuntimeUnavailable(f"no CRI runtime answers at {self.address} ({details})",
                                         code=code.name,
                                         fix="start one: `with containerd.Containerd():` in the labs") from e
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LabTimeout(f"{what}: no answer within {deadline} s",
                                 fix="is the runtime overloaded? read its log") from e
            raise CriError(f"{what} failed: {code.name}: {details}", code=code.name) from e

    # -- the runtime --

    def version(self):
        """{"version", "runtime_name", "runtime_version", "runtime_api_version"}."""
        r = self._call("runtime", "Version", "Version")
        return {"version": r.version, "runtime_name": r.runtime_name,
                "runtime_version": r.runtime_version, "runtime_api_version": r.runtime_api_version}

    def status(self):
        """The runtime's conditions, e.g. {"RuntimeReady": True, "NetworkReady": True}."""
        r = self._call("runtime", "Status", "Status")
        return {c.type: c.status for c in r.status.conditions}

    # -- images --

    def images(self):
        """The names (repo tags) of the images the runtime has."""
        return sorted(tag for i in self._call("image", "ListImages", "ListImages").images
                      for tag in i.repo_tags)

    def image(self, ref):
        """{"id", "tags", "size"} of one image; NotFound if the runtime does not have it."""
        r = self._call("image", "ImageStatus", f"image {ref}", image=self._pb.ImageSpec(image=ref))
        if not r.image.id:
            raise NotFound(f"image {ref}: not found on the runtime",
                           fix="import it (no registry is reachable here): containerd.images()")
        return {"id": r.image.id, "tags": list(r.image.repo_tags), "size": r.image.size}

    # -- pod sandboxes --

    def run_pod(self, config):
        """RunPodSandbox: namespaces, network (CNI) and the pause container. Returns its id."""
        return self._call("runtime", "RunPodSandbox", f"pod {config.metadata.name}",
                          config=config).pod_sandbox_id

    def pod_status(self, pod_id):
        """{"state", "ip", "namespaces"} and, with containerd, the pause process's ``pid``."""
        r = self._call("runtime", "PodSandboxStatus", f"pod sandbox {pod_id}",
                       pod_sandbox_id=pod_id, verbose=True)
        info = json.loads(r.info.get("info", "{}") or "{}")
        options = r.status.linux.namespaces.options
        return {"state": self._pb.PodSandboxState.Name(r.status.state), "ip": r.status.network.ip,
                "namespaces": {kind: self._pb.NamespaceMode.Name(getattr(options, kind))
                               for kind in ("network", "pid", "ipc")},
                "pid": info.get("pid")}

    def pods(self, labels=None):
        r = self._call("runtime", "ListPodSandbox", "ListPodSandbox",
                       filter=self._pb.PodSandboxFilter(label_selector=labels or {}))
        return [PodInfo(p.id, p.metadata.name, p.metadata.namespace, p.metadata.uid,
                        self._pb.PodSandboxState.Name(p.state), dict(p.labels)) for p in r.items]

    def stop_pod(self, pod_id):
        """StopPodSandbox: stop every container in it, then the sandbox; tear down its network."""
        self._call("runtime", "StopPodSandbox", f"pod sandbox {pod_id}", pod_sandbox_id=pod_id)

    def remove_pod(self, pod_id):
        """RemovePodSandbox: remove the (stopped) sandbox and every container in it."""
        self._call("runtime", "RemovePodSandbox", f"pod sandbox {pod_id}", pod_sandbox_id=pod_id)

    # -- containers --

    def create_container(self, pod_id, config, pod_config):
        return self._call("runtime", "CreateContainer", f"container {config.metadata.name}",
                          pod_sandbox_id=pod_id, config=config,
                          sandbox_config=pod_config).container_id

    def start_container(self, container_id):
        self._call("runtime", "StartContainer", f"container {container_id}",
                   container_id=container_id)

    def container_status(self, container_id):
        """{"state", "exit_code", "reason", "log_path"} and, with containerd, the process's ``pid``
        and ``spec``, the OCI runtime spec it handed to runc."""
        r = self._call("runtime", "ContainerStatus", f"container {container_id}",
                       container_id=container_id, verbose=True)
        info = json.loads(r.info.get("info", "{}") or "{}")
        return {"state": self._pb.ContainerState.Name(r.status.state), "exit_code": r.status.exit_code,
                "reason": r.status.reason, "log_path": r.status.log_path, "pid": info.get("pid"),
                "spec": info.get("runtimeSpec")}

    def containers(self, pod_id=None, labels=None):
        r = self._call("runtime", "ListContainers", "ListContainers",
                       filter=self._pb.ContainerFilter(pod_sandbox_id=pod_id or "",
                                                       label_selector=labels or {}))
        return [ContainerInfo(c.id, c.pod_sandbox_id, c.metadata.name, c.image.image,
                              self._pb.ContainerState.Name(c.state), dict(c.labels))
                for c in r.containers]

    def exec_sync(self, container_id, command, timeout=10):
        """Run a command in a running container and wait for it (ExecSync)."""
        if not command or not all(isinstance(a, str) for a in command):
            raise BadInput(f"cannot exec {command!r}", fix='pass a list of strings: ["ls", "/"]')
        r = self._call("runtime", "ExecSync", f"exec in container {container_id}",
                       deadline=timeout + self.timeout, container_id=container_id,
                       cmd=list(command), timeout=timeout)
        return ExecResult(r.exit_code, r.stdout.decode(errors="replace"),
                          r.stderr.decode(errors="replace"))

    def stop_container(self, container_id, grace=2):
        """StopContainer: its stop signal (SIGTERM), then SIGKILL after ``grace`` seconds."""
        self._call("runtime", "StopContainer", f"container {container_id}",
                   deadline=grace + self.timeout, container_id=container_id, timeout=grace)

    def remove_container(self, container_id):
        self._call("runtime", "RemoveContainer", f"container {container_id}",
                   container_id=container_id)

    def remove_all(self, labels=None):
        """Stop and remove every pod (with these labels); return their names."""
        gone = []
        for pod in self.pods(labels):
            with contextlib.suppress(NotFound):
                self.stop_pod(pod.id)
                self.remove_pod(pod.id)
            gone.append(pod.name)
        return gone

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _named(name, what):
    return names.check(name, f"{what} name", most=63, dns=True, kind="a DNS label",
                       fix="use lower-case letters, digits and '-', at most 63, e.g. 'web'")


class Pod:
    """A pod sandbox and its containers, made through the CRI and removed at the end of the
    ``with`` block (or by ``remove()``), even when a cell fails.

    Like the kubelet, it gives the pod a log folder (``<LOGS>/<namespace>_<name>_<uid>``) and a
    cgroup parent named ``cnlab-pod-<name>-<uid>``, and removes both when the pod is gone. Its
    containers share the sandbox's network and IPC namespaces; each has its own PID namespace
    unless ``share_processes`` (Kubernetes' shareProcessNamespace), as in Kubernetes.
    """

    def __init__(self, client, name, *, namespace=names.PREFIX, hostname=None, labels=None,
                 share_processes=False):
        self.client = client
        self.name = _named(name, "pod")
        self.namespace = _named(namespace, "namespace")
        self.uid = uuid.uuid4().hex[:12]
        self.logs_dir = _logs_dir(self.namespace, self.name, self.uid)
        self.cgroup = _cgroup(self.name, self.uid)
        pb = client._pb
        pid = pb.NamespaceMode.POD if share_processes else pb.NamespaceMode.CONTAINER
        self.namespaces = pb.NamespaceOption(network=pb.NamespaceMode.POD, ipc=pb.NamespaceMode.POD,
                                             pid=pid)
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=self.name, uid=self.uid, namespace=self.namespace),
            hostname=hostname or self.name, log_directory=str(self.logs_dir),
            labels={**OWNER, **(labels or {})},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{self.cgroup}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=self.namespaces)))
        self.id = None
        self.containers = {}          # name -> container id

    def start(self):
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.id = self.client.run_pod(self.config)
        except BaseException:
            self.remove()
            raise
        return self

    def add(self, name: str, image: str, command: list[str] | None = None,
            args: list[str] | None = None, *, env: dict | None = None, memory: str | int | None = None,
            cpus: float | None = None, cpu_request: float | None = None, start: bool = True) -> str:
        """CreateContainer (+ StartContainer) in this pod; returns the container id.
        ``command`` replaces the image's entrypoint, ``args`` its cmd. As the kubelet does with a
        container's ``resources``: the limits ``memory`` ("512M") and ``cpus`` (0.5) become
        ``LinuxContainerResources``' memory limit and CFS quota/period, and the CPU request
        (``cpu_request``, by default the limit, as Kubernetes defaults it) its CPU shares. The
        memory-and-swap limit is the memory limit (``no_swap``)."""
        pb = self.client._pb
        name = _named(name, "container")
        if name in self.containers:
            raise BadInput(f"pod {self.name} already has a container {name!r}", fix="pick another name")
        for what, value in (("command", command), ("args", args)):
            if value is not None and not (isinstance(value, (list, tuple))
                                          and all(isinstance(a, str) for a in value)):
                raise BadInput(f"{what}={value!r} must be a list of strings", fix='e.g. ["sleep", "60"]')
        limits = cgroups.Limits.parse(memory=memory, cpus=cpus)
        request = limits.cpus if cpu_request is None else cgroups.parse_cpus(cpu_request, "cpu_request")
        if limits.cpus and request > limits.cpus:
            raise BadInput(f"cpu_request={cpu_request!r} is more than the limit cpus={cpus!r}",
                           fix="a request is at most the limit, as Kubernetes requires")
        self.client.image(image)          # NotFound naming the image, before anything is made
        limits_pb = pb.LinuxContainerResources(
            memory_limit_in_bytes=limits.memory or 0,
            memory_swap_limit_in_bytes=no_swap(limits.memory or 0),
            cpu_period=limits.cpu_period if limits.cpus else 0,
            cpu_quota=round(limits.cpus * limits.cpu_period) if limits.cpus else 0,
            cpu_shares=shares(request) if request else 0)
        (self.logs_dir / name).mkdir(parents=True, exist_ok=True)
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
            command=list(command or []), args=list(args or []),
            envs=[pb.KeyValue(key=k, value=str(v)) for k, v in (env or {}).items()],
            log_path=f"{name}/0.log", labels=dict(OWNER),
            linux=pb.LinuxContainerConfig(
                resources=limits_pb,
                security_context=pb.LinuxContainerSecurityContext(namespace_options=self.namespaces)))
        container_id = self.client.create_container(self.id, config, self.config)
        self.containers[name] = container_id
        if start:
            self.client.start_container(container_id)
        return container_id

    def _id(self, name):
        try:
            return self.containers[name]
        except KeyError as e:
            raise NotFound(f"pod {self.name} has no container {name!r}",
                           fix=f"use one of {sorted(self.containers)}") from e

    def status(self, name=None):
        """The pod's status, or one container's."""
        return self.client.container_status(self._id(name)) if name else self.client.pod_status(self.id)

    def resources(self, name: str) -> Resources:
        """The limits in a running container's cgroup, read from the kernel's files
        (through its process: ``cgroups.of_process``), not from what was asked."""
        folders = cgroups.of_process(self._pid(name))
        files = cgroups.limit_files(folders)
        limits = cgroups.limits_in(folders)
        text = {path.name: value for path, value in files.items()}
        quota, period = (text["cpu.max"].split() if "cpu.max" in text
                         else [text.get("cpu.cfs_quota_us"), text.get("cpu.cfs_period_us")])
        whole = (lambda v: int(v) if v and v.lstrip("-").isdigit() and int(v) >= 0 else None)
        return Resources(files, limits["memory"], limits["cpus"], whole(quota), whole(period),
                         whole(text.get("cpu.shares")), whole(text.get("cpu.weight")))

    def cpu_use(self, name: str, seconds: float = 3.0) -> CpuUse:
        """Measure a running container's CPU time and throttling over ``seconds``, from its
        cgroup's counters (cpuacct/cpu.stat), before and after."""
        if not isinstance(seconds, (int, float)) or not 0.5 <= seconds <= 60:
            raise BadInput(f"seconds={seconds!r} is out of range", fix="measure 0.5 to 60 seconds")
        folders = cgroups.of_process(self._pid(name))
        before, t0 = cgroups.stats_in(folders), time.monotonic()
        time.sleep(seconds)
        after, elapsed = cgroups.stats_in(folders), time.monotonic() - t0
        if before.cpu_usage_us is None or after.cpu_usage_us is None or after.cpu_periods is None:
            raise errors.NotSupported(f"container {name}'s cgroup has no CPU counters",
                                      fix="the cpu and cpuacct controllers (v1) or cpu (v2) are needed")
        return CpuUse(elapsed, (after.cpu_usage_us - before.cpu_usage_us) / 1e6 / elapsed,
                      after.cpu_periods - before.cpu_periods, after.cpu_throttled - before.cpu_throttled,
                      (after.cpu_throttled_us - before.cpu_throttled_us) / 1e6)

    def wait_exit(self, name: str, timeout: float = 30) -> dict:
        """Wait until a container has exited; its status ("reason" is "OOMKilled" when the
        kernel's OOM killer ended it)."""
        return wait.until(lambda: (s := self.status(name))["state"] == "CONTAINER_EXITED" and s,
                          timeout, f"container {name} to exit",
                          detail=lambda: self.status(name)["state"])

    def _pid(self, name):
        status = self.status(name)
        if status["state"] != "CONTAINER_RUNNING" or not status["pid"]:
            raise CriError(f"container {name} is {status['state']}, not running",
                           fix="read its status()['reason'] and logs()")
        return status["pid"]

    def exec(self, name, command, timeout=10):
        return self.client.exec_sync(self._id(name), command, timeout)

    def log(self, name):
        """The container's log, parsed: a list of LogLine."""
        path = self.logs_dir / name / "0.log"
        self._id(name)
        return parse_log(path.read_text()) if path.exists() else []

    def logs(self, name, stream=None):
        """What the container wrote (to ``stream``, or both), as text."""
        return "".join(line.message + "\n" for line in self.log(name)
                       if stream in (None, line.stream))

    def remove(self, grace=2):
        """Stop and remove the containers, then the sandbox; then its logs and cgroup parent.
        Every step is tried, like the kubelet's retries; the first error is raised at the end."""
        failed = []

        def attempt(call, *args):
            try:
                call(*args)
            except NotFound:
                pass                          # already gone: that is what we want
            except CriError as e:
                failed.append(e)

        try:
            for container_id in self.containers.values():
                attempt(self.client.stop_container, container_id, grace)
                attempt(self.client.remove_container, container_id)
            if self.id:
                attempt(self.client.stop_pod, self.id)
                attempt(self.client.remove_pod, self.id)     # also stops it, forcibly
        finally:
            self.containers, self.id = {}, None
            forget(self.namespace, self.name, self.uid)
        if failed:
            raise failed[0]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.remove()


def _logs_dir(namespace, name, uid):
    return LOGS / f"{namespace}_{name}_{uid}"


def _cgroup(name, uid):
    return names.name("pod", name, uid)


def forget(namespace, name, uid):
    """Remove what a pod keeps beside the runtime once it is gone, as the kubelet does: its log
    folder and its cgroup parent. For ``Pod.remove`` and for controllers that remove pods they
    did not start in this process."""
    shutil.rmtree(_logs_dir(namespace, name, uid), ignore_errors=True)
    with contextlib.suppress(OSError):
        LOGS.rmdir()                  # the last pod's logs take the folder with them
    cgroups.remove_top(_cgroup(name, uid))   # and a container runc did not delete, inside it
