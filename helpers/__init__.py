"""Helpers for the Cloud-Native Runtime Lab notebooks: one module per real thing.

``import helpers`` is cheap; each module is imported when a lab uses it::

    from helpers import ns, cgroups
    helpers.cleanup()          # sweep what an interrupted cell left behind
"""
from .errors import BadInput, LabError, LabTimeout, MissingTool, NeedsRoot, NotSupported
from .resources import cleanup, leftovers

__all__ = ["BadInput", "LabError", "LabTimeout", "MissingTool", "NeedsRoot", "NotSupported",
           "cleanup", "leftovers"]
