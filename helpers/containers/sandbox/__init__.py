"""A container from scratch (lab 24, chapter "A container from scratch"; lab 23 runs an image
with it): namespaces + a cgroup + an overlay root + pivot_root, then exec.

What ``docker run --rm --memory 64M --cpus 0.5 --pids-limit 32 --hostname box busybox sh -c
'...'`` does, in one small package::

    sandbox.run(["sh", "-c", "hostname; ps"], memory="64M", cpus=0.5, pids=32, hostname="box")
    with sandbox.Sandbox(memory="64M") as box:       # a long-lived one: PID 1 sleeps
        box.exec("ps")                               # like docker exec

How it happens, in order, each part in a module of its own:

1. ``options``: the options, declared once, checked (with ``spec``: the command must be in the
   rootfs); bad input raises BadInput before anything exists;
2. ``spawn``: fork a throw-away *launcher*, which clones the container's process into new
   mount, UTS, IPC, PID and network namespaces (and a user namespace, optionally);
3. ``container``: meanwhile, here, make its cgroup and put the process in it (runc does too);
4. ``inside``: the container's process takes the steps of ``plan()``: mounts, hostname,
   loopback, ``pivot_root``; then ``security``: it drops capabilities, sets no_new_privs,
   enters a cgroup namespace and execs the command;
5. ``container``: wait for it (a pidfd) while reading its output; the cgroup's counters say
   whether it was OOM-killed, hit its pids limit or was throttled; remove everything.

Nothing is mounted on the host: all mounts live in the container's mount namespace and go
with it. Bad input raises BadInput (CommandNotFound for a command that is not in the rootfs)
before anything is created; a start that fails raises StartError and leaves nothing behind.
``python -m helpers sandbox run`` (``cli``) and ``%%sandbox`` take the same options.

Used in: 23-filesystems, 24-container-from-scratch, book/containers/container-from-scratch, book/containers/images-filesystems.
"""
import shutil

from helpers._core import names, owners, procfs
from helpers.containers import cgroups, rootfs
import helpers.containers.sandbox.security as security
from helpers.containers.sandbox.cli import main
from helpers.containers.sandbox.container import INIT, ROOT_OUTSIDE, Result, Sandbox, plan, run
from helpers.containers.sandbox.inside import Plan, Step
from helpers.containers.sandbox.options import Options, add_options, options
from helpers.containers.sandbox.security import (CAPABILITIES, DEFAULT_CAPS, DEVICES, MASKED,
                                                 READONLY, setcap)
from helpers.containers.sandbox.spawn import OUTPUT_LIMIT, StartError
from helpers.containers.sandbox.spec import PATH, CommandNotFound, Spec

__all__ = ["CAPABILITIES", "DEFAULT_CAPS", "DEVICES", "INIT", "MASKED", "OUTPUT_LIMIT", "PATH",
           "READONLY", "ROOT_OUTSIDE", "CommandNotFound", "Options", "Plan", "Result", "Sandbox",
           "Spec", "StartError", "Step", "add_options", "main", "options", "plan", "run",
           "security", "setcap", "sweep"]


@owners.sweeper(owners.WORKLOADS)
def sweep() -> None:
    """Remove every sandbox leftover: kill the processes in sandbox cgroups and remove the
    cgroups, unmount overlays under the state folder, remove its upper layers and unpacked
    layers. "Already gone" is fine."""
    cgroups.sweep(prefix=names.name("sandbox"))
    base = str(rootfs.STATE)
    procfs.unmount(procfs.mount_points(lambda point: point == base or point.startswith(base + "/")))
    shutil.rmtree(base, ignore_errors=True)
