"""helpers.apiserver: the real Kubernetes API machinery (apiextensions-apiserver) on a real etcd.

The pure parts (package resolution, cache keys, certificates, the "not built" path) need
nothing. The rest needs etcd and the binary that ``python -m helpers apiserver build`` makes;
without it they are skipped with the build's own reason. helpers.cluster's generic functions
are tested here too, against this real server.
"""
import datetime
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import apiserver, cluster, etcd, websites
from helpers._core import procfs
from helpers.errors import BadInput, LabTimeout
from helpers.orchestration.apiserver import builder, server as served

# ---------------------------------------------------------------- pure logic

PACKAGES = """\
Package: golang-k8s-apiextensions-apiserver-dev
Version: 0.36.4-1
Size: 1000
Depends: golang-a-dev (>= 1.0) | golang-b-dev, golang-go, libc6, golang-virtual-dev, golang-x-sys-dev:any

Package: golang-a-dev
Version: 1.2-1
Size: 10
Depends: golang-k8s-apiextensions-apiserver-dev, golang-c-dev [amd64]

Package: golang-b-dev
Version: 9
Size: 10

Package: golang-c-dev
Version: 3
Size: 10
Provides: golang-virtual-dev (= 3)

Package: golang-go
Version: 2:1.24
Size: 10
Depends: golang-1.24-go-dev

Package: golang-x-sys-dev
Version: 0.4-1
Size: 10

Package: kubectl
Version: 1.36.4+ds-1
Size: 100
Depends: libc6 (>= 2.34)
"""


def test_resolve_follows_only_go_source_packages():
    chosen = apiserver.resolve(PACKAGES, [apiserver.SOURCES, apiserver.KUBECTL])
    assert [p.name for p in chosen] == ["golang-a-dev", "golang-c-dev",
                                        "golang-k8s-apiextensions-apiserver-dev", "golang-x-sys-dev", "kubectl"]
    assert sum(p.size for p in chosen) == 1130


def test_resolve_names_a_missing_package():
    with pytest.raises(apiserver.NotBuilt, match="no package golang-k8s-apiextensions-apiserver-dev"):
        apiserver.resolve("Package: kubectl\nVersion: 1\n", [apiserver.SOURCES, apiserver.KUBECTL])


def test_the_cache_key_changes_with_any_package_version():
    chosen = apiserver.resolve(PACKAGES, [apiserver.SOURCES, apiserver.KUBECTL])
    newer = apiserver.resolve(PACKAGES.replace("Version: 3\n", "Version: 4\n"), [apiserver.SOURCES, apiserver.KUBECTL])
    assert builder._key(chosen) == builder._key(list(chosen))
    assert builder._key(chosen) != builder._key(newer)
    assert builder._key(chosen).startswith("0.36.4-1-")


def test_the_binary_is_stamped_with_the_kubernetes_release():
    flags = builder._ldflags(apiserver.resolve(PACKAGES, [apiserver.SOURCES]))
    assert "version.gitVersion=v1.36.4" in flags and "version.gitMinor=36" in flags


def test_the_debian_mirror_comes_from_the_machines_own_sources():
    assert builder._debian_mirror(["deb [signed-by=/k.gpg] http://mirror.test/debian/ bookworm main\n"]) \
        == "http://mirror.test/debian"
    assert builder._debian_mirror(["Types: deb\nURIs: http://mirror.test/debian\nSuites: trixie\n"]) \
        == "http://mirror.test/debian"
    assert builder._debian_mirror(["deb http://mirror.test/ubuntu noble main\n"]) is None


def test_certificates_name_the_user_and_groups_and_chain_to_the_ca():
    from cryptography.x509.oid import NameOID
    ca_key, ca = served._issue("test-ca")
    _, admin = served._issue("alice", issuer=(ca_key, ca), groups=("system:masters", "devs"))
    _, serving = served._issue("server", issuer=(ca_key, ca), server=True)
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == \
        ["system:masters", "devs"]
    admin.verify_directly_issued_by(ca)
    serving.verify_directly_issued_by(ca)
    from cryptography import x509
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert ca.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)


def test_bad_input_fails_before_anything_is_created():
    with pytest.raises(BadInput):
        apiserver.Server("Not OK!")


