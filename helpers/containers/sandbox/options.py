"""A sandbox's options, declared once (lab 24): ``Sandbox(...)``, ``run(...)``, ``plan(...)``,
``Spec.parse``, ``python -m helpers sandbox run`` and the ``%%sandbox`` magic all read ``Options``.

Each field is one option: its default, its check (BadInput before anything exists), its help
and its command-line flags, docker run's names where docker has one. A flag that turns a
security default off (``--unmask``) stores False in the option it turns off (``mask_paths``).
"""
import argparse
import inspect
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from helpers._core import names
from helpers.containers import cgroups
import helpers.containers.sandbox.security as security
from helpers.errors import BadInput

NETWORKS = ("none", "host")
_GROUPS = {"limits": "limits", "container": "container",
           "security": "security (defaults like runc's; each can be turned off)"}


def _option(default: Any, *flags: str, help: str, group: str = "container",
            check: Callable[[Any], Any] | None = None,
            cli: Callable[[Any], dict] | None = None, **argument: Any) -> Any:
    """One option: ``check`` turns a value into its one checked form; ``flags`` are its command
    line (none: the Python API only), ``cli`` turns what argparse parsed into keyword arguments."""
    return field(default=default, metadata=dict(flags=flags, help=help, group=group, check=check,
                                                cli=cli, argument=argument))


# --- the checks -------------------------------------------------------------------------------

def _hostname(value) -> str:
    return names.check(value, "hostname", upper=True, punct=".-", most=63, kind="a host name")


def _network(value) -> str:
    if value not in NETWORKS:
        raise BadInput(f"network={value!r} is not a network mode",
                       fix='use "none" (its own network namespace, loopback only) or "host"')
    return value


def _workdir(value) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise BadInput(f"workdir={value!r} is not an absolute path", fix='use e.g. "/" or "/tmp"')
    return value


