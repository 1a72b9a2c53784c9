"""The committed notebooks follow the course's rules, and the test plugin enforces its own."""
import json
import os
import textwrap

import nbformat
import pytest

from helpers import labs

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("lab", labs.all_labs(), ids=lambda lab: lab.name)
def test_committed_notebook_follows_the_rules(lab):
    assert labs.problems(lab.path) == []


def _notebook(tmp_path, *cells, requires=("root",)):
    nb = nbformat.v4.new_notebook(cells=list(cells), metadata={"cnlab": {"requires": list(requires)}})
    path = tmp_path / "lab.ipynb"
    nbformat.write(nb, path)
    return path


def test_problems_catch_what_nbval_would_not(tmp_path):
    excused = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nprint(1)")
    crashed = nbformat.v4.new_code_cell("1/0", outputs=[nbformat.v4.new_output(
        "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])])
    path = _notebook(tmp_path, excused, crashed, requires=("root", "gpu"))
    found = labs.problems(path)
    assert "unknown requirement 'gpu'" in found
    assert "code cell 1: NBVAL_IGNORE_OUTPUT without a '# why:' line after it" in found
    assert "code cell 2: an error output in a cell not tagged raises-exception" in found


def test_a_notebook_without_outputs_is_flagged_unless_lax(tmp_path):
    path = _notebook(tmp_path, nbformat.v4.new_code_cell("print(1)"))
    assert any("no outputs" in p for p in labs.problems(path))
    nb = json.loads(path.read_text())
    nb["metadata"]["cnlab"]["nbval"] = "lax"
    path.write_text(json.dumps(nb))
    assert labs.problems(path) == []


def test_lab_title_and_requirements_come_from_the_notebook(tmp_path):
    path = _notebook(tmp_path, nbformat.v4.new_markdown_cell("# Lab 9: things\n\ntext"), requires=("docker",))
    lab = labs.load(path)
    assert (lab.title, lab.requires, lab.nbval) == ("Lab 9: things", ("docker",), "strict")


def test_plugin_skips_by_name_with_the_reason_and_lists_it_at_the_end(pytester):
    pytester.makeconftest(open(labs.LABS.parent / "tests" / "conftest.py").read())
    pytester.makepyfile(test_x=textwrap.dedent("""
        import pytest
        @pytest.mark.requires("warp-drive")
        def test_needs_a_warp_drive():
            pass
        def test_plain():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:nbval", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped on this machine, and why*",
                                 "*test_x.py::test_needs_a_warp_drive: needs warp-drive: unknown requirement*"])


@pytest.mark.requires("root")
def test_plugin_fails_a_test_that_leaks_and_sweeps_it(pytester, monkeypatch):
    monkeypatch.setenv("CNLAB_SWEEP_LEAKS", "1")
    pytester.makeconftest(open(labs.LABS.parent / "tests" / "conftest.py").read())
    pytester.makepyfile(test_leak=textwrap.dedent("""
        import subprocess
        import pytest
        from helpers import resources
        @pytest.mark.requires("root")
        def test_forgets_a_mount():
            point = resources.state_dir("leaktest-%d")
            subprocess.run(["mount", "-t", "tmpfs", "cnlab-leaktest", str(point)], check=True)
    """ % os.getpid()))
    result = pytester.runpytest_subprocess("-p", "no:nbval", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the test body passed; its teardown found the leak
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_forgets_a_mount*",
                                 f"left behind: mount /run/cnlab/leaktest-{os.getpid()}"])
    assert not any(f"leaktest-{os.getpid()}" in line for line in open("/proc/self/mountinfo"))


@pytest.mark.parametrize("mode, source, outcome", [
    ("lax", "print(2)", {"passed": 1}),                      # a different output is not compared
    ("strict", "print(2)", {"failed": 1}),                   # ... where it is
    ("lax", "assert 1 + 1 == 3, 'the check cell'", {"failed": 1}),   # a failing check still fails
])
def test_a_lax_notebook_compares_no_output_but_runs_every_check(pytester, mode, source, outcome):
    pytester.makeconftest(open(labs.LABS.parent / "tests" / "conftest.py").read())
    cell = nbformat.v4.new_code_cell(source, execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"cnlab": {"requires": [], "nbval": mode}})
    nbformat.write(nb, pytester.path / "lab.ipynb")
    result = pytester.runpytest_subprocess("--nbval", "--nbval-current-env", "-p", "no:cacheprovider")
    result.assert_outcomes(**outcome)


def test_every_module_names_the_labs_that_use_it_and_the_names_exist(tmp_path):
    assert labs.module_problems() == []
    part = tmp_path / "helpers" / "virt"
    part.mkdir(parents=True)
    (part / "kvm.py").write_text('"""KVM.\n\nUsed in: 11-hypervisor, 99-nowhere, book/virtualization/index.\n"""\n')
    (part / "vm.py").write_text('"""A VM, naming no lab."""\n')
    assert labs.module_problems(tmp_path / "helpers") == [
        "helpers/virt/kvm.py: 'Used in' names '99-nowhere', which does not exist",
        "helpers/virt/vm.py: its docstring has no 'Used in: <labs and chapters>.' line"]


@pytest.mark.requires("root")
def test_a_leak_a_fixture_sweeps_up_still_fails_its_test(pytester, monkeypatch):
    monkeypatch.setenv("CNLAB_SWEEP_LEAKS", "1")
    pytester.makeconftest(open(labs.LABS.parent / "tests" / "conftest.py").read())
    pytester.makepyfile(test_swept=textwrap.dedent("""
        import pytest
        from helpers import ns
        @pytest.fixture
        def tidy():
            yield
            ns.sweep()                       # the safety net that used to hide the leak
        @pytest.mark.requires("root")
        def test_forgets_a_netns(tidy):
            ns.NetNS("sweptup-%d")
    """ % os.getpid()))
    result = pytester.runpytest_subprocess("-p", "no:nbval", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["left behind, and swept by a fixture: *"
                                 f"helpers.containers.ns.sweep() removed netns cnlab-sweptup-{os.getpid()}*"])


def _compared(source, text):
    return nbformat.v4.new_code_cell(source, execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=text)])


@pytest.mark.parametrize("text, word", [
    ("/sys/fs/cgroup/memory/cnlab-lab22-memory/memory.limit_in_bytes = 67108864\n", "memory.limit_in_bytes"),
    ("cpu.cfs_quota_us 50000\n", "cpu.cfs_quota_us"),
    ("cnlab-lab22-light {'cpu.shares': '1024'}\n", "cpu.shares"),
    ("9:name=systemd:/\n8:pids:/\n0::/\n", "9:name=systemd:/"),
    ("memory  /sys/fs/cgroup/memory/docker/abc\n", "/sys/fs/cgroup/memory"),
    ("accelerator: tcg\n", "accelerator: tcg"),
    ("accelerator: kvm\n", "accelerator: kvm"),
    ("SeaBIOS (version 1.16.2-debian-1.16.2-1)\n", "SeaBIOS"),
    ("guest kernel: 6.1.0-57-cloud-amd64\n", "6.1.0-57-cloud-amd64"),
    ("kernel 6.18.44-fc-v669\n", "6.18.44-fc-v669"),
])
def test_a_compared_output_that_describes_the_machine_is_rejected(tmp_path, text, word):
    path = _notebook(tmp_path, _compared("print(facts)", text))
    found = labs.problems(path)
    assert len(found) == 1 and found[0].startswith(f"code cell 1: its compared output names {word!r}"), found
    assert "NBVAL_IGNORE_OUTPUT" in found[0] and "# why:" in found[0]


def test_the_same_output_excused_or_in_a_lax_notebook_is_not_rejected(tmp_path):
    text = "memory.limit_in_bytes = 67108864\naccelerator: tcg\n"
    excused = _compared("# NBVAL_IGNORE_OUTPUT\n# why: the files are this machine's layout\nprint(facts)", text)
    assert labs.problems(_notebook(tmp_path, excused)) == []
    path = _notebook(tmp_path, _compared("print(facts)", text))
    nb = json.loads(path.read_text())
    nb["metadata"]["cnlab"]["nbval"] = "lax"
    path.write_text(json.dumps(nb))
    assert labs.problems(path) == []


@pytest.mark.parametrize("text", [
    "memory limit the kernel holds for the group: 64 MiB\n",            # the lesson, in any layout
    "cnlab-lab22-light | CPU weight the kernel holds: 100\n",
    "/sys/fs/cgroup/cnlab-web/memory.max = 67108864\n",                 # a v2 file is no v1 word
    "KVM_EXIT_IO, direction out, port 0x3f8\n",                         # the KVM API is a lesson
    "containerd 1.6.20~ds1, etcd 3.4.23, runc 1.1.5\n",
    "the firmware printed its banner before our init's marker: True\n",
])
def test_an_output_that_states_the_lesson_passes(tmp_path, text):
    assert labs.problems(_notebook(tmp_path, _compared("print(lesson)", text))) == []
