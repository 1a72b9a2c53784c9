"""The container (lab 24): ``Sandbox`` starts one and removes it, ``run`` waits for one command,
``plan`` shows the steps; each returns how the command ended, and what its cgroup saw.

The parent's part, in order: check the input (``Spec.parse``); spawn the container's process
(``spawn.launch``), which takes the steps of ``inside.plan``; meanwhile make its cgroup and put
the process in it (runc does the same); wait for it while reading its output; read the
cgroup's counters; remove everything.
"""
import dataclasses
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from helpers._core import libc, names
from helpers.containers import cgroups, ns, rootfs
import helpers.containers.sandbox.inside as inside
import helpers.containers.sandbox.security as security
import helpers.containers.sandbox.spawn as spawn
from helpers.containers.sandbox.options import env_vars, user_ids, with_options
from helpers.containers.sandbox.spec import CommandNotFound, Spec, command_argv, environment, layout
from helpers.errors import LabError

INIT = ("sleep", "infinity")       # PID 1 of a Sandbox made without a command
ROOT_OUTSIDE = ns.DEFAULT_ID_MAP[0][1]   # with userns=True: root inside is this uid outside
_SCRATCH = rootfs.STATE / "scratch"      # an empty folder each container mounts a tmpfs on
_NAMESPACES = ns.flags(["mnt", "uts", "ipc", "pid"])

Command = str | Sequence[str | os.PathLike]


@dataclass
class Result:
    """How a container (or one ``exec`` in it) ended, and what its cgroup saw."""
    command: tuple
    status: int                  # as a shell reports it: exit code, or 128 + signal
    signal: int | None           # the signal that ended it (9 for an OOM kill or a timeout)
    output: str                  # stdout and stderr, interleaved as written
    oom_killed: bool             # the OOM killer killed a process in it
    pids_limited: bool           # a fork was refused because of the pids limit
    throttled: bool              # it ran out of CPU quota in at least one period
    timed_out: bool              # killed because ``timeout`` seconds passed
    seconds: float               # from the call to the result: start, run and clean-up
    startup: float               # from the call until the command was exec'd
    memory_peak: int | None      # bytes: the most its cgroup ever used
    cpu_seconds: float | None    # CPU time used
    pid: int = field(repr=False, default=0)   # the host's pid of the process

    @property
    def ok(self) -> bool:
        return self.status == 0

    def summary(self) -> str:
        """One line: the exit status and what the limits did."""
        events = [what for what, happened in (("OOM-killed", self.oom_killed),
                                              ("hit its pids limit", self.pids_limited),
                                              ("throttled", self.throttled),
                                              ("timed out", self.timed_out)) if happened]
        return f"exit status {self.status}" + (f" ({', '.join(events)})" if events else "")


def _result(argv, status, output, timed_out, launch, t0, stats, before=None):
    def grew(name):
        now, then = getattr(stats, name), getattr(before, name) if before else 0
        return bool(now and now > (then or 0))
    code, sig = spawn.decode(status)
    return Result(command=argv, status=code, signal=sig, output=output,
                  oom_killed=grew("oom_kills"), pids_limited=grew("pids_refused"),
                  throttled=grew("cpu_throttled"), timed_out=timed_out,
                  seconds=time.perf_counter() - t0,
                  startup=(launch.started or time.perf_counter()) - t0,
                  memory_peak=stats.memory_peak,
                  cpu_seconds=None if stats.cpu_usage_us is None else stats.cpu_usage_us / 1e6,
                  pid=launch.pid or 0)


def _group_layout(limits):
    """Only the hierarchies this container needs (v1 has one directory per controller): memory
    always (its peak, OOM kills), cpuacct for CPU time, cpu and pids when limited."""
    full = layout()
    wanted = {"memory", "cpuacct"} | set(limits.controllers())
    v1 = {c: p for c, p in full.v1.items() if c in wanted and c not in full.v2_controllers}
    keep_v2 = full.v2 is not None and bool(wanted & set(full.v2_controllers))
    return cgroups.Layout(v1=v1, v2=full.v2 if keep_v2 else None,
                          v2_controllers=full.v2_controllers if keep_v2 else ())


