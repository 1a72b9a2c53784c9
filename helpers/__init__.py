"""Helpers for the Cloud-Native Runtime Lab notebooks: one module per real thing.

The folders follow the book: ``_core`` (private plumbing every part stands on), then ``virt``
(part 1), ``containers`` (part 2), ``orchestration`` and ``kubernetes`` (part 3), and
``notebook`` (what only the notebooks use). Labs import modules by their short name, which is
cheap: each is imported when first used::

    from helpers import ns, cgroups        # helpers.containers.ns, helpers.containers.cgroups
    helpers.cleanup()                      # sweep what an interrupted cell left behind
    %load_ext helpers                      # in a notebook: the %%sandbox cell magic
"""
import importlib

from helpers.errors import (BadInput, LabError, LabTimeout, MissingTool, NeedsRoot, NotFound,
                            NotSupported, QuorumLost, Refused, Unavailable)
from helpers._core.owners import cleanup, leftovers

# The short names the labs use, and where each module lives.
MODULES = {
    "resources": "helpers._core.names",
    **{m: f"helpers.virt.{m}" for m in ("kvm", "paravirt", "vm", "initramfs", "compare", "v2guest")},
    **{m: f"helpers.containers.{m}" for m in ("ns", "cgroups", "rootfs", "oci", "runc", "engine",
                                              "images", "containerd", "cri", "sandbox")},
    **{m: f"helpers.orchestration.{m}" for m in ("swarm", "etcd", "controller", "websites", "apiserver",
                                                 "hosts", "bridge", "swarm_cluster", "etcd_cluster")},
    **{m: f"helpers.kubernetes.{m}" for m in ("cluster", "kind", "operator")},
    **{m: f"helpers.notebook.{m}" for m in ("doctor", "labs", "magics", "widgets")},
}

__all__ = ["BadInput", "LabError", "LabTimeout", "MissingTool", "NeedsRoot", "NotFound",  # noqa: PLE0604
           "NotSupported", "QuorumLost", "Refused", "Unavailable", "cleanup", "leftovers",
           "load_ipython_extension", *MODULES]


def __getattr__(name):
    """``from helpers import x``: the module ``x`` of whichever part of the book it belongs to."""
    if name in MODULES:
        try:
            module = importlib.import_module(MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != MODULES[name]:
                raise
            raise AttributeError(f"module 'helpers' has no attribute {name!r}") from e
        globals()[name] = module
        return module
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(MODULES))


def load_ipython_extension(ipython):
    """``%load_ext helpers``: the %%sandbox cell magic (helpers.notebook.magics)."""
    from helpers.notebook.magics import load_ipython_extension as load
    load(ipython)
