"""The course's Docker images, built offline: no registry is reachable from the labs.

An image is a busybox binary ``FROM scratch``: the smallest honest image there is.
"""
import contextlib
import io
import shutil
import tarfile

from .errors import LabError, MissingTool
from .resources import LABEL, PREFIX

BUSYBOX = f"{PREFIX}/busybox"

_DOCKERFILE = b"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
LABEL %s=course
CMD ["/bin/sh"]
""" % LABEL.encode()


class EngineUnavailable(LabError):
    def __init__(self):
        super().__init__("no Docker engine answers",
                         fix="start it with `sudo dockerd &` (or run `make test` as root, which does)")


def client(timeout=60):
    """A docker-py client, or a clear error if no engine answers."""
    import docker
    try:
        c = docker.from_env(timeout=timeout)
        c.ping()
        return c
    except docker.errors.DockerException as e:
        raise EngineUnavailable() from e


def busybox(tag="latest"):
    """Build (once) and return the name of the course's busybox image."""
    ref = f"{BUSYBOX}:{tag}"
    path = shutil.which("busybox")
    if path is None:
        raise MissingTool("busybox", package="busybox-static")
    with contextlib.closing(client()) as c:
        try:
            c.images.get(ref)
            return ref
        except Exception:
            pass
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(_DOCKERFILE)
            tar.addfile(info, io.BytesIO(_DOCKERFILE))
            tar.add(path, arcname="busybox")
        context.seek(0)
        c.images.build(fileobj=context, custom_context=True, tag=ref, rm=True, forcerm=True)
    return ref


def sweep():
    """Remove every container, network and volume labelled ``cnlab`` (images are kept: a cache)."""
    try:
        c = client(timeout=10)
    except EngineUnavailable:
        return
    with contextlib.closing(c):
        for container in c.containers.list(all=True, filters={"label": LABEL}):
            container.remove(force=True)
        for network in c.networks.list(filters={"label": LABEL}):
            network.remove()
        for volume in c.volumes.list(filters={"label": LABEL}):
            volume.remove(force=True)
