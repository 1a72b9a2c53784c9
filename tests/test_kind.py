"""helpers.kind: the config it writes, the preflight's decisions, kube-proxy's rules decoded, and
(marked "kind", run where kind can make a cluster) a real cluster made, reused, loaded, deleted."""
import dataclasses
import json
import os
import socket
import struct
from pathlib import Path

import pytest
import yaml

import helpers
from helpers import cluster, images, kind
from helpers._core import procfs
from helpers.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ config


def test_config_is_one_control_plane_n_workers_and_a_proxy_mode():
    cfg = kind.config("lab", workers=2, proxy_mode="ipvs")
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4" and cfg["name"] == "cnlab-lab"
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    assert {n["image"] for n in cfg["nodes"]} == {kind.NODE_IMAGE}
    assert cfg["networking"] == {"kubeProxyMode": "ipvs"}


def test_config_survives_a_round_trip_through_yaml_and_is_checked():
    cfg = kind.config("lab", workers=1)
    again = yaml.safe_load(yaml.safe_dump(cfg))
    assert again == cfg
    kind.check_config(again)


def test_the_printed_config_has_no_yaml_anchors():
    text = yaml.safe_dump(kind.config("cluster", workers=2, proxy_mode="nftables"), sort_keys=False)
    assert "&id" not in text and "*id" not in text
    assert text.count("- role: worker") == 2 and "kubeProxyMode: nftables" in text


@pytest.mark.parametrize("change, complaint", [
    (lambda c: c["networking"].update(kubeProxyMode="userspace"), "networking.kubeProxyMode"),
    (lambda c: c["nodes"][0].update(image="kindest/node:v1.33.1"), "nodes.0.image"),
    (lambda c: c["nodes"][1].update(labels={"a": "b"}), "nodes.1"),
    (lambda c: c.update(nodes=[{"role": "worker", "image": kind.NODE_IMAGE}]), "nodes"),
    (lambda c: c.update(apiVersion="kind.x-k8s.io/v1alpha3"), "apiVersion"),
    (lambda c: c.update(name="lab"), "name"),
])
def test_config_check_refuses_what_kind_or_the_course_would(change, complaint):
    cfg = kind.config("lab", workers=1)
    change(cfg)
    with pytest.raises(BadInput, match=complaint):
        kind.check_config(cfg)


def test_bad_arguments_fail_before_anything_is_made():
    for call in (lambda: kind.config("Lab!"), lambda: kind.config("lab", workers=9),
                 lambda: kind.config("lab", proxy_mode="nftables2")):
        with pytest.raises(BadInput):
            call()
    assert kind.cluster_name("pods") == kind.cluster_name("cnlab-pods") == "cnlab-pods"


# ------------------------------------------------------------------------------ preflight

GOOD = kind.Machine(kind="/usr/local/bin/kind", docker_error=None, docker_root="/var/lib/docker",
                    free_bytes=50 * 2**30, max_user_watches=524288, max_user_instances=512,
                    modules=frozenset({"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack", "overlay"}))


def test_a_good_machine_passes():
    assert kind.problems(GOOD, "iptables") == [] and kind.problems(GOOD, "ipvs") == []


def test_low_inotify_limits_fail_with_the_sysctl_that_fixes_them():
    [p] = kind.problems(dataclasses.replace(GOOD, max_user_watches=192536, max_user_instances=128))
    assert "max_user_watches 192536" in p.what and "too many open files" in p.what
    assert p.fix == "sudo sysctl -w fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512"
    [p] = kind.problems(dataclasses.replace(GOOD, max_user_watches=1048576, max_user_instances=128))
    assert "max_user_watches=1048576" in p.fix  # never lowers what is already higher


def test_ipvs_modules_matter_only_in_ipvs_mode():
    machine = dataclasses.replace(GOOD, modules=frozenset({"nf_conntrack", "ip_vs"}))
    assert kind.problems(machine, "iptables") == []
    [p] = kind.problems(machine, "ipvs")
    assert "ip_vs_rr, ip_vs_wrr, ip_vs_sh" in p.what and p.fix == "sudo modprobe -a ip_vs_rr ip_vs_wrr ip_vs_sh"


def test_docker_disk_and_kind_itself():
    bad = dataclasses.replace(GOOD, kind=None, docker_error="no Docker engine answers", free_bytes=2 * 2**30)
    found = kind.problems(bad)
    assert [p.what.split(" ")[0] for p in found] == ["kind", "no", "only"]
    assert "2.0 GiB free under /var/lib/docker" in found[2].what
    error = kind.PreflightFailed(found)
    assert "fix: start dockerd" in str(error) and error.problems == found


