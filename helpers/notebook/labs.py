"""The lab notebooks: what each one needs, whether it can run here, and running them.

A notebook declares its needs in its metadata, ``{"cnlab": {"requires": ["root", "docker"]}}``;
the names are those of ``doctor.REQUIREMENTS``. Tests, ``make book EXECUTE=1`` and the doctor
all read them from here.

Used in: 00-environment.
"""
import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from helpers.notebook import doctor
from helpers._core.names import LABS, ROOT

# A cell whose output is not compared carries one of these nbval markers on its own line,
# and the line after it says why: "# why: ...".
EXCUSES = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP", "# NBVAL_RAISES_EXCEPTION")

# Words that only describe the machine that ran a lab: a compared output naming one passes on
# this machine only, and fails on a cgroup-v2 laptop or a runner whose QEMU has KVM.
MACHINE_WORDS = tuple((re.compile(pattern, re.MULTILINE), what) for pattern, what in (
    (r"\b(?:memory\.(?:limit_in_bytes|max_usage_in_bytes|usage_in_bytes|oom_control|memsw\.\w+)"
     r"|cpu\.cfs_(?:quota|period)_us|cpu\.shares|cpuacct\.\w+|blkio\.\w+|freezer\.state"
     r"|devices\.(?:allow|deny|list))\b", "a cgroup v1 file"),
    (r"/sys/fs/cgroup/(?:unified|systemd|memory|cpu|cpuacct|cpu,cpuacct|cpuset|pids|blkio|devices"
     r"|freezer|net_cls|net_prio|perf_event|hugetlb|rdma|misc)(?![\w.,])", "a cgroup v1 hierarchy path"),
    (r"^\d+:(?:name=)?\w[\w,=]*:/", "a cgroup v1 line of /proc/<pid>/cgroup"),
    (r"(?i)\baccel(?:erator)?\b[ :=]+(?:tcg|kvm)\b|\bVM \((?:tcg|kvm)\)|\bkvm_(?:pvm|intel|amd)\b"
     r"|failed to set MSR", "the QEMU accelerator"),
    (r"\bSeaBIOS\b|\bOVMF\b|\bEDK II\b", "the firmware"),
    (r"(?<![\w.])[3-9]\.\d+\.\d+-[\w.~+-]*[a-z][\w.~+-]*", "a kernel release"),
))


@dataclass(frozen=True)
class Lab:
    path: Path
    title: str
    requires: tuple
    nbval: str  # "strict", or "lax" for notebooks that only a real cluster can run

    @property
    def name(self):
        return self.path.stem


def load(path):
    path = Path(path)
    nb = json.loads(path.read_text())
    meta = nb.get("metadata", {}).get("cnlab", {})
    title = next((line.lstrip("# ").strip() for cell in nb["cells"] if cell["cell_type"] == "markdown"
                  for line in "".join(cell["source"]).splitlines() if line.startswith("# ")), path.stem)
    return Lab(path, title, tuple(meta.get("requires", ())), meta.get("nbval", "strict"))


def all_labs(folder=LABS):
    return [load(p) for p in sorted(Path(folder).glob("*.ipynb"))]


def problems(path):
    """What is wrong with a committed notebook, as a list of sentences (empty when it is fine)."""
    lab, nb = load(path), json.loads(Path(path).read_text())
    found = [f"unknown requirement {r!r}" for r in lab.requires if r not in doctor.REQUIREMENTS]
    if "cnlab" not in nb.get("metadata", {}):
        found.append('no "cnlab" metadata: declare {"requires": [...]} (an empty list is fine)')
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    if lab.nbval == "strict" and code and not any(c.get("outputs") for c in code):
        found.append("no outputs: execute it on a real machine and commit the outputs")
    for i, cell in enumerate(code, 1):
        lines = [line.strip() for line in "".join(cell["source"]).splitlines()]
        for marker in EXCUSES:
            if marker in lines:
                after = lines[lines.index(marker) + 1] if lines.index(marker) + 1 < len(lines) else ""
                if not after.startswith("# why:"):
                    found.append(f"code cell {i}: {marker[2:]} without a '# why:' line after it")
        expected = "raises-exception" in cell.get("metadata", {}).get("tags", ()) \
            or "# NBVAL_RAISES_EXCEPTION" in lines
        if not expected and any(o.get("output_type") == "error" for o in cell.get("outputs", ())):
            found.append(f"code cell {i}: an error output in a cell not tagged raises-exception")
        words = machine_words(_text(cell)) if lab.nbval == "strict" \
            and not any(marker in lines for marker in EXCUSES[:2]) else []
        if words:
            found.append(f"code cell {i}: its compared output names "
                         + ", ".join(f"{word!r} ({what})" for word, what in words)
                         + ": that describes this machine, not the lesson; show it in a cell excused with "
                           "NBVAL_IGNORE_OUTPUT and '# why: ...', and print (and assert) what is the same "
                           "on cgroup v1, v2 and hybrid, with KVM or TCG")
    return found


def _text(cell):
    """What nbval compares of a cell: its streams and plain-text results."""
    parts = []
    for output in cell.get("outputs", ()):
        for text in (output.get("text", ""), output.get("data", {}).get("text/plain", "")):
            parts.append("".join(text) if isinstance(text, list) else text)
    return "".join(parts)


def machine_words(text):
    """The first word of each MACHINE_WORDS kind found in ``text``: [(word, what it is)]."""
    return [(match[0], what) for pattern, what in MACHINE_WORDS if (match := pattern.search(text))]


_USED_IN = re.compile(r"^Used in: (?P<labs>.+?)\.$", re.MULTILINE)


def module_problems(package=ROOT / "helpers"):
    """Each module of a book part names, in its docstring, the labs and chapters that use it
    (``Used in: 21-namespaces, book/containers/namespaces-cgroups.``): names that must exist."""
    found = []
    paths = [*Path(package).glob("*/*.py"), *Path(package).glob("*/*/__init__.py")]
    for path in sorted(paths):
        if path.relative_to(package).parts[0].startswith("_") or \
                (path.name.startswith("_") and path.parent.parent == Path(package)):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        match = _USED_IN.search(doc)
        rel = path.relative_to(Path(package).parent)
        if match is None:
            found.append(f"{rel}: its docstring has no 'Used in: <labs and chapters>.' line")
            continue
        for name in (n.strip() for n in match["labs"].split(",")):
            target = (ROOT / f"{name}.md") if name.startswith("book/") else (LABS / f"{name}.ipynb")
            if name != "no lab directly" and not target.exists():
                found.append(f"{rel}: 'Used in' names {name!r}, which does not exist")
    return found


def execute(labs, *, timeout=900):
    """Run labs in place (outputs and widget state saved), in their own folder as working dir."""
    import nbclient
    import nbformat
    for lab in labs:
        nb = nbformat.read(lab.path, as_version=4)
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(lab.path.parent)}}).execute()
        nbformat.write(nb, lab.path)
