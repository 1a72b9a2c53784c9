"""Every daemon the course starts dies with the process that started it (issue 13).

A child Python starts one through the public API and sleeps in its ``with`` block; then it is
``kill -9``ed, as a crashed or restarted Jupyter kernel is, and its ``with`` block never ends.
Within 2 s nothing it started may be alive: neither the pids it reported nor any process that
carries its mark (``CNLAB_OWNER=<its pid>``, which ``helpers._core.daemon`` sets). The files it
left are a crash's leftovers, for ``cleanup()``: the test removes them itself.
"""
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import containerd, vm
from helpers._core import names, procfs, wait

TESTS = Path(__file__).parent
GONE_WITHIN = 2.0        # seconds, from the kill to the last of its daemons gone
# Each case: the programs that must be running, marked as the child's, before the kill; and the
# child's code, which calls report(pids, paths) once its daemon is up.
CASES = {
    "etcd": ({"etcd"}, """
        from helpers import etcd
        with etcd.Server() as server:
            report([server.pid], [server.dir])
    """),
    "apiserver": ({"apiextensions-apiserver", "etcd"}, """
        from helpers import apiserver
        with apiserver.Server() as server:
            report([server.pid, server.etcd.pid], [server.dir, server.etcd.dir])
    """),
    "containerd": ({"containerd"}, """
        from helpers import containerd
        with containerd.Containerd() as daemon:
            report([daemon.process.pid], [])
    """),
    "dockerd": ({"dockerd", "containerd"}, """
        sys.path.insert(0, TESTS)
        from test_images import private_engine
        from helpers._core import names
        where = names.state_dir("docker-kill-test")
        engine = private_engine(where)
        report([engine.pid], [where])
    """),
    # not daemons, but the same promise: the forked children of ns.start (a callable; a command
    # as PID 1 of a new PID namespace, in a new user namespace) die with the kernel that forked them
    "ns.start": (set(), """
        import time
        from helpers import ns
        with ns.start(time.sleep, 120, new=["uts"]) as child:
            report([child.pid], [])
    """),
    "ns.start pid+user": ({"sleep"}, """
        from helpers import ns
        with ns.start(["sleep", "120"], new=["user", "pid", "mnt"]) as child:
            report([child.pid], [])
    """),
    "qemu": ({"qemu-system-x86_64"}, """
        from helpers import vm
        with vm.VM(accel="tcg") as guest:
            report([guest.pid], [guest.dir])
    """),
    "virtiofsd": ({"qemu-system-x86_64", "virtiofsd"}, """
        import tempfile
        from helpers import vm
        with tempfile.TemporaryDirectory() as share, vm.VM(share=share, accel="tcg") as guest:
            report([guest.pid], [guest.dir, share])
    """),
}
PROLOGUE = """
import json, sys, time
TESTS = {tests!r}
def report(pids, paths):
    print(json.dumps({{"pids": pids, "paths": [str(p) for p in paths]}}), flush=True)
    time.sleep(120)            # killed long before: the with block never ends
"""


def _owned_by(owner: int) -> list[procfs.Process]:
    """The processes whose environment carries the mark of ``owner``."""
    mark = f"{procfs.MARK}={owner}"
    return [p for p in procfs.processes()
            if mark in (procfs.read_text(f"/proc/{p.pid}/environ") or "").split("\0")]


def _started(code: str, log: Path, timeout: float = 180) -> tuple[subprocess.Popen, dict]:
    """The child, and what it reported once its daemon was up."""
    with open(log, "wb") as errors:
        child = subprocess.Popen([sys.executable, "-c", PROLOGUE.format(tests=str(TESTS)) + textwrap.dedent(code)],
                                 cwd=names.ROOT, stdout=subprocess.PIPE, stderr=errors)
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = child.stdout.readline() if ready else b""
    if not line:
        child.kill()
        child.wait()
        pytest.fail(f"the child did not report its daemon (status {child.returncode}):\n"
                    + log.read_text(errors="replace")[-3000:])
    return child, json.loads(line)


def _survivors(child: int, pids: set[int]) -> list[str]:
    return sorted({f"{p.pid} {p.line[:100]}" for p in _owned_by(child)}
                  | {f"{pid} (reported)" for pid in pids if procfs.alive(pid)})


@pytest.mark.parametrize("case", [
    pytest.param("etcd", marks=[pytest.mark.requires("etcd")]),
    pytest.param("apiserver", marks=[pytest.mark.requires("apiserver")]),
    pytest.param("containerd", marks=pytest.mark.requires("containerd")),
    pytest.param("dockerd", marks=pytest.mark.requires("root", "docker")),
    pytest.param("ns.start", marks=pytest.mark.requires("root")),
    pytest.param("ns.start pid+user", marks=pytest.mark.requires("root")),
    pytest.param("qemu", marks=pytest.mark.requires("qemu")),
    pytest.param("virtiofsd", marks=[pytest.mark.requires("qemu", "root"), pytest.mark.skipif(
        not any(os.access(p, os.X_OK) for p in vm.VIRTIOFSD), reason="needs virtiofsd")]),
])
def test_a_killed_starter_takes_its_daemons_with_it(case, tmp_path):
    programs, code = CASES[case]
    child, reported = _started(code, tmp_path / "child.log")
    pids = set(reported["pids"])
    try:
        owned = _owned_by(child.pid)
        owned_pids = {p.pid for p in owned}
        running = {os.path.basename(p.argv[0]) for p in owned}
        assert programs <= running, f"not running, or not marked as the child's: {programs - running}"
        assert all(pid in owned_pids or procfs.marked(pid) for pid in pids)
        pids |= owned_pids
        killed = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait.until(lambda: not _survivors(child.pid, pids), GONE_WITHIN,
                          f"the {case} daemons of a killed process to die",
                          detail=lambda: "; ".join(_survivors(child.pid, pids)), interval=0.02,
                          fix="start it through helpers._core.daemon.Daemon (setpriv --pdeathsig KILL)")
        print(f"{case}: {len(pids)} processes gone {time.monotonic() - killed:.2f} s after the kill")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        procfs.kill([*pids, *(p.pid for p in _owned_by(child.pid))])     # a failed run leaks nothing
        for path in reported["paths"]:
            shutil.rmtree(path, ignore_errors=True)
        if case == "containerd":
            containerd.sweep()        # its folder, its bridge: a crash's leftovers
