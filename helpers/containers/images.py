"""The course's Docker images, built offline, and containers run from them with limits.

No registry is reachable from the labs: every image is built here, the base one being a
busybox binary ``FROM scratch`` (the smallest honest image there is)::

    ref = images.build("cnlab/web:1", dockerfile, {"index.html": "hello"})
    images.layers(ref)                       # each build step, and the layer it made (or none)
    with images.run(ref, memory="64m", cpus=0.5, pids=20) as box:
        images.host_view(box)                # from the host: its namespaces and cgroup limits

Errors are typed: EngineUnavailable (say how to start dockerd), ImageMissing (say how to
build it), BadInput for a malformed limit (before Docker is called), LabTimeout.

Used in: 13-vms-vs-containers, 26-docker, 31-swarm, 33-controller, book/containers/oci-docker-cri, book/orchestration/orchestration, book/virtualization/vms-vs-containers.
"""
import contextlib
import io
import json
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from helpers._core import names
from helpers.containers import cgroups, engine, ns
from helpers.containers.engine import (  # noqa: F401  the Docker client, re-exported for the labs
    EngineTimeout, EngineUnavailable, ImageMissing, client)
from helpers.errors import BadInput, MissingTool
from helpers._core.names import LABEL, PREFIX

if TYPE_CHECKING:
    import docker

BUSYBOX = engine.BUSYBOX
OWNER = engine.OWNER                  # on what this module builds and runs
MIN_MEMORY = 6 * 2**20                # Docker refuses a memory limit below 6 MiB

BUSYBOX_DOCKERFILE = b"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
LABEL %s=course
CMD ["/bin/sh"]
""" % LABEL.encode()
_REF = re.compile(rf"{PREFIX}/[a-z0-9]+(?:[._-][a-z0-9]+)*:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
_MEMORY = re.compile(r"(\d+)([bkmg]?)", re.IGNORECASE)


def _context(dockerfile, files):
    """A build context: the Dockerfile and ``files`` ({name: str | bytes | Path}) as a tar."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, content in {"Dockerfile": dockerfile, **files}.items():
            if isinstance(content, Path):
                tar.add(content, arcname=name)
                continue
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if data.startswith(b"#!") else 0o644
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    return context


def busybox(tag: str = "latest") -> str:
    """Build (once) and return the name of the course's busybox image."""
    ref = f"{BUSYBOX}:{tag}"
    path = shutil.which("busybox")
    if path is None:
        raise MissingTool("busybox", package="busybox-static")
    with contextlib.closing(client()) as c:
        with contextlib.suppress(ImageMissing), engine.calling(f"looking up {ref}", ref=ref):
            c.images.get(ref)
            return ref
        with engine.calling(f"building {ref}", timeout=60):
            c.images.build(fileobj=_context(BUSYBOX_DOCKERFILE, {"busybox": Path(path)}),
                           custom_context=True, tag=ref, rm=True, forcerm=True)
    return ref


def copy(ref: str, base_url: str, *, timeout: float = 120) -> str:
    """Copy an image from this engine into the one at ``base_url`` (``docker save | docker
    load``): how a second engine gets the course's images where nothing can be pulled."""
    with contextlib.closing(client(timeout)) as source, \
            contextlib.closing(client(timeout, base_url)) as target, \
            engine.calling(f"copying {ref} to {base_url}", ref=ref, timeout=timeout):
        target.images.load(b"".join(source.images.get(ref).save(named=True)))
    return ref


def _ref(ref):
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise BadInput(f"{ref!r} is not a course image name",
                       fix=f"use '{PREFIX}/<name>:<tag>', e.g. '{PREFIX}/web:1'")
    return ref