def test_this_machine_is_read_and_judged():
    machine = kind.read_machine()
    assert machine.max_user_watches == int(open("/proc/sys/fs/inotify/max_user_watches").read())
    low = machine.max_user_watches < kind.MIN_WATCHES or machine.max_user_instances < kind.MIN_INSTANCES
    assert any("inotify" in p.what for p in kind.problems(machine)) == low
    assert set(os.listdir("/sys/module")) <= machine.modules  # loaded, or built in


def test_create_checks_before_it_makes_anything(monkeypatch):
    calls = []
    monkeypatch.setattr(kind, "_kind", lambda *args, **kw: calls.append(args) or "")
    monkeypatch.setattr(kind, "clusters", lambda: ["cnlab-lab"])
    with pytest.raises(kind.ClusterExists, match="cnlab-lab already exists: reuse it with reuse=True"):
        kind.create("lab")
    monkeypatch.setattr(kind, "clusters", lambda: [])
    monkeypatch.setattr(kind, "read_machine", lambda: dataclasses.replace(GOOD, modules=frozenset()))
    with pytest.raises(kind.PreflightFailed, match="ip_vs"):
        kind.create("lab", proxy_mode="ipvs")
    with pytest.raises(BadInput):
        kind.create("lab", workers=-1)
    assert calls == []  # no `kind create cluster` was run


def test_create_runs_kind_with_the_config_it_wrote_and_waits_for_the_nodes(monkeypatch, tmp_path):
    calls, waited = [], []

    class Made:
        def __init__(self, name, kubeconfig, *, namespace):
            self.name, self.kubeconfig, self.namespace = name, kubeconfig, namespace

        def wait_ready(self, *, nodes, timeout, system_pods):
            waited.append((nodes, timeout, system_pods))

    monkeypatch.setattr(kind, "state_dir", lambda *parts: tmp_path)
    monkeypatch.setattr(kind, "_kind", lambda *args, **kw: calls.append(args) or "")
    monkeypatch.setattr(kind, "clusters", lambda: [])
    monkeypatch.setattr(kind, "read_machine", lambda: GOOD)
    monkeypatch.setattr(kind, "KindCluster", Made)
    made = kind.create("lab", workers=2, proxy_mode="ipvs", namespace="cnlab-lab")
    [args] = calls
    assert args == ("create", "cluster", "--name", "cnlab-lab", "--config", str(tmp_path / "cnlab-lab.yaml"),
                    "--kubeconfig", str(tmp_path / "cnlab-lab.kubeconfig"))
    assert yaml.safe_load((tmp_path / "cnlab-lab.yaml").read_text()) == kind.config("lab", workers=2, proxy_mode="ipvs")
    assert (made.name, made.namespace, waited) == ("cnlab-lab", "cnlab-lab", [(3, 300, True)])


def test_sweep_spares_the_cluster_of_the_current_kubeconfig_context(monkeypatch):
    deleted = []
    monkeypatch.setattr(kind, "clusters", lambda: ["cnlab-ci", "cnlab-pods", "mine"])
    monkeypatch.setattr(kind, "delete", deleted.append)
    monkeypatch.setattr(kind, "_current_kind_cluster", lambda: "cnlab-ci")
    kind.sweep()
    assert deleted == ["cnlab-pods"]


def test_the_leak_check_ignores_a_kind_clusters_own_processes(monkeypatch):
    """kind's kube-controller-manager carries the cluster's cnlab-* name, not the course's mark."""
    fake = procfs.Process(999999, ("kube-controller-manager", "--cluster-name=cnlab-ci", "--leader-elect=true"))
    real = procfs.processes
    monkeypatch.setattr(procfs, "processes", lambda match=lambda p: True: [
        *real(match), *([fake] if match(fake) else [])])
    monkeypatch.setattr(procfs, "marked", lambda pid, _real=procfs.marked: False if pid == fake.pid else _real(pid))
    leaked = helpers.leftovers()
    assert not any(item.startswith("process 999999 ") for item in leaked)


# ------------------------------------------------------------------------------ the pins

