"""Part 3, Kubernetes on a real cluster: the API from Python on any cluster (``cluster``), kind's
nodes-as-containers (``kind``), and an operator written with the kubernetes client (``operator``)."""