def build(ref: str, dockerfile: str, files: Mapping[str, str | bytes | Path] | None = None, *,
          timeout: float = 120) -> str:
    """Build an image from a Dockerfile (text) and ``files`` ({name: text | bytes | Path}),
    offline: its FROM must be an image this engine already has (ImageMissing otherwise)."""
    _ref(ref)
    base = re.search(r"^\s*FROM\s+(\S+)", dockerfile, re.MULTILINE | re.IGNORECASE)
    if base is None:
        raise BadInput("the Dockerfile has no FROM line", fix="start it with FROM scratch or FROM "
                                                              "an image built here, e.g. images.busybox()")
    with contextlib.closing(client(timeout)) as c:
        if base[1] != "scratch":
            with engine.calling(f"looking up {base[1]}", ref=base[1], timeout=timeout):
                c.images.get(base[1])
        with engine.calling(f"building {ref}", timeout=timeout):
            c.images.build(fileobj=_context(dockerfile, files or {}), custom_context=True, tag=ref,
                           labels=OWNER, rm=True, forcerm=True, pull=False)
    return ref


@dataclass(frozen=True)
class Layer:
    """One step of an image's history: the instruction, and the layer it made (``diff_id``, the
    sha256 of the layer's tar) or None if it only changed the config (CMD, LABEL, ENV...)."""
    created_by: str
    diff_id: str | None
    size: int


def layers(ref: str) -> list[Layer]:
    """The image's history, oldest first, each step with the layer it added (if any).
    The history API does not say which steps made a layer; the image's config does, so the
    config is read from ``docker save`` (the same JSON an OCI image config holds)."""
    with contextlib.closing(client()) as c, engine.calling(f"reading {ref}", ref=ref):
        image = c.images.get(ref)
        archive = b"".join(image.save(named=False))
        sizes = [h["Size"] for h in reversed(image.history())]
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # docker save writes both as regular files: extractfile() gives no None for them
        manifest = json.load(cast(IO[bytes], tar.extractfile("manifest.json")))[0]
        config = json.load(cast(IO[bytes], tar.extractfile(manifest["Config"])))
    diff_ids = iter(config["rootfs"]["diff_ids"])
    return [Layer(h.get("created_by", ""), None if h.get("empty_layer") else next(diff_ids), size)
            for h, size in zip(config["history"], sizes)]


def remove_image(ref: str) -> None:
    """Remove an image this module built ("already gone" is fine)."""
    import docker
    with contextlib.closing(client()) as c, engine.calling(f"removing {ref}", ref=ref):
        with contextlib.suppress(docker.errors.ImageNotFound):
            c.images.remove(_ref(ref), force=True)


# --- containers -------------------------------------------------------------------------------

def parse_memory(value: str | int) -> int:
    """Docker's memory forms, checked strictly: bytes (67108864), or a whole number with b, k, m
    or g (``64m``, ``1g``; either case; binary units). Below Docker's 6 MiB minimum is BadInput."""
    forms = "bytes, or a whole number with b, k, m or g: '64m', '1g'"
    match = _MEMORY.fullmatch(value.strip()) if isinstance(value, str) else None
    if match:
        size = match[1] + match[2].upper().replace("B", "")     # in helpers.cgroups' form
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise BadInput(f"memory={value!r} is not a size", fix=f"use {forms}")
    try:
        size = cgroups.parse_size(size, "memory")
    except BadInput as e:
        raise BadInput(f"memory={value!r} is not a size", fix=f"use {forms}") from e
    if size < MIN_MEMORY:
        raise BadInput(f"memory={value!r} is below Docker's minimum of 6 MiB", fix="use at least '6m'")
    return size


def _limits(memory, cpus, pids):
    """Docker's keyword arguments for these limits, or BadInput before anything is created."""
    limits = {}
    if memory is not None:
        limits["mem_limit"] = parse_memory(memory)
        limits["memswap_limit"] = limits["mem_limit"]        # no swap beyond the limit
    if cpus is not None:
        cores = cgroups.parse_cpus(cpus)
        if not 0.01 <= cores <= os.cpu_count():
            raise BadInput(f"cpus={cpus!r} is out of range",
                           fix=f"Docker accepts 0.01 to {os.cpu_count()} (this machine's CPUs)")
        limits["nano_cpus"] = round(cores * 1e9)
    if pids is not None:
        if isinstance(pids, bool) or not isinstance(pids, int) or pids < 1:
            raise BadInput(f"pids={pids!r} is not a number of processes", fix="use a whole number >= 1")
        limits["pids_limit"] = pids
    return limits


