"""VMs vs containers: what starting one costs, measured the same way for each.

Lab 13 (chapter "VMs vs containers") and ``bench/vm_vs_container.py`` time a QEMU guest, a
``docker run`` and a container from scratch (``helpers.sandbox``) side by side::

    compare.measure(compare.start_vm, runs=5)        # a Start of the medians
    compare.measure(compare.start_container)

It sits apart from ``vm`` because it drives all three: a VM module that imported Docker and
the sandbox would tie the virtualization layer to the containers one.

Used in: 13-vms-vs-containers, book/virtualization/vms-vs-containers.
"""
import contextlib
import dataclasses
import secrets
import statistics
import time
from typing import Any, Callable

from helpers._core import names, procfs
from helpers.containers import images, sandbox
from helpers.errors import LabError
from helpers.virt import vm


@dataclasses.dataclass(frozen=True)
class Start:
    """One start measured: seconds until the payload's first process ran, and the memory it cost.

    ``memory`` names what was counted, in bytes, e.g. {"QEMU peak RSS": ...}; ``note`` says
    anything else a reader needs (which accelerator, and why).
    """
    seconds: float
    memory: dict
    note: str = ""

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())


def start_vm(**options: Any) -> Start:
    """Boot a VM to its init and power it off: QEMU start to init, and QEMU's peak RSS."""
    with vm.VM(**options) as guest:
        pass
    note = guest.accel + (f": {guest.fallback_reason}" if guest.fallback_reason else "")
    return Start(guest.init_seconds, {"QEMU peak RSS": guest.peak_memory}, note)


def start_container(image: str | None = None) -> Start:
    """``docker run --rm`` a busybox container: time from the API call to its first output line.

    Memory is the container's cgroup peak (its processes' pages: runc's init and the shell)
    plus the RSS of its containerd shim, the one process the host keeps per container.
    dockerd and containerd are shared by all containers and not counted.
    """
    import docker     # what images.client() returns; imported only where it is used

    image = image or images.busybox()
    with contextlib.closing(images.client()) as client:
        started = time.monotonic()
        container = client.containers.run(
            image, ["sh", "-c", f"echo {vm.MARKER}; exec sleep 60"], detach=True, auto_remove=True,
            name=names.name("vm-lab", secrets.token_hex(4)), labels={names.LABEL: "vm-lab"})
        try:
            if not any(vm.MARKER.encode() in chunk
                       for chunk in container.logs(stream=True, follow=True)):
                raise LabError(f"the container exited without printing {vm.MARKER!r}")
            seconds = time.monotonic() - started
            memory = client.api.stats(container.id, stream=False, one_shot=True)["memory_stats"]
            peak = memory.get("max_usage", memory["usage"])   # cgroup v2 keeps no max_usage
            shim = _shim_rss(container.id)
        finally:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)         # auto_remove may be at it already
    return Start(seconds, {"container cgroup peak": peak, "containerd shim RSS": shim})


def start_sandbox() -> Start:
    """A container from scratch (``helpers.sandbox``): time until its command was exec'd, and
    its cgroup's peak. No daemon, no shim: nothing else on the host is kept per container."""
    result = sandbox.run(["true"])
    return Start(result.startup, {"container cgroup peak": result.memory_peak})


def _shim_rss(container_id):
    shim = next(procfs.processes(lambda p: "containerd-shim" in p.argv[0]
                                 and container_id in p.argv), None)
    status = procfs.read_text(f"/proc/{shim.pid}/status") if shim else None
    return next((int(line.split()[1]) * 1024 for line in (status or "").splitlines()
                 if line.startswith("VmRSS:")), 0)


def measure(start: Callable[[], Start], *, runs: int = 5) -> Start:
    """Call ``start()`` ``runs`` times; a Start of the medians (each memory part separately)."""
    starts = [start() for _ in range(runs)]
    return Start(statistics.median(s.seconds for s in starts),
                 {part: statistics.median(s.memory[part] for s in starts) for part in starts[0].memory},
                 starts[0].note)
