"""The server: etcd, a certificate authority and ``apiextensions-apiserver``, on loopback.

Runtime files (certificates, kubeconfig, log) live in ``STATE/apiserver/cnlab-apiserver-<id>``
and are removed on stop; etcd's data is ``helpers.etcd``'s and goes with it.
"""
import contextlib
import datetime
import ipaddress
import json
import secrets
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

from helpers.orchestration import etcd
from helpers.orchestration.apiserver.builder import binary, kubectl_binary, supported_etcd
from helpers._core import daemon, names, owners
from helpers.errors import LabError

STATE = names.STATE / "apiserver"


class ApiserverError(LabError):
    """The server did not start or stopped answering (the message has its log)."""


class KubectlError(LabError):
    """kubectl exited non-zero; the message is kubectl's own."""


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
        self.name = names.name("apiserver", names.check(name, "API server name"))
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
        supported_etcd()   # ... and never on an etcd that Kubernetes 1.36 does not support
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
        names.check(str(user), "user name", punct=".-", most=41)
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
    daemon.strays(lambda p: Path(p.argv[0]).name == "apiextensions-apiserver"
                  and any(str(STATE) in a for a in p.argv), timeout=0)
    shutil.rmtree(STATE, ignore_errors=True)