def test_the_workflow_and_the_devcontainer_pin_what_helpers_kind_pins():
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "course.yml").read_text())
    [setup] = [s for job in flow["jobs"].values() for s in job["steps"] if s.get("uses", "").startswith("helm/kind-action@")]
    assert setup["with"]["version"] == kind.KIND_VERSION and setup["with"]["node_image"] == kind.NODE_IMAGE
    assert setup["with"]["kubectl_version"] == kind.KUBECTL_VERSION
    dev = json.loads((ROOT / ".devcontainer" / "devcontainer.json").read_text())  # strict JSON: no comments
    assert dev["privileged"] is True and dev["remoteUser"] == "root"
    [dind] = [f for f in dev["features"] if "docker-in-docker" in f]
    assert dind.startswith("ghcr.io/devcontainers/features/docker-in-docker:")
    assert dev["containerEnv"]["KIND_VERSION"] == kind.KIND_VERSION
    assert dev["containerEnv"]["KUBECTL_VERSION"] == kind.KUBECTL_VERSION
    install = (ROOT / dev["postCreateCommand"].split()[-1]).read_text()
    assert "kind.sigs.k8s.io/dl/${KIND_VERSION}" in install and "dl.k8s.io/release/${KUBECTL_VERSION}" in install


# ------------------------------------------------------------------------------ kube-proxy's rules

# The rules kube-proxy's iptables mode writes for a Service with three endpoints (the format of
# its own tests, pkg/proxy/iptables/proxier_test.go), as iptables-save prints them.
IPTABLES = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-7XSXM6Z3JTTUHQ5F - [0:0]
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -d 10.96.141.7/32 -p tcp -m comment --comment "cnlab-services/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-7XSXM6Z3JTTUHQ5F
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 10.244.1.2/32 -m comment --comment "cnlab-services/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p tcp -m comment --comment "cnlab-services/web:http" -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m comment --comment "cnlab-services/web:http" -m tcp -j DNAT --to-destination 10.244.2.2:8080
-A KUBE-SEP-CCCCCCCCCCCCCCCC -p tcp -m comment --comment "cnlab-services/web:http" -m tcp -j DNAT --to-destination 10.244.2.3:8080
-A KUBE-SVC-7XSXM6Z3JTTUHQ5F ! -s 10.244.0.0/16 -d 10.96.141.7/32 -p tcp -m comment --comment "cnlab-services/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-7XSXM6Z3JTTUHQ5F -m comment --comment "cnlab-services/web:http -> 10.244.1.2:8080" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SVC-7XSXM6Z3JTTUHQ5F -m comment --comment "cnlab-services/web:http -> 10.244.2.2:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SVC-7XSXM6Z3JTTUHQ5F -m comment --comment "cnlab-services/web:http -> 10.244.2.3:8080" -j KUBE-SEP-CCCCCCCCCCCCCCCC
COMMIT
"""


def test_iptables_rules_of_a_service_decoded():
    rules = cluster.iptables_service(IPTABLES, "cnlab-services/web")
    assert rules["chain"] == "KUBE-SVC-7XSXM6Z3JTTUHQ5F" and rules["cluster_ip"] == "10.96.141.7:80"
    assert [ep for ep, _ in rules["endpoints"]] == ["10.244.1.2:8080", "10.244.2.2:8080", "10.244.2.3:8080"]
    assert [round(s, 3) for s in cluster.shares(p for _, p in rules["endpoints"])] == [0.333, 0.333, 0.333]
    assert cluster.iptables_service(IPTABLES, "cnlab-services/other") is None


# The same Service in nftables mode, as `nft list table ip kube-proxy` prints what kube-proxy's own
# tests (pkg/proxy/nftables/proxier_test.go) add, abridged to the parts the decoder reads.
NFTABLES = """\
table ip kube-proxy {
\tcomment "rules for kube-proxy"
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
\t\telements = { 10.96.0.10 . udp . 53 : goto service-NWBZK7IH-kube-system/kube-dns/udp/dns,
\t\t\t     10.96.141.7 . tcp . 80 : goto service-4AT6LBPK-cnlab-services/web/tcp/http }
\t}
\tchain service-4AT6LBPK-cnlab-services/web/tcp/http {
\t\tip daddr 10.96.141.7 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
\t\tnumgen random mod 3 vmap { 0 : goto endpoint-UNZV3OEC-cnlab-services/web/tcp/http__10.244.1.2/8080, 1 : goto endpoint-5RFCDDV7-cnlab-services/web/tcp/http__10.244.2.2/8080, 2 : goto endpoint-UEIP74TE-cnlab-services/web/tcp/http__10.244.2.3/8080 }
\t}
\tchain endpoint-UNZV3OEC-cnlab-services/web/tcp/http__10.244.1.2/8080 {
\t\tip saddr 10.244.1.2 jump mark-for-masquerade
\t\tmeta l4proto tcp dnat to 10.244.1.2:8080
\t}
\tchain endpoint-5RFCDDV7-cnlab-services/web/tcp/http__10.244.2.2/8080 {
\t\tmeta l4proto tcp dnat to 10.244.2.2:8080
\t}
\tchain endpoint-UEIP74TE-cnlab-services/web/tcp/http__10.244.2.3/8080 {
\t\tmeta l4proto tcp dnat to 10.244.2.3:8080
\t}
}
"""


def test_nftables_rules_of_a_service_decoded():
    rules = cluster.nftables_service(NFTABLES, "cnlab-services/web")
    assert rules["chain"] == "service-4AT6LBPK-cnlab-services/web/tcp/http" and rules["cluster_ip"] == "10.96.141.7:80"
    assert rules["endpoints"] == [("10.244.1.2:8080", 1 / 3), ("10.244.2.2:8080", 1 / 3), ("10.244.2.3:8080", 1 / 3)]
    assert cluster.nftables_service(NFTABLES, "cnlab-services/we") is None  # a prefix is another Service
    assert cluster.nftables_service(NFTABLES, "cnlab-services/other") is None


def _ip_vs(services):
    """/proc/net/ip_vs exactly as net/netfilter/ipvs/ip_vs_ctl.c's ip_vs_info_seq_show prints it."""
    hexip = lambda ip: struct.unpack("!I", socket.inet_aton(ip))[0]
    text = ("IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n")
    for proto, ip, port, sched, dests in services:
        text += "%s  %08X:%04X %s %s \n" % (proto, hexip(ip), port, sched, "")
        for dip, dport in dests:
            text += "  -> %08X:%04X      %-7s %-6d %-10d %-10d\n" % (hexip(dip), dport, "Masq", 1, 0, 0)
    return text


