"""The Docker engine from Python: one client, one error mapping, and what the course left in it.

docker-py's clients are layered (a high-level ``DockerClient`` over the ``APIClient``); this
module adds the course's typed errors on top, so that every lab that talks to Docker (images,
Swarm, the controller, kind) says the same thing when no engine answers::

    with contextlib.closing(engine.client()) as c:     # EngineUnavailable: how to start dockerd
        c.containers.list()

Everything the course makes in an engine carries the ``cnlab`` label; ``leftovers()`` lists it
and ``sweep()`` removes it (images are kept: a cache).

Used in: no lab directly.
"""
import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from helpers import errors
from helpers._core import owners
from helpers._core.names import LABEL, PREFIX
from helpers.errors import LabError, LabTimeout

if TYPE_CHECKING:
    import docker

BUSYBOX = f"{PREFIX}/busybox"
OWNER = {LABEL: "images"}     # on what the labs build and run (the busybox base says "course": a cache)
BUILT = f"{LABEL}={OWNER[LABEL]}"


class EngineUnavailable(errors.Unavailable):
    def __init__(self, where: str | None = None) -> None:
        super().__init__(f"no Docker engine answers{f' at {where}' if where else ''}",
                         fix="start it with `sudo dockerd &` (or run `make test` as root, which does)")


class EngineTimeout(EngineUnavailable, LabTimeout):
    """Something listens on the engine's socket but does not answer in time. Both an
    EngineUnavailable (callers that only check for an engine keep working) and a LabTimeout."""

    def __init__(self, where: str | None, timeout: float | None) -> None:
        LabError.__init__(self, f"the Docker engine{f' at {where}' if where else ''} did not answer "
                                f"within {timeout} s",
                          fix="is dockerd stuck? read its log, or pass a larger timeout=")


class ImageMissing(errors.NotFound):
    """The image is not on this engine, and no registry is reachable to pull it from."""

    def __init__(self, ref: str) -> None:
        how = ("images.busybox()" if ref.startswith(BUSYBOX) else
               f"images.build({ref.split('@')[0]!r}, dockerfile, files)")
        super().__init__(f"image {ref} is not on this Docker engine (nothing can be pulled here)",
                         fix=f"build it first: {how}")
        self.ref = ref


def _timed_out(error):
    """True if a timeout is anywhere in the error's chain: docker-py's unix socket adapter
    reports a read timeout as a ConnectionError wrapping urllib3's ReadTimeoutError."""
    import requests
    import urllib3
    timeouts = (TimeoutError, urllib3.exceptions.TimeoutError, requests.exceptions.Timeout)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, timeouts):
            return True
        inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
        error = inner or error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def calling(what: str, ref: str | None = None, timeout: float | None = None) -> Iterator[None]:
    """Turn docker-py's and requests' exceptions into the course's."""
    import docker
    import requests
    try:
        yield
    except docker.errors.ImageNotFound as e:
        raise ImageMissing(ref or str(e)) from e
    except docker.errors.BuildError as e:
        raise LabError(f"{what} failed: {e.msg}", fix="read the build log above the error") from e
    except docker.errors.APIError as e:        # before RequestException: it is an HTTPError too
        raise LabError(f"{what}: {e.explanation}") from e
    except requests.exceptions.RequestException as e:
        if _timed_out(e):
            raise LabTimeout(f"{what}: the Docker engine did not answer within {timeout} s",
                             fix="pass a larger timeout=, or see whether dockerd is overloaded") from e
        raise EngineUnavailable() from e


def client(timeout: float = 60, base_url: str | None = None) -> "docker.DockerClient":
    """A docker-py client (``base_url``, else DOCKER_HOST, else the default socket). Nothing
    listening there: EngineUnavailable; something listening that does not answer within
    ``timeout`` seconds: EngineTimeout (an EngineUnavailable that is also a LabTimeout)."""
    import docker
    import requests
    where = base_url or os.environ.get("DOCKER_HOST")
    try:
        c = (docker.DockerClient(base_url=base_url, timeout=timeout) if base_url
             else docker.from_env(timeout=timeout))
        c.ping()
        return c
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        if _timed_out(e):
            raise EngineTimeout(where, timeout) from e
        raise EngineUnavailable(where) from e


@owners.lister
def leftovers() -> list[str]:
    """Containers, networks, volumes and images labelled ``cnlab`` in the Docker engine."""
    try:
        c = client(timeout=5)
    except EngineUnavailable:  # no engine: nothing of ours can be alive there
        return []
    with contextlib.closing(c):
        # the low-level list: the high-level one re-reads each container, racing their removal
        found = [f"container {x['Names'][0].lstrip('/')}"
                 for x in c.api.containers(all=True, filters={"label": LABEL})]
        found += [f"docker-network {n.name}" for n in c.networks.list(filters={"label": LABEL})]
        found += [f"docker-volume {v.name}" for v in c.volumes.list(filters={"label": LABEL})]
        found += [f"docker-image {', '.join(i['RepoTags'] or [i['Id'][:19]])}"
                  for i in c.api.images(filters={"label": BUILT})]
        return found


@owners.sweeper(owners.RUNTIMES + 5)
def sweep() -> None:
    """Remove every container, network and volume labelled ``cnlab``, and the images labs built
    (the busybox base image is kept: a cache every lab shares)."""
    import docker
    try:
        c = client(timeout=10)
    except EngineUnavailable:
        return
    with contextlib.closing(c):
        for container in c.api.containers(all=True, filters={"label": LABEL}):
            try:
                c.api.remove_container(container["Id"], force=True)
            except docker.errors.NotFound:  # a swarm task's container, gone meanwhile
                pass
        for network in c.networks.list(filters={"label": LABEL}):
            network.remove()
        for volume in c.volumes.list(filters={"label": LABEL}):
            volume.remove(force=True)
        for image in c.api.images(filters={"label": BUILT}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                c.api.remove_image(image["Id"], force=True)
