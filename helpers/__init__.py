"""Helpers for the Cloud-Native Runtime Lab notebooks: one module per real thing.

``import helpers`` is cheap; each module is imported when a lab uses it::

    from helpers import ns, cgroups
    helpers.cleanup()          # sweep what an interrupted cell left behind
    %load_ext helpers          # in a notebook: the %%sandbox cell magic
"""
from .errors import BadInput, LabError, LabTimeout, MissingTool, NeedsRoot, NotSupported
from .resources import cleanup, leftovers

__all__ = ["BadInput", "LabError", "LabTimeout", "MissingTool", "NeedsRoot", "NotSupported",
           "cleanup", "leftovers", "load_ipython_extension"]


def load_ipython_extension(ipython):
    """``%load_ext helpers``: the %%sandbox cell magic (helpers.magics)."""
    from .magics import load_ipython_extension as load
    load(ipython)
