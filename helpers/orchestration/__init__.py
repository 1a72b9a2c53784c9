"""Part 3, orchestration without Kubernetes' binaries: Docker Swarm (``swarm``), etcd (``etcd``), a
reconcile loop (``controller``), the real Kubernetes API server code (``apiserver``) and a
controller against it (``websites``)."""
