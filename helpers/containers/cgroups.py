"""Control groups, v1 and v2 behind one API.

This machine kind is *hybrid*: the resource controllers sit on v1 hierarchies under
``/sys/fs/cgroup/<controller>`` and a controller-less cgroup2 is mounted at
``/sys/fs/cgroup/unified``. Most students' machines are v2 only. A ``Cgroup`` is one
directory per hierarchy it needs (every v1 controller hierarchy, plus the v2 one), each
called ``cnlab-<name>``; its limits go wherever their controller lives::

    with Cgroup("demo", memory="64M", cpus=0.5, pids=20) as group:
        ns.run(work, cgroup=group)           # the child adds itself before it starts work
        group.stats().oom_kills

A forked child joins with ``group.add()`` (it writes "0": "the process writing this").

Used in: 22-cgroups, 24-container-from-scratch, book/containers/container-from-scratch, book/containers/namespaces-cgroups.
"""
import contextlib
import errno
import math
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from helpers._core import names, owners, procfs, wait
from helpers.errors import BadInput, LabError, NotSupported


@dataclass(frozen=True)
class Layout:
    """Which cgroup hierarchies are mounted, and which controllers each one has."""
    v1: dict = field(default_factory=dict)   # controller -> mount point
    v2: Path | None = None                    # cgroup2 mount point
    v2_controllers: tuple = ()

    @property
    def version(self):
        if self.v1 and self.v2:
            return "hybrid"
        return "v1" if self.v1 else "v2" if self.v2 else "none"

    def where(self, controller):
        """Which hierarchy has this controller: "v2", "v1", or None."""
        if controller in self.v2_controllers:
            return "v2"
        return "v1" if controller in self.v1 else None


