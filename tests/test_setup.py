"""The set-up, the CI workflow and the book's configuration fit together."""
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

from test_book import toc_files

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "course.yml"


def test_setup_script_is_valid_bash():
    subprocess.run(["bash", "-n", ROOT / "scripts" / "setup-system.sh"], check=True)


def test_ci_runs_make_test_and_nothing_else():
    """The whole script, not its last line: a command slipped in before `make test` would make CI
    differ from what a maintainer runs."""
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "exec make test"]


def test_hosted_workflow_creates_a_kind_cluster_then_builds_and_tests():
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert {"push", "pull_request"} <= set(flow[True])  # YAML 1.1 reads the key `on` as True
    steps = flow["jobs"]["book-and-test"]["steps"]
    kind = [i for i, s in enumerate(steps) if s.get("uses", "").startswith("helm/kind-action@")]
    runs = [i for i, s in enumerate(steps) if "make book" in s.get("run", "") or "make test" in s.get("run", "")]
    assert kind and len(runs) == 2 and kind[0] < runs[0]
    assert "make book EXECUTE=1" in steps[runs[0]]["run"]  # the Kubernetes labs run on kind as the book builds
    [pages] = [s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert pages["with"]["path"] == "_build/html"


def test_hosted_workflow_prepares_the_runner_before_make_and_says_why():
    """What ubuntu-24.04 needs beyond `make test` (cgroup v2 only, docker-ce, usually KVM) is in
    the workflow, before the first `make`, each with a comment that says why."""
    text = WORKFLOW.read_text()
    job = yaml.safe_load(text)["jobs"]["book-and-test"]
    steps = job["steps"]
    assert job["runs-on"] == "ubuntu-24.04"
    first_make = next(i for i, s in enumerate(steps) if re.search(r"\bmake (book|test)\b", s.get("run", "")))
    before = "\n".join(s.get("run", "") for s in steps[:first_make])
    for command in ("sysctl -w fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512",
                    "modprobe -a ip_vs", "modprobe -a nf_tables br_netfilter", "swapoff -a",
                    'KERNEL=="kvm", GROUP="kvm", MODE="0666"', "udevadm trigger --name-match=kvm"):
        assert command in before, f"the runner is not prepared with {command!r} before make"
    lines = [line.strip() for line in text.splitlines() if line.strip() != "run: |"]
    for command in ("sudo sysctl -w", "sudo modprobe -a ip_vs", "sudo modprobe -a nf_tables",
                    "run: sudo swapoff -a", "if [ -e /dev/kvm ]"):
        at = next(i for i, line in enumerate(lines) if line.startswith(command))
        assert lines[at - 1].startswith("#"), f"{command}: no comment right above it says why"
    for step in steps[first_make:first_make + 2]:            # the course needs root; kind's config too
        assert step["run"].startswith('sudo --preserve-env=KUBECONFIG env "PATH=$PATH" make ')


def test_every_toc_entry_exists_and_every_lab_is_in_the_book():
    files = toc_files()
    for f in files:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f
    for lab in sorted((ROOT / "labs").glob("*.ipynb")):
        assert f"labs/{lab.stem}" in files, f"{lab.name} is not in _toc.yml"


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~;\[ ]", requirement, maxsplit=1)[0]).lower()


def _lock():
    """requirements.lock as {name: (version, hashes, what it is there for)}."""
    entries, current = {}, None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][\w.-]*)==(\S+)", line):
            current = entries[_name(m[1])] = (m[2], [], [])
        elif current and (h := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current[1].append(h[1])
        elif current and (via := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)) and via[1] != "via":
            current[2].append(via[1].strip())
    return entries


def test_the_lock_pins_exactly_what_requirements_txt_asks_for():
    """`make lock` makes requirements.lock from requirements.txt (and the package's own
    dependencies): a pin edited in one and not the other, or a package added or dropped, fails."""
    wanted = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt pins every package: {line}"
            wanted[_name(name)] = version
    lock = _lock()
    for name, version in wanted.items():
        assert name in lock, f"{name} is in requirements.txt, not in requirements.lock: run `make lock`"
        assert lock[name][0] == version, (f"{name}: {version} in requirements.txt, {lock[name][0]} in "
                                          "requirements.lock: run `make lock`")
    direct = {name for name, (_, _, via) in lock.items() if "-r requirements.txt" in via}
    assert direct == set(wanted), f"requirements.lock was made from another requirements.txt: {direct ^ set(wanted)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project.get("dependencies", []):
        assert _name(dependency) in lock, f"{dependency} (pyproject.toml) is not locked: run `make lock`"
    unhashed = [name for name, (_, hashes, _) in lock.items() if not hashes]
    assert not unhashed, f"locked without a hash: {unhashed}"
    assert len(lock) > 2 * len(wanted)  # the whole set, not the direct dependencies only


def test_make_installs_from_the_lock_and_sets_up_the_browser_tests():
    make = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements.lock" in make and "-r requirements.txt" not in make
    setup = (ROOT / "scripts" / "setup-system.sh").read_text()
    assert "fonts-noto-cjk" in setup and "PACKAGES+=(chromium)" in setup
