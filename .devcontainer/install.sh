#!/bin/bash
# The devcontainer's set-up: kind and kubectl, pinned as the hosted workflow pins them
# (helpers/kubernetes/kind.py: KIND_VERSION, KUBECTL_VERSION), then the course's own `make setup`.
# The container is privileged and runs Docker inside it (docker-in-docker), so kind's node
# containers, namespaces, cgroups and the Kubernetes labs all run here.
set -euo pipefail
arch=$(dpkg --print-architecture)
curl -fsSLo /usr/local/bin/kind "https://kind.sigs.k8s.io/dl/${KIND_VERSION}/kind-linux-${arch}"
curl -fsSLo /usr/local/bin/kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${arch}/kubectl"
chmod +x /usr/local/bin/kind /usr/local/bin/kubectl
sysctl -w fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512 || true
make setup
