"""Where the course keeps its things, and how it names them.

Every resource the helpers create carries the prefix ``cnlab`` (cgroups, mount points under
``STATE``, network namespaces, containers and their labels, data directories), so that
``helpers.cleanup()`` can find what a crash left, and ``helpers.leftovers()`` can prove that
nothing was.
"""
import functools
import os
import re
import socket
from pathlib import Path

from helpers.errors import BadInput

PREFIX = "cnlab"
LABEL = PREFIX  # Docker/containerd label key: {"cnlab": "<owner>"}
ROOT = Path(__file__).resolve().parents[2]          # the course checkout
LABS = ROOT / "labs"
# Survives runs and checkouts: the kernel, the rootfs, built binaries. Shared by every clone.
CACHE = Path(os.environ.get("CNLAB_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / PREFIX)
STATE = Path(os.environ.get("CNLAB_STATE", f"/run/{PREFIX}"))     # per-run: mounts, sockets, data


def name(*parts) -> str:
    """A resource name that ``cleanup()`` will recognise: ``cnlab-<parts>``."""
    return "-".join((PREFIX, *map(str, parts)))


def prefixed(given: str) -> str:
    """``given`` as the course names it: unchanged when it already starts with ``cnlab-``."""
    return given if given.startswith(f"{PREFIX}-") else name(given)


def state_dir(*parts) -> Path:
    path = STATE.joinpath(*map(str, parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


def partial(target: Path) -> Path:
    """Where to build ``target`` before renaming it into place: beside it, named by this process,
    so that a crashed build is found (``helpers.leftovers()``) and never mistaken for the real one."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)")


def publish(target: Path, data: bytes) -> Path:
    """Write ``target`` atomically: a concurrent reader sees the whole file or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = partial(target)
    scratch.write_bytes(data)
    scratch.replace(target)
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (servers stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _rule(upper: bool, punct: str, most: int, dns: bool) -> re.Pattern:
    alnum = "A-Za-z0-9" if upper else "a-z0-9"
    body = f"[{alnum}{re.escape(punct)}]"
    if dns:     # a DNS label ends in a letter or digit too
        return re.compile(f"[{alnum}](?:{body}{{0,{most - 2}}}[{alnum}])?")
    return re.compile(f"[{alnum}]{body}{{0,{most - 1}}}")


def check(value: object, what: str, *, upper: bool = False, punct: str = "-", most: int = 31,
          dns: bool = False, kind: str = "a usable name", fix: str | None = None) -> str:
    """``value`` if it is a name by the one rule of the course, else ``BadInput`` ("<what>
    <value> is not <kind>"): a letter or digit (lower-case unless ``upper``), then letters, digits
    and the characters of ``punct``, at most ``most`` in all (``dns``: ending in a letter or
    digit, as a DNS label). Every name a student passes in is checked here (cgroups, netns,
    containers, servers, clusters)."""
    if not isinstance(value, str) or not _rule(upper, punct, most, dns).fullmatch(value):
        marks = [f"'{c}'" for c in punct]
        chars = ", ".join(["letters" if upper else "lower-case letters", "digits", *marks[:-1]])
        chars += f" and {marks[-1]}" if marks else ""
        raise BadInput(f"{what} {value!r} is not {kind}",
                       fix=fix or f"use {chars} (at most {most} characters)")
    return value
