"""The set-up, the CI workflow and the book's configuration fit together."""
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_setup_script_is_valid_bash():
    subprocess.run(["bash", "-n", ROOT / "scripts" / "setup-system.sh"], check=True)


def test_ci_runs_make_test_and_nothing_else():
    lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[-1] == "exec make test"


def test_hosted_workflow_creates_a_kind_cluster_then_builds_and_tests():
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "course.yml").read_text())
    assert {"push", "pull_request"} <= set(flow[True])  # YAML 1.1 reads the key `on` as True
    steps = flow["jobs"]["book-and-test"]["steps"]
    kind = [i for i, s in enumerate(steps) if s.get("uses", "").startswith("helm/kind-action@")]
    runs = [i for i, s in enumerate(steps) if "make book" in s.get("run", "") or "make test" in s.get("run", "")]
    assert kind and len(runs) == 2 and kind[0] < runs[0]
    assert "make book EXECUTE=1" in steps[runs[0]]["run"]  # the Kubernetes labs run on kind as the book builds
    [pages] = [s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert pages["with"]["path"] == "_build/html"


def test_every_toc_entry_exists_and_every_lab_is_in_the_book():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            files.append(entry["file"])
            walk(entry.get("sections", []))
    for part in toc["parts"]:
        walk(part["chapters"])
    for f in files:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f
    for lab in sorted((ROOT / "labs").glob("*.ipynb")):
        assert f"labs/{lab.stem}" in files, f"{lab.name} is not in _toc.yml"