def detect(mountinfo=None):
    """This machine's Layout (or that of the mountinfo file ``mountinfo``: a test's)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for mount in procfs.mounts(table=mountinfo):
        if mount.fstype == "cgroup2" and v2 is None:
            v2 = Path(mount.point)
        elif mount.fstype == "cgroup":
            for opt in mount.super_options.split(","):
                if opt.startswith("name="):
                    continue
                if opt not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
                               "clone_children", "noprefix", "xattr") \
                        and not opt.startswith("release_agent="):
                    v1.setdefault(opt, Path(mount.point))
    controllers: tuple[str, ...] = ()
    if v2 is not None:
        try:
            controllers = tuple((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            pass
    return Layout(v1=v1, v2=v2, v2_controllers=controllers)


# --- strict parsing of limits -----------------------------------------------------------------

SIZE_FORMS = "a whole number of bytes (1048576) or a number with K, M, G or T (512K, 64M, 1.5G)"
CPU_FORMS = "a number of cores greater than 0 (0.5, 2)"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_size(value, what="memory"):
    """``64M`` -> 67108864. Units are binary (K = 1024). Zero, negatives and ``64X`` are BadInput."""
    if isinstance(value, int) and not isinstance(value, bool):
        number: float | int = value
        unit = ""
    else:
        match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if not match or (not match[2] and "." in match[1]):
            raise BadInput(f"{what}={value!r} is not a size", fix=f"use {SIZE_FORMS}")
        number, unit = float(match[1]) if "." in match[1] else int(match[1]), match[2]
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise BadInput(f"{what}={value!r} must be more than 0 bytes", fix=f"use {SIZE_FORMS}")
    return size


def parse_cpus(value, what="cpus"):
    """``0.5`` or ``"0.5"`` -> 0.5 cores. Zero, negatives, ``inf`` and words are BadInput."""
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{what}={value!r} is not an amount of CPU", fix=f"use {CPU_FORMS}")
    return float(value)


def _whole(value, what, low, high, forms):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f"{what}={value!r} is out of range", fix=f"use {forms}")
    return value


@dataclass(frozen=True)
class Limits:
    """Validated limits, in kernel units. None means "not limited"."""
    memory: int | None = None        # bytes
    cpus: float | None = None        # cores: quota = cpus * period
    cpu_period: int = 100_000        # microseconds
    cpu_weight: int | None = None    # 1..10000, cgroup v2's scale (100 is the default share)
    pids: int | None = None
    cpuset: str | None = None        # CPUs the group may run on: "0", "0-1", "0,2"

    @classmethod
    def parse(cls, *, memory=None, cpus=None, cpu_period=100_000, cpu_weight=None, pids=None,
              cpuset=None):
        """Check every limit strictly; raise BadInput saying the accepted forms."""
        period = _whole(cpu_period, "cpu_period", 1000, 1_000_000,
                        "microseconds from 1000 to 1000000 (100000 is 0.1 s)")
        cores = None if cpus is None else parse_cpus(cpus)
        if cores is not None and cores * period < 1000:
            raise BadInput(f"cpus={cpus!r} is less than the kernel's smallest quota (1 ms per period)",
                           fix=f"use at least {1000 / period:g} cores, or a longer cpu_period")
        if cpuset is not None:
            online = os.cpu_count() or 1
            if not isinstance(cpuset, str) or not _CPU_LIST.fullmatch(cpuset) \
                    or max(int(n) for n in re.split(r"[-,]", cpuset)) >= online:
                raise BadInput(f"cpuset={cpuset!r} is not a list of this machine's CPUs",
                               fix=f'use CPU numbers from 0 to {online - 1}, e.g. "0" or "0-1"')
        return cls(
            memory=None if memory is None else parse_size(memory),
            cpus=cores, cpu_period=period,
            cpu_weight=None if cpu_weight is None else _whole(
                cpu_weight, "cpu_weight", 1, 10_000, "a whole number from 1 to 10000 (100 is the default)"),
            pids=None if pids is None else _whole(pids, "pids", 1, 4_194_304,
                                                  "a whole number of processes, at least 1"),
            cpuset=cpuset)

    def controllers(self):
        """The controllers these limits need."""
        needs = {"memory": self.memory, "cpu": self.cpus or self.cpu_weight,
                 "pids": self.pids, "cpuset": self.cpuset}
        return [c for c, v in needs.items() if v is not None]


@dataclass(frozen=True)
class Stats:
    """Usage and event counters of a group; None where this machine has no such counter."""
    memory_current: int | None      # bytes in use now
    memory_peak: int | None         # the most bytes ever in use
    oom_kills: int | None           # processes the OOM killer killed in the group
    cpu_usage_us: int | None        # CPU time used, microseconds
    cpu_periods: int | None         # enforcement periods with runnable tasks (quota set)
    cpu_throttled: int | None       # ... of which the group ran out of quota
    cpu_throttled_us: int | None    # time spent throttled, microseconds
    pids_current: int | None        # tasks in the group now
    pids_refused: int | None        # forks refused because of the pids limit


# --- the group --------------------------------------------------------------------------------

_V1_USED = ("memory", "cpu", "cpuacct", "cpuset", "pids", "freezer")   # joined when mounted
_V2_USED = ("memory", "cpu", "cpuset", "pids")                         # enabled when available
_BUSY_TIMEOUT = 10.0                                                   # seconds, for kill/remove


class Cgroup:
    """A control group named ``cnlab-<name>``, created now, removed by ``remove()`` or at the
    end of a ``with`` block. Bad limits (BadInput) and limits the machine can't apply
    (NotSupported) are refused before anything is created.

    ``paths`` maps each hierarchy it lives in ("v2", or a v1 controller name) to its directory;
    ``settings`` maps each file a limit was written to to the value.
    ``parent`` (another Cgroup) nests it; ``layout`` (from ``detect()``, or a fake tree in
    tests) says where the hierarchies are.
    """

    def __init__(self, name=None, *, memory=None, cpus=None, cpu_period=100_000, cpu_weight=None,
                 pids=None, cpuset=None, parent=None, layout=None):
        self.limits = Limits.parse(memory=memory, cpus=cpus, cpu_period=cpu_period,
                                   cpu_weight=cpu_weight, pids=pids, cpuset=cpuset)
        self.layout = layout or (parent.layout if parent else detect())
        self.name = _named(name)
        self.paths = self._plan(parent)
        self.settings = {}         # cgroup file -> the value written to it, for show and tell
        missing = [c for c in self.limits.controllers() if self._dir(c) is None]
        if missing:
            raise NotSupported(
                f"this machine's cgroups ({self.layout.version}) have no {' or '.join(missing)} "
                f"controller, so that limit cannot be applied",
                fix="drop that limit, or use a machine (or VM) whose kernel enables the controller")
        taken = [str(p) for p in self.paths.values() if p.exists()]
        if taken:
            raise LabError(f"cgroup {taken[0]} already exists",
                           fix="pick another name, or run helpers.cleanup() to remove leftovers")
        try:
            self._create()
        except BaseException:
            self.remove()
            raise

    def _plan(self, parent):
        paths = {}
        if self.layout.v2 is not None:
            paths["v2"] = (parent.paths["v2"] if parent else self.layout.v2) / self.name
        for controller in _V1_USED:
            if controller in self.layout.v1 and controller not in self.layout.v2_controllers:
                base = parent.paths[controller] if parent else self.layout.v1[controller]
                paths[controller] = base / self.name
        return paths

    def _dir(self, controller):
        """The directory whose files belong to this controller, or None."""
        where = self.layout.where(controller)
        return self.paths.get("v2" if where == "v2" else controller) if where else None

    @property
    def dirs(self):
        """Each directory once (co-mounted v1 controllers, e.g. cpu,cpuacct, share one)."""
        return list(dict.fromkeys(self.paths.values()))

    def _create(self):
        if "v2" in self.paths:
            available = set(_read(self.paths["v2"].parent / "cgroup.controllers").split())
            wanted = [c for c in _V2_USED if c in available]
            if wanted:     # a v2 group only has the controllers its parent hands down
                write(self.paths["v2"].parent / "cgroup.subtree_control",
                      " ".join(f"+{c}" for c in wanted))
        for path in self.dirs:
            os.mkdir(path)
        cpuset = self.paths.get("cpuset")
        if cpuset:         # a v1 cpuset starts empty, and an empty cpuset takes no tasks
            for name in ("cpuset.cpus", "cpuset.mems"):
                write(cpuset / name, (cpuset.parent / name).read_text().strip())
        self._apply()

    def _apply(self):
        """Write each limit where its controller lives; ``settings`` records what went where."""
        lim, v2 = self.limits, self.layout.where

        def put(controller, name, value, optional=False):
            path = self._dir(controller) / name
            if write(path, value, optional=optional):
                self.settings[str(path)] = str(value)

        if lim.memory is not None:
            if v2("memory") == "v2":
                put("memory", "memory.max", lim.memory)
                put("memory", "memory.swap.max", 0, optional=True)
            else:
                put("memory", "memory.limit_in_bytes", lim.memory)
                put("memory", "memory.memsw.limit_in_bytes", lim.memory, optional=True)
        if lim.cpus is not None:
            quota = round(lim.cpus * lim.cpu_period)
            if v2("cpu") == "v2":
                put("cpu", "cpu.max", f"{quota} {lim.cpu_period}")
            else:
                put("cpu", "cpu.cfs_period_us", lim.cpu_period)
                put("cpu", "cpu.cfs_quota_us", quota)
        if lim.cpu_weight is not None:
            if v2("cpu") == "v2":
                put("cpu", "cpu.weight", lim.cpu_weight)
            else:          # v1 shares: 1024 is the default, as 100 is for v2 weights
                put("cpu", "cpu.shares", max(2, lim.cpu_weight * 1024 // 100))
        if lim.pids is not None:
            put("pids", "pids.max", lim.pids)
        if lim.cpuset is not None:
            put("cpuset", "cpuset.cpus", lim.cpuset)

    # -- membership --

    def add(self, pid=0):
        """Move a process (default: the one calling, e.g. a forked child) into the group."""
        for path in self.dirs:
            try:
                write(path / "cgroup.procs", pid)
            except LabError as e:
                inner = (path == self.paths.get("v2") and isinstance(e.__cause__, OSError)
                         and e.__cause__.errno == errno.EBUSY)   # v2's no-internal-process rule
                fix = ("on cgroup v2 a group that hands the memory or io controller down to "
                       "sub-groups holds no processes itself: add it to a sub-group") if inner else \
                    "is the process still running, and the group not removed?"
                raise LabError(f"cannot move pid {pid} into {path}: {e.__cause__}", fix=fix) from e

    def procs(self):
        """The pids in the group (as seen from this process's PID namespace)."""
        found = set()
        for path in self.dirs:
            found.update(_pids(path))
        return sorted(found)

    # -- usage --

    def stats(self):
        """What the group used, and the events its limits caused, as a Stats."""
        return stats_in(self.paths, self.layout)

    # -- freezing and killing --

    def _freezer(self):
        """("v2", cgroup.freeze) or ("v1", freezer.state) or NotSupported."""
        if "v2" in self.paths and (self.paths["v2"] / "cgroup.freeze").exists():
            return "v2", self.paths["v2"]
        if "freezer" in self.paths:
            return "v1", self.paths["freezer"]
        raise NotSupported("this machine's cgroups have no freezer (cgroup.freeze needs Linux 5.2)")

    def freeze(self, timeout=5.0):
        """Stop every process in the group until ``thaw()``; return when they all are stopped."""
        kind, path = self._freezer()
        if kind == "v2":
            write(path / "cgroup.freeze", 1)
            _until(lambda: _keyed(path / "cgroup.events").get("frozen") == 1, timeout, f"{path} to freeze")
        else:
            write(path / "freezer.state", "FROZEN")
            _until(lambda: _read(path / "freezer.state").strip() == "FROZEN", timeout, f"{path} to freeze")

    def thaw(self):
        kind, path = self._freezer()
        if kind == "v2":
            write(path / "cgroup.freeze", 0)
        else:
            write(path / "freezer.state", "THAWED")

    @property
    def frozen(self):
        kind, path = self._freezer()
        if kind == "v2":
            return _keyed(path / "cgroup.events").get("frozen") == 1
        return _read(path / "freezer.state").strip() == "FROZEN"

    def kill(self, timeout=_BUSY_TIMEOUT):
        """SIGKILL every process in the group and its sub-groups; return once they are gone."""
        _kill_trees(self.dirs, timeout)

    def remove(self, timeout=_BUSY_TIMEOUT):
        """Kill the processes, remove sub-groups first, retry while the kernel says EBUSY.
        A group that is already gone counts as removed, so removing twice is fine."""
        try:      # an empty group (its processes gone): one rmdir a directory, the fast way
            for path in self.dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(path)
            return
        except OSError:
            pass
        self.kill(timeout)
        for path in self.dirs:
            _remove_tree(path, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"<Cgroup {self.name} in {self.layout.version}: {', '.join(self.paths)}>"


def _named(name):
    if name is None:
        return names.name("cg", uuid.uuid4().hex[:12])
    return names.prefixed(names.check(name, "cgroup name", upper=True, punct="_.-", most=64))


# --- files ------------------------------------------------------------------------------------

def write(path, *values, optional=False):
    """Write each value to an existing cgroup file, one write(2) each (a devices.allow reads one
    rule a write); True when written. No such file: the kernel lacks the feature (NotSupported,
    or False when ``optional``); EINVAL: it refused the value."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except FileNotFoundError as e:
        if optional:
            return False
        raise NotSupported(f"{path} does not exist: this kernel cannot apply that setting") from e
    try:
        for value in values:
            os.write(fd, str(value).encode())
    except OSError as e:
        kind = BadInput if e.errno in (errno.EINVAL, errno.ERANGE) else LabError
        raise kind(f"the kernel refused {value!r} for {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    return True


def _read(path):
    """A cgroup file's text, or "" when it (or its group) does not exist. Plain os calls: a
    container start reads several of these, and Path.read_text costs 30-70 us a file here."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _number(directory, name):
    if directory is None:
        return None
    text = _read(directory / name).strip()
    return int(text) if text.isdigit() else None


def _keyed(path):
    """A flat-keyed file ("populated 1", "oom_kill 0") as {key: int}; {} if it is missing."""
    values = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _pids(path):
    return [int(p) for p in _read(path / "cgroup.procs").split()]


def _tree(path):
    """Every directory of a cgroup, deepest first (the order they can be removed in)."""
    found = []
    for top, dirs, _ in os.walk(path, topdown=False):
        found.append(Path(top))
    return found


def _until(done, timeout, what):
    """Poll the kernel's cgroup files: a first look after 2 ms, then no more than every 0.1 s."""
    return wait.until(done, timeout, what, interval=0.002, backoff=0.1)


def _kill_trees(paths, timeout):
    """cgroup.kill where the kernel has it (v2, Linux 5.14); else SIGKILL each pid, again and
    again, until no process is left (a fork racing the kill is caught by the next round). A v1
    frozen group is thawed first: its tasks can't die while frozen."""
    for path in paths:
        write(path / "cgroup.kill", 1, optional=True)
        write(path / "freezer.state", "THAWED", optional=True)

    def empty():
        left = [pid for path in paths for sub in _tree(path) for pid in _pids(sub)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not left

    _until(empty, timeout, f"the processes in {paths[0].name} to die" if paths else "nothing")


def remove_top(*patterns):
    """Remove the groups at the top of every hierarchy whose names match ``patterns`` (globs),
    with what is left inside them: runc makes a container's parent group (a pod's, a private
    engine's ``cgroup-parent``) in each hierarchy, v1 and v2."""
    remove_dirs(sorted({p for root in _hierarchies() for pattern in patterns
                        for p in root.glob(pattern) if p.is_dir()}))


def remove_dirs(paths, timeout=_BUSY_TIMEOUT):
    """Kill every process in these cgroup directories, then remove them, sub-groups first,
    retrying while the kernel says EBUSY (already gone counts as removed). For groups made
    outside ``Cgroup``, such as the sandbox's devices group, and for ``sweep()``."""
    paths = [Path(p) for p in paths]
    _kill_trees(paths, timeout)
    for path in paths:
        _remove_tree(path, timeout)


def _remove_tree(path, timeout):
    deadline = time.monotonic() + timeout
    for sub in _tree(path):
        busy: list[OSError] = []

        def removed():
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise _unremovable(sub, e) from e
                busy[:] = [e]
                return False
            return True
        wait.until(removed, wait.remaining(deadline), f"cgroup {sub} to be removed", interval=0.005,
                   backoff=0.2, error=lambda: _unremovable(sub, busy[0]))


def _unremovable(sub, e):
    error = LabError(f"cannot remove cgroup {sub}: {e.strerror}",
                     fix="see which processes are left in its cgroup.procs, then run helpers.cleanup()")
    error.__cause__ = e
    return error


def of_process(pid):
    """{controller: folder} of any process (a Docker container's, say), read from
    /proc/<pid>/cgroup ("v2" for the cgroup2 hierarchy), where this machine mounts each one."""
    layout = detect()
    folders = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["v2"]:
            base = layout.v2 if controller == "v2" else layout.v1.get(controller)
            if base is not None:
                folders[controller] = base / path.lstrip("/")
    return folders


def stats_in(folders, layout=None):
    """The Stats of cgroup folders: a Cgroup's ``paths``, or any process's (from ``of_process``)."""
    layout = layout or detect()

    def folder(controller):
        where = layout.where(controller)
        return folders.get("v2" if where == "v2" else controller) if where else None

    mem, cpu, pids = folder("memory"), folder("cpu"), folder("pids")
    v2 = {c: layout.where(c) == "v2" for c in ("memory", "cpu")}
    # every v2 group counts its CPU time, with or without controllers; v1 counts nanoseconds
    usage = _keyed(folders["v2"] / "cpu.stat").get("usage_usec") if "v2" in folders else None
    if usage is None and "cpuacct" in folders:
        nanoseconds = _number(folders["cpuacct"], "cpuacct.usage")
        usage = None if nanoseconds is None else nanoseconds // 1000
    throttling = _keyed(cpu / "cpu.stat") if cpu else {}
    throttled = throttling.get("throttled_usec")
    if throttled is None and "throttled_time" in throttling:          # v1 counts nanoseconds
        throttled = throttling["throttled_time"] // 1000
    return Stats(
        memory_current=_number(mem, "memory.current" if v2["memory"] else "memory.usage_in_bytes"),
        memory_peak=_number(mem, "memory.peak" if v2["memory"] else "memory.max_usage_in_bytes"),
        oom_kills=_keyed(mem / ("memory.events" if v2["memory"] else "memory.oom_control"))
        .get("oom_kill") if mem else None,
        cpu_usage_us=usage,
        cpu_periods=throttling.get("nr_periods"),
        cpu_throttled=throttling.get("nr_throttled"),
        cpu_throttled_us=throttled,
        pids_current=_number(pids, "pids.current"),
        pids_refused=_keyed(pids / "pids.events").get("max") if pids else None)


# where each limit is written: (controller, v1 files, v2 files)
_LIMIT_FILES = (("memory", ("memory.limit_in_bytes",), ("memory.max",)),
                ("cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
                 ("cpu.max", "cpu.weight")),
                ("pids", ("pids.max",), ("pids.max",)))


def limit_files(folders):
    """{file: its text} of the files that hold a process's memory, CPU and pids limits and its
    CPU share (from ``of_process``): v1 files where the controller is on a v1 hierarchy, else
    v2 files. A file that is missing (no such controller) is left out."""
    found = {}
    for controller, v1_files, v2_files in _LIMIT_FILES:
        folder, files = (folders[controller], v1_files) if controller in folders \
            else (folders.get("v2"), v2_files)
        for name in files if folder else ():
            text = _read(folder / name).strip()
            if text:
                found[folder / name] = text
    return found


def limits_in(folders):
    """The memory, CPU and pids limits in a process's cgroup folders (from ``of_process``).
    None: no limit."""
    return _limits(_words(folders))


def _words(folders):
    """Each limit file's name, and its text split in words."""
    return {path.name: text.split() for path, text in limit_files(folders).items()}


def _limits(words):
    memory = words.get("memory.limit_in_bytes") or words.get("memory.max")
    quota = words.get("cpu.max") or (words.get("cpu.cfs_quota_us", []) + words.get("cpu.cfs_period_us", []))
    pids = words.get("pids.max")
    unlimited = ("max", "-1")
    return {"memory": None if not memory or memory[0] in unlimited or int(memory[0]) >= 2**62
            else int(memory[0]),       # v1 says "no limit" with a huge number
            "cpus": None if len(quota) < 2 or quota[0] in unlimited else int(quota[0]) / int(quota[1]),
            "pids": None if not pids or pids[0] in unlimited else int(pids[0])}


def sample(groups, seconds, every=0.1):
    """Read the stats of each group every ``every`` seconds for ``seconds`` seconds: a list of
    (seconds since the start, [Stats of each group]), for plotting usage over time."""
    start, samples = time.monotonic(), []
    while True:
        elapsed = time.monotonic() - start
        samples.append((elapsed, [group.stats() for group in groups]))
        if elapsed >= seconds:
            return samples
        time.sleep(min(every, max(0.0, seconds - elapsed)))


def _hierarchies():
    """Every mounted cgroup hierarchy, v2 first, named ones (name=systemd) included."""
    points = {(m.fstype != "cgroup2", Path(m.point)) for m in procfs.mounts()
              if m.fstype in ("cgroup2", "cgroup")}
    return [point for _, point in sorted(points)]


@owners.sweeper(owners.KERNEL + 5)
def sweep(prefix=names.PREFIX):
    """Kill the processes in, then remove, every cnlab cgroup (or those whose name starts with
    ``prefix``) in every hierarchy."""
    ours = []
    for root in _hierarchies():
        for top, dirs, _ in os.walk(root):
            mine = [d for d in dirs if d.startswith(prefix)]
            ours += [Path(top) / d for d in mine]
            dirs[:] = [d for d in dirs if d not in mine]     # their insides go with them
    remove_dirs(ours)


def held(folders):
    """The limits the kernel holds for a group, in words that are the same on v1, v2 and hybrid:
    ``limits_in``'s memory (bytes), cpus and pids, and cpu_weight on v2's scale (v1's cpu.shares
    read back: 1024 is 100). ``folders``: a Cgroup's ``paths``, or a process's (``of_process``).
    Which files hold them is the layout's business: a Cgroup's ``settings`` names them."""
    words = _words(folders)
    weight, shares = words.get("cpu.weight"), words.get("cpu.shares")
    return {**_limits(words),
            "cpu_weight": int(weight[0]) if weight else round(int(shares[0]) * 100 / 1024) if shares else None}
