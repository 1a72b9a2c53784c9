"""The course's error tree: every failure a student can fix says what was wrong and what to do.

Like docker-py's ``docker.errors``: one base class, so a notebook can ``except LabError``,
and a small number of subclasses a caller can tell apart.
"""


class LabError(Exception):
    """Base of every error the helpers raise on purpose.

    ``fix`` is the one thing to do about it; it is printed after the message.
    """

    def __init__(self, message, *, fix=None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}: {fix}" if fix else message)


class BadInput(LabError, ValueError):
    """An argument is malformed; raised before anything is created."""


class NeedsRoot(LabError, PermissionError):
    def __init__(self, what):
        super().__init__(f"{what} needs root", fix="run JupyterLab (or pytest) with sudo")


class MissingTool(LabError):
    """A program or package the lab drives is not installed."""

    def __init__(self, tool, *, package=None):
        package = package or tool
        super().__init__(f"{tool} is not installed",
                         fix=f"run `make test` as root, or `apt-get install {package}`")


class NotSupported(LabError):
    """The kernel or the machine cannot do this (no KVM, no such controller, ...)."""


class LabTimeout(LabError, TimeoutError):
    """Something did not happen within its time limit."""
