"""The OCI runtime spec, run by runc: a bundle (``config.json`` + ``rootfs/``) through its lifecycle.

runc is what Docker and containerd call in the end (through a shim). Driven by hand, each step
of the runtime spec's lifecycle is visible::

    bundle = runc.Bundle.from_image(layout, "cnlab/hello:1")   # `runc spec`, edited, + the rootfs
    with runc.Container(bundle, "hello") as box:               # deleted at the end, whatever happens
        box.create()     # namespaces, cgroup, mounts ready; `runc init` waits: "created"
        box.start()      # the process in config.json runs:                          "running"
        box.kill("KILL") # ... and ends:                                              "stopped"
        box.delete()     # state and cgroup are gone
    box.output()         # what the process wrote to its stdout

runc keeps its state under ``--root`` (here /run/cnlab/runc), so these containers never mix
with Docker's (/run/docker/runtime-runc) or containerd's (/run/containerd/runc).

Used in: 25-oci-runc, book/containers/oci-docker-cri.
"""
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers._core import names, owners, procfs, wait
from helpers.errors import BadInput, LabError, LabTimeout, MissingTool

if TYPE_CHECKING:
    from helpers.containers import oci

ROOT = names.STATE / "runc"          # runc --root: one state.json per container
BUNDLES = names.STATE / "bundles"    # one bundle per container, named like it
STATUSES = ("creating", "created", "running", "stopped")   # the runtime spec's lifecycle


class RuncError(LabError):
    """runc refused a command; the message is runc's own."""


def runc(*args: object, timeout: float = 30, **options: Any) -> str:
    """Run ``runc --root ROOT <args>`` and return its stdout; RuncError with runc's message."""
    if shutil.which("runc") is None:
        raise MissingTool("runc")
    ROOT.mkdir(parents=True, exist_ok=True)
    command = ["runc", "--root", str(ROOT), *map(str, args)]
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    options.setdefault("env", procfs.marked_env())   # a runc left running is seen as the course's
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=timeout, **options)
    except subprocess.TimeoutExpired as e:
        raise LabTimeout(f"`{' '.join(command[3:])}` did not finish within {timeout} s",
                         fix="see `runc list`; sweep with helpers.runc.sweep()") from e
    if done.returncode != 0:
        said = _said((done.stderr or b"").decode(errors="replace"))
        raise RuncError(f"runc {args[0]} failed: {said or f'exit status {done.returncode}'}")
    return (done.stdout or b"").decode()


def _said(text):
    """runc's message without its log decoration (time="..." level=error msg="...")."""
    found = re.findall(r'msg="((?:[^"\\]|\\.)*)"', text)
    return (found[-1].encode().decode("unicode_escape") if found else text).strip()


def spec() -> dict[str, Any]:
    """The default config.json that ``runc spec`` writes, as a dict (made in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="cnlab-spec.") as folder:
        runc("spec", "--bundle", folder)
        return json.loads((Path(folder) / "config.json").read_text())


def _named(name):
    return names.prefixed(names.check(name or uuid.uuid4().hex[:12], "container name",
                                      punct="_.-", most=63))


class Bundle:
    """A runtime bundle: a folder with ``config.json`` (the runtime spec) and ``rootfs/``."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise BadInput(f"{self.path} is not a bundle (no config.json)",
                           fix="make one with runc.Bundle.from_image(layout, image)")

    @classmethod
    def from_image(cls, layout: "oci.Layout", image: str, name: str | None = None, *,
                   args: Iterable[str] | None = None, env: Iterable[str] = (), hostname: str = "cnlab",
                   readonly: bool = True) -> "Bundle":
        """Unpack ``image`` from an oci.Layout into a new bundle named ``cnlab-<name>``, with the
        config.json ``runc spec`` makes, edited: the image's command (or ``args``), env and
        working directory, ``hostname``, no terminal (stdio are plain files), a read-only root."""
        path = BUNDLES / _named(name)
        image_config = layout.config(image)["config"]       # BadInput here if there is no image
        command = list(args) if args is not None else \
            image_config.get("Entrypoint", []) + image_config.get("Cmd", [])
        if not command or not all(isinstance(a, str) for a in command):
            raise BadInput(f"no command to run for {image}", fix='pass args=["sh", "-c", "..."]')
        config = spec()
        process = config["process"]
        process.update(terminal=False, args=command, cwd=image_config.get("WorkingDir") or "/",
                       env=image_config.get("Env", []) + list(env))
        config["hostname"] = hostname
        config["root"] = {"path": "rootfs", "readonly": readonly}
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        try:
            layout.unpack(image, path / "rootfs")
            (path / "config.json").write_text(json.dumps(config, indent=2))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            BUNDLES.rmdir()               # the last bundle takes the folder with it

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class State:
    """What ``runc state`` says: the lifecycle status, and the pid of the container's process."""
    id: str
    status: str
    pid: int
    bundle: str


