#!/usr/bin/env python3
"""Start a container and run /bin/true: helpers.sandbox vs `unshare` (the floor) vs `docker run`.

One run, side by side, medians over repeated runs, interleaved so that a busy machine slows
each of them alike:

- helpers.sandbox, in-process API: ``sandbox.run(["true"])``, with no limits (a memory and a
  cpuacct cgroup for the accounting, plus the devices cgroup) and with memory, CPU and pids
  limits (cpu and pids cgroups too);
- ``unshare --pid --fork --mount --uts --ipc --net true``: the same namespaces, no cgroup, no
  root filesystem, no security settings: the floor;
- ``docker run --rm`` of the course's busybox image (containers labelled cnlab=bench).

Goal: the sandbox within 2x of unshare, and at least 30x faster than docker run.
Needs root (and Docker for the last column). Usage: python bench/sandbox.py [RUNS] [DOCKER_RUNS]
"""
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import LabError, sandbox  # noqa: E402

UNSHARE = ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "true"]


def timed(start):
    t = time.perf_counter()
    start()
    return time.perf_counter() - t


def docker_starter():
    """A function that does one `docker run --rm`, or the reason there is none."""
    if not shutil.which("docker"):
        return None, "no docker command"
    try:
        from helpers import images
        ref = images.busybox()
    except (LabError, ImportError) as e:
        return None, str(e)
    command = ["docker", "run", "--rm", "--label", "cnlab=bench", "--network", "none", ref, "true"]
    return (lambda: subprocess.run(command, check=True, capture_output=True)), None


def main(runs=40, docker_runs=8):
    if os.geteuid() != 0:
        print("sandbox: skipped: needs root")
        return 0
    starters = {
        "helpers.sandbox": lambda: sandbox.run(["true"]),
        "helpers.sandbox, limits": lambda: sandbox.run(["true"], memory="64M", cpus=0.5, pids=32),
        "unshare (the floor)": lambda: subprocess.run(UNSHARE, check=True),
    }
    docker, why = docker_starter()
    for start in starters.values():              # warm up: caches, the rootfs, the image
        start()
    times = {name: [] for name in starters}
    for i in range(runs):
        for name, start in starters.items():
            times[name].append(timed(start))
        if docker and i < docker_runs:
            times.setdefault("docker run --rm", []).append(timed(docker))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    floor, ours = medians["unshare (the floor)"], medians["helpers.sandbox"]
    print(f"sandbox: start a container and run /bin/true; medians of {runs} runs "
          f"({docker_runs} for docker); load average {os.getloadavg()[0]:.1f} (2 is a full 2-core "
          f"machine: busy machines blur the ratios)")
    print(f"  {'':26} {'median':>10} {'x unshare':>10}")
    for name, median in medians.items():
        print(f"  {name:26} {median * 1e3:7.2f} ms {median / floor:9.1f}x")
    print(f"  goal: within 2x of unshare: {ours / floor:.1f}x, "
          f"{'met' if ours <= 2 * floor else 'NOT met'}")
    if "docker run --rm" in medians:
        speedup = medians["docker run --rm"] / ours
        print(f"  goal: 30x faster than docker run: {speedup:.0f}x, {'met' if speedup >= 30 else 'NOT met'}")
    else:
        print(f"  docker run: skipped ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
