"""Part 2, containers: namespaces (``ns``) and cgroups (``cgroups``) from the syscalls up, root
filesystems and layers (``rootfs``, ``oci``), a container from scratch (``sandbox``), and the real
runtimes: runc (``runc``), Docker (``engine``, ``images``), containerd and the CRI (``containerd``,
``cri``)."""
