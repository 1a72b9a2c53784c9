"""ipywidgets dashboards: a running container's memory and CPU use, live.

    with sandbox.Sandbox(memory="64M", cpus=0.5) as box:
        watch = widgets.monitor(box)       # shows two bars and a line of text, updated 5x a second
        box.exec("...work...")
    watch.join()                           # the bars keep the last values, and the peak

The bars are read from the container's cgroup (``Sandbox.stats()``) by a thread, every
``every`` seconds, until the container has ended. The widget starts from fixed values, so its
plain-text form (what a notebook without widget support shows) is the same on every run.

Used in: 24-container-from-scratch, book/containers/container-from-scratch.
"""
import os
import threading
import time
from dataclasses import dataclass

MIB = 2**20


@dataclass
class Sample:
    seconds: float        # since the monitor started
    memory: int           # bytes in use
    cpus: float           # cores used over the last interval


class Monitor:
    """A live view of one container; ``samples`` holds what it read, ``join()`` waits for the end."""

    def __init__(self, box, every=0.2):
        import ipywidgets as w
        self.box, self.every = box, every
        self.group = box.cgroup             # kept: the box lets go of it when it is removed
        limits = box.spec.limits
        self.memory_limit = limits.memory
        self.cpu_limit = limits.cpus
        memory_max = max(1, round((limits.memory or _total_memory()) / MIB))
        self.memory_bar = w.IntProgress(value=0, min=0, max=memory_max, description="memory",
                                        bar_style="info")
        self.memory_text = w.Label(value=f"0 of {memory_max} MiB")
        cpu_max = limits.cpus or float(_cpu_count())
        self.cpu_bar = w.FloatProgress(value=0.0, min=0.0, max=cpu_max, description="CPU",
                                       bar_style="info")
        self.cpu_text = w.Label(value=f"0.00 of {cpu_max:g} cores")
        self.status = w.Label(value="watching: " + " ".join(box.spec.argv))
        self.widget = w.VBox([w.HBox([self.memory_bar, self.memory_text]),
                              w.HBox([self.cpu_bar, self.cpu_text]), self.status])
        self.samples = []
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name=f"monitor {box.name}", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def join(self, timeout=None):
        self._thread.join(timeout)
        return self

    def _run(self):
        start = last_time = time.monotonic()
        last_cpu = None
        while self.box.running:
            stats = self.group.stats()
            now = time.monotonic()
            if stats.memory_current is None:        # the cgroup is gone: so is the container
                break
            used = stats.cpu_usage_us or 0
            cores = 0.0 if last_cpu is None else (used - last_cpu) / 1e6 / max(now - last_time, 1e-6)
            last_cpu, last_time = used, now
            self.peak = max(self.peak, stats.memory_peak or stats.memory_current)
            self.samples.append(Sample(now - start, stats.memory_current, cores))
            self._show(stats.memory_current, cores)
            time.sleep(self.every)
        self.memory_bar.bar_style = self.cpu_bar.bar_style = "success"
        self.status.value = (f"ended: peak memory {self.peak / MIB:.1f} MiB, "
                             f"{len(self.samples)} samples over {self._seconds():.1f} s")

    def _show(self, memory, cores):
        self.memory_bar.value = min(self.memory_bar.max, round(memory / MIB))
        self.memory_text.value = f"{memory / MIB:.1f} of {self.memory_bar.max} MiB"
        self.cpu_bar.value = min(self.cpu_bar.max, cores)
        self.cpu_text.value = f"{cores:.2f} of {self.cpu_bar.max:g} cores"

    def _seconds(self):
        return self.samples[-1].seconds if self.samples else 0.0

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def monitor(box, *, every=0.2):
    """Display a live monitor of a running ``sandbox.Sandbox`` and return it (already running)."""
    from IPython.display import display
    watch = Monitor(box, every)
    display(watch.widget)
    return watch.start()


def _total_memory():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024        # "MemTotal: <kB> kB"


def _cpu_count():
    return len(os.sched_getaffinity(0))
