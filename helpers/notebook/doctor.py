"""What can this machine do? Each capability is probed by trying it, not by guessing.

``python -m helpers doctor`` prints the table and which labs can run here; ``--json`` prints
one key per capability, each ``{"ok": bool, "detail": str}`` (plus extra keys where useful).
A capability that is missing says why, and what to do about it.

Used in: 00-environment.
"""
import contextlib
import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field

from helpers.containers import cgroups, ns
from helpers._core.names import CACHE
from helpers.errors import NotSupported

# What a notebook or test may declare in ``requires``, and the capabilities each one needs.
REQUIREMENTS = {
    "root": ("root",),
    "docker": ("docker",),
    "swarm": ("docker", "swarm"),
    "kvm": ("kvm", "binutils"),
    "qemu": ("qemu", "kernel-image"),
    "etcd": ("etcd",),
    "runc": ("root", "runc"),
    "containerd": ("root", "containerd", "runc", "cni"),
    "kind": ("docker", "kind", "kubectl", "kind-preflight"),   # or a cluster CNLAB_CONTEXT names: see OR_ELSE
    "cluster": ("cluster",),
    "apiserver": ("etcd", "apiserver"),
    "browser": ("chromium",),
    "cjk-font": ("cjk-font",),
}

# A requirement met by other capabilities instead: the Kubernetes labs run on their own kind
# cluster, or on the reachable cluster that CNLAB_CONTEXT names.
OR_ELSE = {"kind": ("context",)}


@dataclass
class Check:
    ok: bool
    detail: str
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        return {"ok": self.ok, "detail": self.detail, **self.extra}


def _version(*command):
    """The first line a tool prints about its version, or None if it is not installed."""
    if not shutil.which(command[0]):
        return None
    out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "installed"


def _tool(command, fix, *, version_args=("--version",)):
    found = _version(command, *version_args)
    return Check(False, f"{command} not found: {fix}") if found is None else Check(True, found)


def _apt(package):
    return f"apt-get install {package} (make test does, as root)"


def _root():
    uid = os.geteuid()
    return Check(uid == 0, "uid 0" if uid == 0 else f"uid {uid}: run JupyterLab and make test with sudo")


def _cgroup():
    layout = cgroups.detect()
    v1 = {ctrl: str(path) for ctrl, path in sorted(layout.v1.items())}
    v2 = {"path": str(layout.v2) if layout.v2 else None, "controllers": list(layout.v2_controllers)}
    parts = []
    if v1:
        parts.append("v1: " + " ".join(v1))
    if layout.v2:
        parts.append(f"v2 at {layout.v2}: " + (" ".join(layout.v2_controllers) or "no controllers"))
    return Check(layout.version != "none", f"{layout.version} ({'; '.join(parts) or 'nothing mounted'})",
                 {"version": layout.version, "v1": v1, "v2": v2})


def _namespace(kind):
    why = ns.probe(kind)
    return Check(why is None, "created in a child process" if why is None else why)


def _docker():
    """The engine's check, and the Swarm's (which needs the engine to ask)."""
    from helpers.containers import images
    from helpers.orchestration import swarm
    try:
        client = images.client(timeout=5)
    except images.EngineUnavailable as e:
        return Check(False, str(e)), Check(False, "needs a Docker engine")
    with contextlib.closing(client):
        engine = Check(True, f"engine {client.version()['Version']}")
        state = client.info().get("Swarm", {}).get("LocalNodeState", "unknown")
        if state == "inactive" or (state == "active" and swarm.is_ours(client)):
            return engine, Check(True, f"node state {state}")
        why = ("a swarm the course did not make is active: the Swarm lab leaves it alone"
               if state == "active" else f"node state {state}")
        return engine, Check(False, f"{why}; `docker swarm leave --force` frees the engine")


def _kvm():
    from helpers.virt import kvm
    try:
        with kvm.VM():
            pass
    except OSError as e:
        return Check(False, f"{e.strerror} ({e.filename or '/dev/kvm'}): KVM needs /dev/kvm and root "
                            "(on a cloud VM, a machine type with nested virtualization)")
    except NotSupported as e:      # no /dev/kvm at all, or a KVM API this hypervisor does not speak
        return Check(False, str(e))
    found = kvm.backend()
    how = found.extension or "no VT-x/AMD-V: a software KVM"
    return Check(True, f"a VM was created ({found.module or 'kvm'}, {how})",
                 {"module": found.module, "extension": found.extension})


def _kernel_image():
    vmlinuz = CACHE / "kernel" / "vmlinuz"
    if vmlinuz.is_file():
        return Check(True, (CACHE / "kernel" / "VERSION").read_text().strip())
    return Check(False, f"no cached kernel at {vmlinuz}: run `make test` as root, which fetches it")


def _cni():
    found = next((d for d in ("/usr/lib/cni", "/opt/cni/bin") if os.path.isfile(f"{d}/bridge")), None)
    return Check(found is not None, found or f"CNI plugins missing: {_apt('containernetworking-plugins')}")