class Container:
    """One container run by runc from a bundle, named ``cnlab-<name>``. Its stdout and stderr go
    to files in the bundle (``stdout``, ``stderr``): with ``terminal: false`` and a detached
    ``runc create``, the container simply inherits the file descriptors runc was given.
    Leaving the ``with`` block deletes it (killing it if needed) and removes its bundle."""

    def __init__(self, bundle: Bundle | str | PathLike[str], name: str | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.id = _named(name) if name else self.bundle.path.name
        self.stdout = self.bundle.path / "stdout"
        self.stderr = self.bundle.path / "stderr"

    def create(self) -> State:
        """Set up namespaces, cgroup and mounts; the process is not started yet."""
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            try:
                runc("create", "--bundle", self.bundle.path, self.id, stdout=out, stderr=err)
            except RuncError as e:
                raise RuncError(f"runc create {self.id} failed: {_said(self.errors())}") from e
        return self.state()

    def start(self) -> State:
        """Run the process of config.json (runc init execs it)."""
        runc("start", self.id)
        return self.state()

    def state(self) -> State:
        raw = json.loads(runc("state", self.id))
        return State(raw["id"], raw["status"], raw["pid"], raw["bundle"])

    def kill(self, signal: str | int = "TERM") -> None:
        """Send a signal to the container's process (PID 1 inside: it ignores signals it has no
        handler for, so TERM may do nothing; KILL always works)."""
        runc("kill", self.id, signal)

    def wait(self, status: str = "stopped", timeout: float = 10) -> State:
        """Poll ``runc state`` until the container reaches ``status``."""
        if status not in STATUSES:
            raise BadInput(f"{status!r} is not a lifecycle status", fix=f"use one of {STATUSES}")
        last: list[State] = []

        def reached() -> bool:
            last[:] = [self.state()]
            return last[0].status == status
        wait.until(reached, timeout, f"container {self.id} to be {status}", interval=0.02,
                   error=lambda: LabTimeout(f"container {self.id} is still {last[0].status} "
                                            f"after {timeout} s, not {status}",
                                            fix="kill it with KILL, or wait longer"))
        return last[0]

    def delete(self, force: bool = False) -> None:
        """Remove runc's state and the container's cgroup (``force``: kill it first)."""
        runc("delete", *(["--force"] if force else []), self.id)

    def exists(self) -> bool:
        return any(c.id == self.id for c in containers())

    def output(self) -> str:
        return self.stdout.read_text() if self.stdout.exists() else ""

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.exists():
                self.delete(force=True)
        finally:
            self.bundle.remove()


def containers() -> list[State]:
    """Every container in the course's runc root, as States."""
    if not ROOT.is_dir() or shutil.which("runc") is None:
        return []
    found = json.loads(runc("list", "--format", "json") or "null") or []
    return [State(c["id"], c["status"], c["pid"], c["bundle"]) for c in found]


@owners.sweeper(owners.WORKLOADS)
def sweep() -> None:
    """Delete (forcibly) every container in the course's runc root, then the bundles."""
    for c in containers():
        with contextlib.suppress(RuncError):
            runc("delete", "--force", c.id)
    shutil.rmtree(BUNDLES, ignore_errors=True)
    if ROOT.is_dir() and not any(ROOT.iterdir()):
        ROOT.rmdir()