def _fail(error):
    def fail(*args):
        raise error
    return fail


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty build cache, and no etcd fetch (it would reach the network)."""
    monkeypatch.setattr(builder, "HOME", tmp_path)
    monkeypatch.setattr(builder, "CURRENT", tmp_path / "CURRENT")
    monkeypatch.setattr(builder, "UNAVAILABLE", tmp_path / "UNAVAILABLE")
    monkeypatch.setattr(builder, "_fetch_etcd", lambda: None)
    return tmp_path


def test_not_built_says_why_and_creates_nothing(no_cache, monkeypatch):
    tmp_path = no_cache
    monkeypatch.setattr(builder, "_build", _fail(
        apiserver.NotBuilt("apt-get update (Debian unstable) failed (exit 100): no network")))
    ok, detail = apiserver.build()           # a failed build is reported, never raised
    assert not ok and "no network" in detail and "cannot build" in detail
    assert "no network" in (tmp_path / "UNAVAILABLE").read_text()
    server = apiserver.Server("unbuilt")
    with pytest.raises(apiserver.NotBuilt, match="no network"):
        server.start()
    assert not server.dir.exists()


def test_only_a_machine_that_cannot_build_exits_0_without_the_server():
    recipe, machine = apiserver.NotBuilt("go build failed"), apiserver.CannotBuild("no Debian mirror")
    assert apiserver.exit_status(True, None) == 0
    assert apiserver.exit_status(False, None) == 1              # a cached build that does not run
    assert apiserver.exit_status(False, recipe) == 1
    assert apiserver.exit_status(True, recipe) == 1             # a --refresh that failed
    assert apiserver.exit_status(False, OSError("disk full")) == 1
    assert apiserver.exit_status(False, machine) == 0
    assert apiserver.exit_status(True, machine) == 0


def test_a_failed_recipe_fails_the_command_with_the_builds_error(no_cache, monkeypatch, capsys):
    monkeypatch.setattr(builder, "_build", _fail(apiserver.NotBuilt(
        "go build k8s.io/apiextensions-apiserver failed on Debian unstable's sources: undefined: x")))
    assert apiserver.main(["build"]) == 1
    out, err = capsys.readouterr()
    assert "NOT AVAILABLE" in out and "the build failed: go build" in err and "undefined: x" in err


def test_a_machine_without_a_debian_mirror_is_a_named_reason_and_exit_0(no_cache, monkeypatch, capsys):
    monkeypatch.setattr(builder, "_debian_mirror", lambda: None)   # the real _build meets it
    assert apiserver.main(["build"]) == 0
    out, err = capsys.readouterr()
    assert "cannot build it" in out and "no Debian mirror" in out and err == ""
    assert "no Debian mirror" in (no_cache / "UNAVAILABLE").read_text()


@pytest.mark.skipif(not builder.KEYRING.is_file(), reason=f"no {builder.KEYRING}")
def test_an_unreachable_mirror_is_a_machine_that_cannot_build(no_cache, monkeypatch):
    monkeypatch.setattr(builder, "_debian_mirror", lambda: "http://127.0.0.1:9/debian")
    options = builder._apt_options
    monkeypatch.setattr(builder, "_apt_options", lambda apt: [*options(apt), "-o", "Acquire::Retries=0"])
    with pytest.raises(apiserver.CannotBuild, match="no Debian mirror reachable.*127.0.0.1:9"):
        builder._apt()   # a real apt-get update, which warns and exits 0 without --error-on=any


def test_an_etcd_kubernetes_does_not_support_is_refused_before_anything_is_created(monkeypatch):
    monkeypatch.setattr(served, "binary", lambda: Path("/bin/true"))
    monkeypatch.setattr(etcd, "binary", lambda: etcd.Binary(Path("/usr/bin/etcd"), (3, 4, 23), "bookworm's"))
    server = apiserver.Server("old-etcd")
    with pytest.raises(apiserver.NotBuilt, match="etcd 3.4.23 .* older than the etcd 3.5.13") as e:
        server.start()
    assert "apiserver build" in str(e.value) and not server.dir.exists() and server.etcd is None


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server():
    with apiserver.Server("test") as s:
        yield s
    assert not s.running and not s.dir.exists() and not s.etcd.dir.exists()


@pytest.fixture(scope="module")
def api(server):
    from kubernetes import client
    with server.client() as c:
        client.ApiextensionsV1Api(c).create_custom_resource_definition(websites.CRD)
        with server.cluster() as k:
            k.wait_for("CustomResourceDefinition", websites.CRD["metadata"]["name"], "Established", timeout=30)
        yield c


@pytest.fixture
def objects(api):
    from kubernetes import client
    return client.CustomObjectsApi(api)


def _create(objects, name, **spec):
    spec = {"image": "localhost/cnlab/busybox:1", "replicas": 1, **spec}
    return objects.create_namespaced_custom_object(websites.GROUP, websites.VERSION, "default",
                                                   websites.PLURAL, websites.website(name, **spec))


def _error(call, *args):
    from kubernetes.client.exceptions import ApiException
    with pytest.raises(ApiException) as caught:
        call(*args)
    return cluster.api_error(caught.value, websites.KIND)


@pytest.mark.requires("apiserver")
def test_a_server_leaves_nothing_behind_and_sweep_cleans_up_after_a_crash():
    # before the module's server starts: sweep() removes every course API server there is
    with apiserver.Server("second") as s:
        pid, files, data = s.pid, s.dir, s.etcd.dir
        assert files.is_dir() and data.is_dir()
    assert not os.path.exists(f"/proc/{pid}") and not files.exists() and not data.exists()
    crashed = apiserver.Server("crashed").start()      # then "the notebook's kernel died"
    try:
        pid = crashed.pid
        apiserver.sweep()              # returns when it is gone (and reaps it, as it is ours here:
        assert not procfs.alive(pid) and not crashed.dir.exists()    # no exit status is left)
        apiserver.sweep()                              # idempotent: nothing left is success
    finally:
        crashed.etcd.remove()                          # etcd's own sweep() is helpers.etcd's


@pytest.mark.requires("apiserver")
def test_the_server_answers_over_tls_verified_against_its_own_ca(server):
    assert server.running and server.kubeconfig.is_file()
    config = json.loads(server.kubeconfig.read_text())
    assert "insecure-skip-tls-verify" not in json.dumps(config)
    assert any(server.name in arg for arg in open(f"/proc/{server.pid}/cmdline").read().split("\0"))
    # a client that trusts another CA refuses the server's certificate
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(server.url + "/apis", context=ssl.create_default_context(), timeout=5)
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    # no client certificate: authentication fails
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(server.url + "/apis/apiextensions.k8s.io/v1", context=context, timeout=5)
    assert anonymous.value.code in (401, 403)


@pytest.mark.requires("apiserver")
def test_custom_resources_are_validated_against_the_crd_schema(objects):
    created = _create(objects, "valid", replicas=2)
    assert created["spec"] == {"image": "localhost/cnlab/busybox:1", "replicas": 2, "page": "hello"}  # defaulted
    bad = websites.website("too-many", image="docker.io/nginx", replicas=9)
    error = _error(objects.create_namespaced_custom_object, websites.GROUP, websites.VERSION, "default",
                   websites.PLURAL, bad)
    assert isinstance(error, cluster.Invalid) and error.status == 422
    fields = {field for _, field, _ in error.causes}
    assert {"spec.replicas", "spec"} <= fields
    assert "less than or equal to 5" in str(error) and "pulls no images" in str(error)


@pytest.mark.requires("apiserver")
def test_malformed_objects_get_the_servers_own_readable_error(objects):
    name = websites.website("Web_1", image="localhost/x", replicas=1)
    error = _error(objects.create_namespaced_custom_object, websites.GROUP, websites.VERSION, "default",
                   websites.PLURAL, name)
    assert isinstance(error, cluster.Invalid)
    assert error.causes[0][1] == "metadata.name" and "RFC 1123" in error.causes[0][2]
    readable = apiserver.explain(error).splitlines()   # the server's words, one field a line
    assert readable[0] == '422 Invalid: Website.cnlab.example "Web_1" is invalid'
    assert readable[1].startswith('  metadata.name: Invalid value: "Web_1": a lowercase RFC 1123 subdomain')
    missing = websites.website("no-spec", image="localhost/x", replicas=1)
    del missing["spec"]["replicas"]
    error = _error(objects.create_namespaced_custom_object, websites.GROUP, websites.VERSION, "default",
                   websites.PLURAL, missing)
    assert ("FieldValueRequired", "spec.replicas") in [c[:2] for c in error.causes]
    wrong = websites.website("wrong-version", image="localhost/x", replicas=1)
    error = _error(objects.create_namespaced_custom_object, websites.GROUP, "v2", "default",
                   websites.PLURAL, wrong)
    assert isinstance(error, cluster.NotFound) and error.status == 404


@pytest.mark.requires("apiserver")
def test_a_stale_update_is_a_409_conflict(objects):
    first = _create(objects, "stale")
    fresh = objects.get_namespaced_custom_object(websites.GROUP, websites.VERSION, "default", websites.PLURAL, "stale")
    fresh["spec"]["replicas"] = 3
    objects.replace_namespaced_custom_object(websites.GROUP, websites.VERSION, "default", websites.PLURAL,
                                             "stale", fresh)
    first["spec"]["replicas"] = 0  # written against the resourceVersion it was read at
    error = _error(objects.replace_namespaced_custom_object, websites.GROUP, websites.VERSION, "default",
                   websites.PLURAL, "stale", first)
    assert isinstance(error, cluster.Conflict) and error.status == 409
    assert "the object has been modified" in error.detail


@pytest.mark.requires("apiserver")
def test_watch_sees_changes_and_resumes_from_a_resource_version(objects, server):
    from kubernetes import watch
    created = _create(objects, "watched")
    since = created["metadata"]["resourceVersion"]
    objects.patch_namespaced_custom_object(websites.GROUP, websites.VERSION, "default", websites.PLURAL,
                                           "watched", {"spec": {"replicas": 2}})
    objects.delete_namespaced_custom_object(websites.GROUP, websites.VERSION, "default", websites.PLURAL, "watched")
    seen = []
    for event in watch.Watch().stream(objects.list_namespaced_custom_object, websites.GROUP, websites.VERSION,
                                      "default", websites.PLURAL, resource_version=since, timeout_seconds=2,
                                      field_selector="metadata.name=watched"):
        seen.append((event["type"], event["object"]["spec"]["replicas"]))
    assert seen == [("MODIFIED", 2), ("DELETED", 2)]


@pytest.mark.requires("apiserver")
def test_server_side_apply_records_owners_and_refuses_a_second_manager(server, api):
    with server.cluster() as k:
        site = websites.website("applied", image="localhost/cnlab/busybox:1", replicas=1)
        k.apply(site, field_manager="alice")
        site["spec"]["replicas"] = 2
        with pytest.raises(cluster.Conflict) as caught:
            k.apply(site, field_manager="bob")
        assert caught.value.status == 409 and ("alice", ".spec.replicas") in caught.value.conflicts
        k.apply(site, field_manager="bob", force=True)
        owners = cluster.field_owners(k.get(websites.KIND, "applied", api_version=websites.API_VERSION))
        assert owners[".spec.replicas"] == ["bob (Apply)"]
        assert owners[".spec.image"] == ["alice (Apply)", "bob (Apply)"]  # same value: shared


@pytest.mark.requires("apiserver")
def test_objects_are_stored_in_etcd_under_kubernetes_keys(objects, server):
    _create(objects, "stored", page="in etcd")
    db = server.etcd.client()
    crd = db.get(f"/registry/apiextensions.k8s.io/customresourcedefinitions/{websites.PLURAL}.{websites.GROUP}")
    assert crd is not None and json.loads(crd.value)["spec"]["group"] == websites.GROUP
    stored = db.get(f"/registry/{websites.GROUP}/{websites.PLURAL}/default/stored")
    obj = json.loads(stored.value)
    assert obj["spec"]["page"] == "in etcd"
    live = objects.get_namespaced_custom_object(websites.GROUP, websites.VERSION, "default", websites.PLURAL, "stored")
    assert int(live["metadata"]["resourceVersion"]) == stored.mod_revision  # resourceVersion IS etcd's revision


@pytest.mark.requires("apiserver")
def test_kubectl_gets_applies_server_side_and_explains_the_custom_type(server, api):
    site = json.dumps(websites.website("kubectl", image="localhost/cnlab/busybox:1", replicas=2))
    assert "serverside-applied" in server.kubectl("apply", "--server-side", "-f", "-", input=site)
    table = server.kubectl("get", "websites")
    assert table.split("\n")[0].split() == ["NAME", "IMAGE", "DESIRED", "READY"]
    assert "kubectl" in table
    assert "How many pods serve the page." in server.kubectl("explain", "websites.spec")
    with pytest.raises(apiserver.KubectlError, match="Invalid value"):
        server.kubectl("apply", "--server-side", "-f", "-", input=site.replace('"replicas": 2', '"replicas": 7'))


# ---------------------------------------------------------------- helpers.cluster on a real server

# The kind with its apiVersion: without one, the Python client's discovery also searches the
# core group (/api/v1), which this server does not serve, and gives up with a 404.
WEB = {"api_version": websites.API_VERSION}


@pytest.mark.requires("apiserver")
def test_cluster_functions_on_a_real_api_server(server, api):
    with server.cluster() as k:
        k.apply(websites.website("generic", image="localhost/cnlab/busybox:1", replicas=1))
        assert k.get(websites.KIND, "generic", **WEB)["spec"]["replicas"] == 1
        assert k.get(websites.KIND, "generic")["apiVersion"] == websites.API_VERSION  # found by its CRD
        # wait for a condition: the status subresource is written by "a controller" (us)
        k.patch(websites.KIND, "generic", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                subresource="status", **WEB)
        assert cluster.condition(k.wait_for(websites.KIND, "generic", "Ready", timeout=10, **WEB), "Ready") == "True"
        with pytest.raises(cluster.NotFound):
            k.get(websites.KIND, "nobody", **WEB)
        with pytest.raises(cluster.Invalid) as invalid:
            k.apply(websites.website("generic", image="localhost/cnlab/busybox:1", replicas=-1))
        assert invalid.value.status == 422
        with pytest.raises(cluster.Conflict):  # a merge patch that carries a stale resourceVersion
            k.patch(websites.KIND, "generic", {"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 2}}, **WEB)
        # a watch with a timeout ends on its own
        started = time.monotonic()
        events = [(e.type, e.object["metadata"]["name"]) for e in k.watch(websites.KIND, name="generic", timeout=2, **WEB)]
        assert events == [("ADDED", "generic")] and time.monotonic() - started < 10


@pytest.mark.requires("apiserver")
def test_a_user_without_rights_is_forbidden(server, api):
    with cluster.Cluster(kubeconfig=str(server.kubeconfig_for("student", ["students"]))) as k:
        with pytest.raises(cluster.Forbidden) as caught:
            k.get(websites.KIND, "generic", **WEB)
    assert caught.value.status == 403 and 'User "student" cannot' in caught.value.detail


# ---------------------------------------------------------------- start-up that fails

def _nothing_left(s, state_existed):
    """Neither the API server nor its etcd runs, and none of their folders is left."""
    assert not s.running and s.pid is None
    assert list(procfs.processes(lambda p: s.name in p.line)) == []
    assert s.etcd is not None and not s.etcd.running and not s.etcd.dir.exists()
    assert not s.dir.exists() and served.STATE.exists() == state_existed


@pytest.mark.requires("apiserver")
def test_a_server_that_never_answers_times_out_and_leaves_nothing(monkeypatch):
    existed = served.STATE.exists()
    monkeypatch.setattr(served.Server, "_answers", lambda self, context: False)
    s = apiserver.Server("never", timeout=2)
    with pytest.raises(LabTimeout, match="apiextensions-apiserver to become ready: not within 2 s"):
        s.start()
    assert s._daemon.process.returncode == -9                   # killed, and reaped
    _nothing_left(s, existed)


@pytest.mark.requires("apiserver")
def test_a_server_that_exits_on_a_bad_flag_fails_with_its_log_and_leaves_nothing(monkeypatch):
    existed = served.STATE.exists()
    monkeypatch.setattr(served, "_NO_CORE_ADMISSION", (*served._NO_CORE_ADMISSION, "NoSuchPlugin"))
    s = apiserver.Server("badflag")
    with pytest.raises(apiserver.ApiserverError, match="exited with status [1-9]") as e:
        s.start()
    assert "NoSuchPlugin" in str(e.value).split("exited with status", 1)[1]   # from its log
    _nothing_left(s, existed)


# ---------------------------------------------------------------- the etcd under it

@pytest.mark.requires("apiserver")
def test_the_server_stores_in_an_etcd_that_kubernetes_supports(server):
    assert server.etcd.binary.version >= apiserver.ETCD_NEEDED
    assert os.path.realpath(f"/proc/{server.etcd.pid}/exe") == os.path.realpath(server.etcd.binary.path)


@pytest.mark.requires("apiserver")
def test_a_watch_of_a_resource_nobody_wrote_for_a_while(server, api):
    """The watch cache of a quiet resource stays at its last write while etcd's revision moves
    on (other resources are written). A watch must wait for etcd's progress notification to
    catch up, which Kubernetes 1.36 asks for only from etcd 3.5.13 on; on bookworm's 3.4 this
    watch failed with 504 Too large resource version."""
    with server.cluster() as k:
        k.apply(websites.website("quiet", image="localhost/cnlab/busybox:1", replicas=1))
        db = server.etcd.client()
        for i in range(20):             # meanwhile everyone else goes on writing: etcd moves on
            db.put(f"/registry/elsewhere/{i}", "x")

        def later():        # after the 3 s a watch waits for a stale cache before it answers 504
            time.sleep(4)
            k.patch(websites.KIND, "quiet", {"spec": {"replicas": 2}}, **WEB)
        writer = threading.Thread(target=later)
        writer.start()
        try:
            seen = [(e.type, e.object["spec"]["replicas"])
                    for e in k.watch(websites.KIND, name="quiet", timeout=7, **WEB)]
        finally:
            writer.join()
            k.delete(websites.KIND, "quiet", **WEB)
            db.delete("/registry/elsewhere/", prefix=True)
    assert seen == [("ADDED", 1), ("MODIFIED", 2)]