def user_ids(value) -> tuple[int, int] | None:
    """``"uid[:gid]"`` (or a number) as (uid, gid); None is root."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", str(value))
    if not match or int(match[1]) >= 2**32 - 1 or int(match[2] or 0) >= 2**32 - 1:
        raise BadInput(f"user={value!r} is not a user id", fix='use a number, or "uid:gid", e.g. "65534:65534"')
    uid = int(match[1])
    return uid, int(match[2]) if match[2] else uid


def env_vars(value) -> dict[str, str]:
    found = {}
    for key, item in (value or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) \
                or not isinstance(item, str) or "\0" in item:
            raise BadInput(f"env {key!r}={item!r} is not an environment variable",
                           fix='use names like "GREETING" and string values')
        found[key] = item
    return found


def _env_flags(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise BadInput(f"--env {item!r} is not KEY=VALUE", fix="e.g. --env GREETING=hello")
        values[key] = value
    return {"env": values}


def _cap_flags(items: list[str]) -> dict:
    """``--cap-add ALL`` is ``drop_caps=False``."""
    return {"cap_add": [c for c in items if c.upper() != "ALL"],
            "drop_caps": "ALL" not in {c.upper() for c in items}}


# --- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """Every option of a sandbox, checked when made: each value in its one form (``user="65534"``
    becomes (65534, 65534), ``cap_add`` a set of names). The limits are checked by ``limits()``.
    """
    memory: str | int | None = _option(None, "--memory", "-m", group="limits",
                                       help="memory limit: 64M, 1G, or bytes")
    cpus: str | float | None = _option(None, "--cpus", group="limits", help="CPU quota in cores: 0.5")
    pids: str | int | None = _option(None, "--pids", "--pids-limit", group="limits",
                                     help="most processes at once: 32")
    hostname: str = _option("sandbox", "--hostname", "-H", check=_hostname,
                            help="its hostname (default: sandbox)")
    rootfs: Any = _option(None, "--rootfs",          # checked by Spec.parse: it looks at the files
                          help="a root filesystem folder (default: the busybox rootfs)")
    user: str | int | None = _option(None, "--user", "-u", check=user_ids,
                                     help="uid[:gid] to run the command as (default: root)")
    env: dict | None = _option(None, "--env", "-e", check=env_vars, cli=_env_flags, action="append",
                               metavar="KEY=VALUE", help="an environment variable (repeatable)")
    workdir: str = _option("/", "--workdir", "-w", check=_workdir, help="working directory inside")
    userns: bool = _option(False, "--userns", check=bool,
                           help="a user namespace: root inside is uid 100000 outside")
    network: str = _option("none", "--network", check=_network, choices=NETWORKS,
                           help="none: loopback only (default); host: the host's network")
    host_upper: bool = _option(False, check=bool,
                               help="the upper layer in a folder on the host (Sandbox.upper), "
                                    "not on a tmpfs inside")
    drop_caps: bool = _option(True, group="security", check=bool,
                              help="drop every capability but DEFAULT_CAPS and cap_add from the "
                                   "bounding set (--cap-add ALL: don't)")
    cap_add: Any = _option((), "--cap-add", group="security", check=security.caps, cli=_cap_flags,
                           action="append", metavar="CAP",
                           help="keep this capability too (repeatable; ALL keeps every one)")
    no_new_privs: bool = _option(True, "--allow-new-privs", group="security", check=bool,
                                 help="do not set no_new_privs (setuid and file capabilities work)")
    mask_paths: bool = _option(True, "--unmask", group="security", check=bool,
                               help="do not mask /proc/kcore, /proc/keys, /proc/timer_list, /sys/firmware")
    readonly_paths: bool = _option(True, "--writable-proc", group="security", check=bool,
                                   help="leave /proc/sys, /proc/sysrq-trigger, /proc/irq, /proc/bus writable")
    devices: bool = _option(True, "--all-devices", group="security", check=bool,
                            help="no devices cgroup: any device node it makes can be opened")
    privileged: bool = _option(False, "--privileged", group="security", check=bool,
                               help="all of the above")

    def __post_init__(self):
        for name, check in _CHECKS:
            object.__setattr__(self, name, check(getattr(self, name)))

    def limits(self) -> cgroups.Limits:
        return cgroups.Limits.parse(memory=self.memory, cpus=self.cpus, pids=self.pids)


_CHECKS = [(f.name, f.metadata["check"]) for f in fields(Options) if f.metadata["check"] is not None]
Options.__doc__ = (Options.__doc__ or "").rstrip() + "\n\n" + "\n".join(
    f"    ``{f.name}={f.default!r}``: {f.metadata['help']}"
    + (f" ({', '.join(f.metadata['flags'])})" if f.metadata["flags"] else "") for f in fields(Options))


def with_options(fn: Callable) -> Callable:
    """Show every option, with its default, in ``fn(..., **options)``'s signature (help(), Tab)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
               for f in fields(Options)]
    fn.__signature__ = sig.replace(parameters=params)        # type: ignore[attr-defined]
    return fn


# --- the command line and %%sandbox -----------------------------------------------------------

def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m helpers sandbox run`` and of ``%%sandbox``, docker run's names."""
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in fields(Options):
        if not f.metadata["flags"]:
            continue
        argument = dict(f.metadata["argument"])
        if isinstance(f.default, bool):       # a flag: it turns the default around
            argument["action"] = "store_false" if f.default else "store_true"
        elif argument.get("action") == "append":
            argument["default"] = []
        else:
            argument["default"] = f.default
        groups[f.metadata["group"]].add_argument(*f.metadata["flags"], dest=f.name,
                                                 help=f.metadata["help"], **argument)
        if f.name == "pids":                  # run's own, after the limits
            groups["limits"].add_argument("--timeout", type=float, help="kill it after this many seconds")
    return parser


def options(args: argparse.Namespace) -> dict:
    """Parsed options -> keyword arguments for ``run``/``Sandbox`` (and ``timeout``)."""
    found: dict[str, Any] = {"timeout": args.timeout}
    for f in fields(Options):
        if f.metadata["flags"]:
            value = getattr(args, f.name)
            found.update(f.metadata["cli"](value) if f.metadata["cli"] else {f.name: value})
    return found