def test_ipvs_virtual_servers_decoded_from_proc():
    text = _ip_vs([("TCP", "10.96.141.7", 80, "rr", [("10.244.1.2", 8080), ("10.244.2.2", 8080)]),
                   ("UDP", "10.96.0.10", 53, "rr", [("10.244.0.3", 53)])])
    assert cluster.ipvs_services(text) == {
        "TCP 10.96.141.7:80": {"scheduler": "rr", "destinations": [("10.244.1.2:8080", "Masq", 1),
                                                                   ("10.244.2.2:8080", "Masq", 1)]},
        "UDP 10.96.0.10:53": {"scheduler": "rr", "destinations": [("10.244.0.3:53", "Masq", 1)]}}


# ------------------------------------------------------------------------------ a real kind cluster

@pytest.mark.requires("kind")
def test_a_kind_cluster_made_reused_loaded_and_deleted():
    name = f"test-{os.getpid()}"
    try:
        c = kind.create(name, workers=1, namespace="cnlab-test")
        assert [(n.role, n.state) for n in c.node_containers()] == [("control-plane", "running"), ("worker", "running")]
        assert c.proxy_mode() == "iptables" and cluster.readiness(c.get("Node"), c.get("Pod", namespace="kube-system"),
                                                                  system_pods=True) == []
        with pytest.raises(kind.ClusterExists):
            kind.create(name, workers=1)
        with pytest.raises(kind.ClusterExists, match="with 1 workers"):
            kind.create(name, workers=2, reuse=True)
        again = kind.create(name, workers=1, reuse=True)
        assert again.context == c.context == f"kind-cnlab-{name}"
        c.load_image(images.busybox())
        c.ensure_namespace()
        c.apply("41-cluster/hello.yaml")
        c.wait_for("Pod", "hello", "Ready", timeout=120)
        assert c.logs("hello").startswith(f"hello from cnlab-{name}-worker")
        assert c.exec("hello", "cat", "/proc/1/cmdline").stdout.startswith("sh")
        assert cluster.iptables_service(c.node_exec(f"cnlab-{name}-worker", "iptables-save", "-t", "nat").stdout,
                                     "default/kubernetes") is not None
        sandbox = c.sandbox("hello")
        assert sandbox["pause"] == "/pause" and sandbox["containers"] == ["hello"]
        assert {"net", "ipc", "uts"} <= set(sandbox["shared"])
    finally:
        kind.delete(name)
    kind.delete(name)  # deleting twice is fine
    assert f"cnlab-{name}" not in kind.clusters()