def _kind_preflight():
    from helpers.kubernetes import kind
    found = [p for p in kind.problems(kind.read_machine()) if p.what != "kind is not installed"]
    return Check(not found, "; ".join(f"{p.what} (fix: {p.fix})" for p in found)
                 or "Docker, inotify limits and disk space are enough for kind")


def _etcd():
    """The etcd that ``helpers.etcd`` runs: which, its version, and why that one."""
    from helpers.orchestration import etcd
    from helpers.errors import LabError
    try:
        return Check(True, str(etcd.binary()))
    except LabError as e:
        return Check(False, str(e))


def _apiserver():
    """Built from Debian's Go sources by the set-up; a build problem is not a machine's lack."""
    from helpers.orchestration import apiserver
    return Check(*apiserver.status())


def _api_version(context=None):
    """The Kubernetes version a kubeconfig context's API server reports (5 s at most)."""
    from kubernetes import client, config
    with config.new_client_from_config(context=context, persist_config=False) as api:
        return client.VersionApi(api).get_code(_request_timeout=5).git_version


def _cjk_font():
    """The book's Chinese terms need a font that has them, or the browser draws boxes."""
    found = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout \
        if shutil.which("fc-list") else ""
    return Check(bool(found.strip()), found.splitlines()[0] if found.strip() else
                 f"no font with Chinese glyphs: {_apt('fonts-noto-cjk')}")


def _cluster():
    context = os.environ.get("CNLAB_CONTEXT")
    try:
        return Check(True, f"Kubernetes {_api_version(context)}" + (f" (context {context})" if context else ""))
    except Exception as e:  # no kubeconfig, no context, unreachable: all mean "no cluster"
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        return Check(False, f"no cluster reachable through the {'context ' + context if context else 'current context'} "
                            f"of the kubeconfig ({reason}): create one with kind (see the Kubernetes chapter)")


def _context(cluster):
    """The cluster that CNLAB_CONTEXT names, reachable: the Kubernetes labs run there instead of on kind."""
    context = os.environ.get("CNLAB_CONTEXT")
    if not context:
        return Check(False, "CNLAB_CONTEXT is not set (set it to a kubeconfig context to run the Kubernetes labs there)")
    return Check(cluster.ok, f"CNLAB_CONTEXT={context}: {cluster.detail}")


@functools.cache
def probe():
    """Probe everything once per process; return {capability: Check}."""
    docker, swarm = _docker()
    report = {
        "root": _root(),
        "kernel": Check(True, platform.release()),
        "cgroup": _cgroup(),
        **{f"ns.{kind}": _namespace(kind) for kind in ns.NAMESPACES},
        "docker": docker,
        "swarm": swarm,
        "kvm": _kvm(),
        "binutils": _tool("as", _apt("binutils")),
        "qemu": _tool("qemu-system-x86_64", _apt("qemu-system-x86")),
        "kernel-image": _kernel_image(),
        "etcd": _etcd(),
        "containerd": _tool("containerd", _apt("containerd")),
        "ctr": _tool("ctr", _apt("containerd")),
        "runc": _tool("runc", _apt("runc")),
        "cni": _cni(),
        "kind": _tool("kind", "install kind as the README's 'Kubernetes labs' section says",
                      version_args=("version",)),
        "kind-preflight": _kind_preflight(),
        "kubectl": _tool("kubectl", "install kubectl as the README's 'Kubernetes labs' section says",
                         version_args=("version", "--client")),
        "cluster": _cluster(),
        "apiserver": _apiserver(),
        "chromium": _tool("chromium", _apt("chromium")),
        "cjk-font": _cjk_font(),
    }
    report["context"] = _context(report["cluster"])
    return report


def unmet(requirements, report=None):
    """Why this machine cannot meet these requirements: a list of reasons, empty if it can."""
    report = report or probe()
    reasons = []
    for name in requirements:
        if name not in REQUIREMENTS:
            reasons.append(f"unknown requirement {name!r} (known: {', '.join(REQUIREMENTS)})")
            continue
        instead = OR_ELSE.get(name, ())
        if instead and all(report[capability].ok for capability in instead):
            continue
        missing = [f"{capability}: {report[capability].detail}" for capability in REQUIREMENTS[name]
                   if not report[capability].ok]
        if missing and instead:
            missing[-1] += " (or: " + "; ".join(f"{c}: {report[c].detail}" for c in instead) + ")"
        reasons += [why for why in missing if why not in reasons]
    return reasons


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def render(report, lab_list):
    """The doctor's report as two plain-text tables: capabilities, then labs."""
    caps = [(name, "yes" if c.ok else "NO", c.detail) for name, c in report.items()]
    runs = []
    for lab in lab_list:
        why = unmet(lab.requires, report)
        runs.append((lab.name, "yes" if not why else "NO", "; ".join(why) or ", ".join(lab.requires) or "-"))
    return ("What this machine can do\n\n" + _table(caps, ("capability", "ok", "detail"))
            + "\n\nWhich labs can run here\n\n" + _table(runs, ("lab", "runs", "needs / why not")))