class Container:
    """A running Docker container labelled ``cnlab``; the ``with`` block removes it.
    ``docker`` is the docker-py Container, for everything else."""

    def __init__(self, container: "docker.models.containers.Container", timeout: float) -> None:
        self.docker = container
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self.docker.name

    @property
    def pid(self) -> int:
        """The container's PID 1, as the host sees it."""
        self.docker.reload()
        return self.docker.attrs["State"]["Pid"]

    def exec(self, command: str | Sequence[str]) -> tuple[int, str]:
        """Run a command inside; return (exit code, output)."""
        with engine.calling(f"exec in {self.name}", timeout=self.timeout):
            code, output = self.docker.exec_run(command)
        return code, output.decode(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the container to end; return its exit status (137: it was SIGKILLed)."""
        timeout = timeout or self.timeout
        with engine.calling(f"waiting for {self.name}", timeout=timeout):
            return self.docker.wait(timeout=timeout)["StatusCode"]

    def logs(self) -> str:
        with engine.calling(f"logs of {self.name}", timeout=self.timeout):
            return self.docker.logs().decode(errors="replace")

    def remove(self) -> None:
        import docker
        with engine.calling(f"removing {self.name}", timeout=self.timeout), \
                contextlib.suppress(docker.errors.NotFound):
            self.docker.remove(force=True)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run(image: str, command: str | Sequence[str] | None = None, *, name: str | None = None,
        memory: str | int | None = None, cpus: float | str | None = None, pids: int | None = None,
        timeout: float = 60, **options: Any) -> Container:
    """Start a container (detached) named ``cnlab-<name>`` with these limits: ``memory`` ("64m"),
    ``cpus`` (0.5) and ``pids`` (20). Everything is checked before Docker is called; an image
    that is not here is ImageMissing (nothing is pulled). ``options`` go to docker-py's run."""
    limits = _limits(memory, cpus, pids)
    name = name or uuid.uuid4().hex[:8]
    names.check(name, "container name", upper=True, punct="_.-", most=63)
    with contextlib.closing(client(timeout)) as c:
        with engine.calling(f"looking up {image}", ref=image, timeout=timeout):
            c.images.get(image)
        with engine.calling(f"starting a container of {image}", ref=image, timeout=timeout):
            started = c.containers.run(image, command, name=names.name(name), detach=True,
                                       labels=OWNER, **limits, **options)
    return Container(started, timeout)


# --- the host's view of a container -----------------------------------------------------------

@dataclass(frozen=True)
class HostView:
    """What the host's kernel says about a container's process: its namespaces next to the
    host's (kind -> (container inode, host inode)), its cgroup folders, and the limits there."""
    pid: int
    namespaces: dict
    cgroups: dict
    memory: int | None      # bytes
    cpus: float | None      # quota / period
    pids: int | None

    def isolated(self) -> list[str]:
        """The namespace kinds in which the container differs from the host."""
        return sorted(kind for kind, (inside, host) in self.namespaces.items() if inside != host)


def host_view(container: Container | int, host: int | str = "self") -> HostView:
    """Read, from /proc and /sys/fs/cgroup only, what makes ``container`` (a Container, or a
    pid) a container. ``host`` is the process to compare with (default: this one)."""
    pid = container.pid if isinstance(container, Container) else int(container)
    theirs = {n.kind: n.inode for n in ns.namespaces(pid)}
    ours = {n.kind: n.inode for n in ns.namespaces(host)}
    folders = cgroups.of_process(pid)
    limits = cgroups.limits_in(folders)
    return HostView(pid, {k: (theirs[k], ours[k]) for k in theirs}, folders, **limits)