def _scratch(lowers):
    """Overlay options and mount point for an upper layer on a tmpfs in the container's own mount
    namespace, mounted on an empty folder that only that namespace ever sees filled."""
    _SCRATCH.mkdir(parents=True, exist_ok=True)
    return (rootfs.overlay_options(lowers, _SCRATCH / "upper", _SCRATCH / "work"),
            _SCRATCH / "root", _SCRATCH)


@with_options
def plan(command: Command = INIT, **options: Any) -> inside.Plan:
    """The steps a container started with these options would take, to read or to take one
    group at a time in a child of your own: ``for step in plan().rootfs: step()``."""
    spec = Spec.parse(command, **options)
    return inside.plan(spec, *_scratch(spec.lowers))


class Sandbox:
    """A container, started now; removed (processes, cgroup, upper layer) by ``close()`` or at
    the end of a ``with`` block.

    ``command`` runs as PID 1 (default: ``sleep infinity``, to ``exec`` commands in it). The
    options are ``Options``' (``help(sandbox.Options)``): limits (``memory="64M"``, ``cpus=0.5``,
    ``pids=32``); ``rootfs``, a folder or a list of layer folders (default: the busybox rootfs),
    never written to: an overlay's upper layer takes the writes, a tmpfs in the container's own
    mount namespace (gone with it), or with ``host_upper=True`` a folder on the host (``upper``)
    to look at from outside; ``userns``, ``network``, ``user``, ``env``, ``workdir``; and the
    security defaults, each of which can be turned off to see what it protects (``drop_caps``,
    ``no_new_privs``, ``mask_paths``, ``readonly_paths``, ``devices``; ``privileged=True``: all).
    """

    @with_options
    def __init__(self, command: Command | None = None, **options: Any) -> None:
        self._t0 = time.perf_counter()
        self.spec = Spec.parse(INIT if command is None else command, **options)
        self.id = uuid.uuid4().hex[:12]
        self.name = names.name("sandbox", self.id)
        self.overlay = self.cgroup = self._devices = self._launch = self._result = None
        self.pid = self.steps = None
        try:
            if self.spec.host_upper:
                self.overlay = rootfs.Overlay(self.spec.lowers,
                                              owner=ROOT_OUTSIDE if self.spec.userns else None)
            self._launch = self._start()
            self.pid = self._launch.pid
        except BaseException:
            self._teardown()
            raise

    def _start(self):
        if self.overlay is not None:
            self.steps = inside.plan(self.spec, self.overlay.options, self.overlay.merged)
        else:     # a tmpfs on a scratch folder, in the container's mount namespace only
            self.steps = inside.plan(self.spec, *_scratch(self.spec.lowers))
        self.spec.exec_args          # noqa: B018 -- built here, not in the child
        flags = _NAMESPACES | (libc.CLONE_NEWNET if self.spec.network == "none" else 0)

        def mount_rootfs():      # with a user namespace, the launcher, root on the host, mounts
            libc.unshare(libc.CLONE_NEWNS)     # the overlay in a mount namespace of its own,
            for step in self.steps.rootfs:       # which the container's is a copy of
                step()
        if self.spec.userns:
            flags |= libc.CLONE_NEWUSER
        launch = spawn.launch(inside.container(self.spec, self.steps), flags=flags,
                              before=mount_rootfs if self.spec.userns else None)
        self._launch = launch              # for _teardown, should the start fail
        launch.start(prepare=self._make_cgroup, join=self._join, map_ids=(
            (lambda pid: ns.write_id_maps(pid, ns.DEFAULT_ID_MAP, ns.DEFAULT_ID_MAP))
            if self.spec.userns else None))
        return launch

    def _make_cgroup(self):
        """The cgroup, made while the container's process sets up its namespaces."""
        lim = self.spec.limits
        self.cgroup = cgroups.Cgroup(self.name, memory=lim.memory, cpus=lim.cpus, pids=lim.pids,
                                     layout=_group_layout(lim))
        if self.spec.devices and layout().where("devices") == "v1":
            self._devices = security.DevicesGroup(layout().v1["devices"] / self.name)

    def _join(self, pid):
        self.cgroup.add(pid)
        if self._devices is not None:
            self._devices.add(pid)

    @property
    def upper(self):
        """The container's writable layer, on the host: every file it changed, every whiteout."""
        if self.overlay is None:
            raise LabError("this sandbox's upper layer is a tmpfs inside its own mount namespace",
                           fix="start it with host_upper=True to see the upper layer from the host")
        return self.overlay.upper

    @property
    def running(self) -> bool:
        return self._result is None and self._launch is not None and self._launch.alive

    def stats(self) -> cgroups.Stats:
        """The cgroup's counters now (see helpers.cgroups.Stats)."""
        return self.cgroup.stats()

    def exec(self, command: Command, *, timeout: float | None = None, user: str | int | None = None,
             env: dict[str, str] | None = None, workdir: str | None = None) -> Result:
        """Run another command in the container (like ``docker exec``): same namespaces,
        cgroup, root and security settings; return its Result."""
        t0 = time.perf_counter()
        if not self.running:
            raise LabError("the sandbox is not running", fix="start a new one")
        argv = command_argv(command)
        path = rootfs.lookup(f"/proc/{self.pid}/root", argv[0])   # the container's view
        if path is None:
            raise CommandNotFound(f"{argv[0]!r} is not an executable file in the container",
                                  fix="use a busybox applet, or a full path")
        ids = user_ids(user)
        spec = dataclasses.replace(
            self.spec, argv=argv, path=path,
            env=environment(env_vars(env), self.spec.hostname, ids) if env or user else self.spec.env,
            user=ids if user is not None else self.spec.user, workdir=workdir or self.spec.workdir)
        spec.exec_args               # noqa: B018 -- built here, not in the child
        kinds = (["user"] if spec.userns else []) + ["ipc", "uts", "net", "pid", "mnt"]
        fds = [(os.open(f"/proc/{self.pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC), ns.NAMESPACES[k])
               for k in kinds]
        before = self.cgroup.stats()

        def work(link):
            os.chdir(spec.workdir)
            inside.enter(spec, link)
        try:
            launch = spawn.launch(work, before=inside.joiner(fds, spec.userns))
        finally:
            for fd, _ in fds:
                os.close(fd)
        launch.start(join=self._join)
        status, output, timed_out = launch.wait(timeout)
        return _result(spec.argv, status, output, timed_out, launch, t0, self.cgroup.stats(), before)

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for PID 1 to end (kill it after ``timeout`` seconds), remove everything, and
        return its Result."""
        if self._result is None:
            try:
                status, output, timed_out = self._launch.wait(timeout)
                stats = self.cgroup.stats()
            finally:
                self._teardown()
            self._result = _result(self.spec.argv, status, output, timed_out, self._launch,
                                   self._t0, stats)
        return self._result

    def close(self) -> None:
        """Kill every process in the container and remove it: idempotent."""
        if self._result is None and self._launch is not None and self._launch.alive:
            self._launch.kill()
            self.wait()
        self._teardown()

    def _teardown(self):
        if self._launch is not None and self._launch.alive:
            self._launch.abandon()
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self._devices is not None:
            self._devices.remove()
            self._devices = None
        if self.overlay is not None:
            self.overlay.remove()
            self.overlay = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<Sandbox {' '.join(self.spec.argv)!r} {state}>"


@with_options
def run(command: Command, *, timeout: float | None = None, **options: Any) -> Result:
    """Start a container, wait for ``command`` to end (kill it after ``timeout`` seconds),
    remove the container and return the Result. The options are Sandbox's."""
    with Sandbox(command, **options) as box:
        return box.wait(timeout)
