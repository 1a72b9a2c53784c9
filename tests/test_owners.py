"""helpers._core.owners: the registry cleanup() walks, in order, with what each sweep removed,
and the generic leftovers (half-built cache files, STATE files, the course's own processes)."""
import os
import subprocess
import sys

import pytest

import helpers
from helpers._core import names, owners, procfs, wait


@pytest.mark.requires("root")
def test_half_built_files_of_a_dead_builder_are_leftovers_and_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(owners, "CACHE", tmp_path)
    monkeypatch.setattr(owners, "STATE", tmp_path / "state")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "kernel").mkdir()
    left = tmp_path / "kernel" / f".vmlinuz.partial-{dead}"
    left.write_bytes(b"half")
    building = names.partial(tmp_path / "kernel" / "initrd")      # this process: still building
    building.write_bytes(b"in progress")
    names.publish(tmp_path / "guest.bin", b"whole")               # published: nothing is left
    assert owners._partials() == [str(left)]
    monkeypatch.setattr(owners, "_sweeps", [])
    monkeypatch.setattr(owners, "_listers", [])
    assert f"partial {left}" in helpers.cleanup()
    assert not left.exists() and building.exists() and (tmp_path / "guest.bin").read_bytes() == b"whole"


@pytest.mark.requires("root")
def test_sweeps_run_by_stage_and_the_journal_names_what_each_removed(monkeypatch):
    alive, ran = {"thing"}, []
    monkeypatch.setattr(owners, "_sweeps", [])
    monkeypatch.setattr(owners, "_listers", [lambda: [f"fake {x}" for x in sorted(alive)]])

    @owners.sweeper(owners.KERNEL)
    def late():
        ran.append("late")

    @owners.sweeper(owners.CLUSTERS)
    def early():
        ran.append("early")
        alive.clear()

    owners.journal(True)
    helpers.cleanup()
    assert ran == ["early", "late"]
    assert owners.journal(False) == [f"{__name__}.test_sweeps_run_by_stage_and_the_journal_names_what_each_"
                                     f"removed.<locals>.early() removed fake thing"]


def test_a_forked_child_is_seen_by_its_mark_and_a_kind_node_process_is_not():
    marked = subprocess.Popen(["sleep", "30"], env=procfs.marked_env())
    # a kind cluster's own process: "cnlab" in its command line, but not the course's
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                 "kube-controller-manager", "--cluster-name=cnlab-ci"])
    try:
        # until each has exec'd, it shows its parent's command line and environment
        wait.until(lambda: procfs.argv(marked.pid)[:1] == ("sleep",), 5, "sleep to start")
        wait.until(lambda: "kube-controller-manager" in procfs.argv(stranger.pid), 5, "it to start")
        pids = {p.pid for p in procfs.ours()}
        assert marked.pid in pids and stranger.pid not in pids
        assert os.getpid() not in pids                             # never the checker itself
    finally:
        for p in (marked, stranger):
            p.kill()
            p.wait()


@pytest.mark.requires("root")
def test_a_course_process_left_running_is_a_leftover_until_cleanup():
    stray = subprocess.Popen(["sleep", "30"], env=procfs.marked_env(), start_new_session=True)
    try:
        # until it has exec'd, the child shows its parent's command line and environment
        wait.until(lambda: procfs.argv(stray.pid)[:1] == ("sleep",), 5, "the stray to start")
        assert any(line.startswith(f"process {stray.pid} ") for line in helpers.leftovers())
        procfs.kill([stray.pid])
        assert not any(line.startswith(f"process {stray.pid} ") for line in helpers.leftovers())
    finally:
        stray.kill()
        stray.wait()
