"""The cgroup v2 path for real: a v2-only QEMU guest runs the cgroup tests and labs 21, 22, 24.

This machine's controllers are on v1, so the v2 code cannot run here for real. The guest
(``helpers.v2guest``) boots Debian's cloud kernel with ``cgroup_no_v1=all`` and runs this
checkout's own pytest in this machine's root: ``tests/test_cgroups.py`` (the v2 API against the
kernel as well as the fake tree, and the ``real_v2`` tests of the controllers themselves) and
nbval over the three labs against the same committed outputs as here. One pytest process, one
boot: under TCG each Python start and each Jupyter kernel costs seconds.

Its result has a line of its own at the end of the run (tests/conftest.py).
"""
import compileall
import os
import re
import time

import pytest

from helpers import v2guest, vm
from helpers._core import names

LABS = ("labs/21-namespaces.ipynb", "labs/22-cgroups.ipynb", "labs/24-container-from-scratch.ipynb")
# the real v2 controllers, each of which must have run (not been skipped) in the guest
REAL_V2 = ("test_real_v2_memory_max_oom_kills", "test_real_v2_cpu_max_quota_throttles",
           "test_real_v2_pids_max_stops_a_fork", "test_real_v2_cgroup_kill_kills_every_process",
           "test_real_v2_cgroup_freeze_stops_then_thaws",
           "test_real_v2_a_group_with_sub_groups_holds_no_processes")
BUDGET = 480          # seconds: the whole step, boot included, under TCG on 2 cores
_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")


def outcome(output: str) -> dict[str, int]:
    """pytest's closing counts ("75 passed, 2 skipped in 200.1s") as {"passed": 75, ...}."""
    last = next((line for line in reversed(output.splitlines()) if _OUTCOME.search(line)), "")
    return {word.rstrip("s") if word.startswith("error") else word: int(n)
            for n, word in _OUTCOME.findall(last)}


def test_outcome_reads_pytest_s_closing_line():
    assert outcome("x\n= 3 failed, 70 passed, 2 skipped, 1 error in 201.05s (0:03:21) =\n") == {
        "failed": 3, "passed": 70, "skipped": 2, "error": 1}
    assert outcome("nothing here") == {}


@pytest.mark.requires("root", "qemu")
@pytest.mark.skipif(v2guest.inside(), reason="this is the v2 guest: it does not boot another")
@pytest.mark.skipif(not any(os.access(p, os.X_OK) for p in vm.VIRTIOFSD),
                    reason="needs virtiofsd (Debian 12: qemu-system-common; 13 and later: virtiofsd)")
def test_cgroup_v2_for_real_in_a_v2_only_guest(request):
    # bytecode for the checkout, written here at host speed rather than by the guest under TCG
    for folder in ("helpers", "tests"):
        compileall.compile_dir(names.ROOT / folder, quiet=1)
    start = time.monotonic()
    probe = "/cnlab-v2guest-probe"
    with v2guest.Guest() as guest:
        booted = time.monotonic() - start
        # this machine's root is read-only to the guest, even where the guest remounts it rw
        writes = guest.vm.run(f"mount -o remount,rw {v2guest.ROOT_AT} && touch {v2guest.ROOT_AT}{probe}")
        written = os.path.exists(probe)
        if written:
            os.unlink(probe)
        assert writes.exit_code != 0 and "Read-only" in writes.output and not written, writes.output
        result = guest.run("python -m pytest -q -rA tests/test_cgroups.py "
                           + " ".join(LABS), timeout=BUDGET)
    seconds = time.monotonic() - start
    counts = outcome(result.output)
    request.config._cnlab_v2guest = (
        f"cgroup v2 guest ({guest.vm.accel}, {guest.vm.cpus} vCPUs, {guest.vm.mib} MiB, "
        f"controllers {' '.join(guest.controllers)}): "
        + (", ".join(f"{n} {word}" for word, n in counts.items()) or "no result")
        + f" in {seconds:.0f} s (boot and set-up {booted:.0f} s)")
    tail = "\n".join(result.output.splitlines()[-60:])
    assert result.exit_code == 0 and counts.get("passed"), f"the guest's pytest failed:\n{tail}"
    passed = set(re.findall(r"^PASSED (\S+)", result.output, re.MULTILINE))
    assert {f"tests/test_cgroups.py::{name}" for name in REAL_V2} <= passed, tail
    assert any(re.search(r"[\[-]kernel[\]-]", name) for name in passed), "the v2 API ran on the fake tree only"
    for lab in LABS:
        assert any(name.startswith(f"{lab}::") for name in passed), f"{lab} did not run:\n{tail}"
    assert seconds < BUDGET
