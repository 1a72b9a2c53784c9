"""The course's error tree: every failure a student can fix says what was wrong and what to do.

Like docker-py's ``docker.errors``: one base class, so a notebook can ``except LabError``, a few
shared bases a caller can tell apart whichever module raised them (``Unavailable``,
``NotFound``, ``Refused``, ...), and each module's own subclasses below those.

Like psutil's exceptions, they survive pickling: work done in a forked child (helpers.ns)
comes back to the notebook as the same error, with the same text, whatever a subclass's
``__init__`` takes.
"""


class LabError(Exception):
    """Base of every error the helpers raise on purpose.

    ``fix`` is the one thing to do about it; it is printed after the message.
    """

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}: {fix}" if fix else message)

    def __reduce__(self):
        # Rebuilt from its parts, never through a subclass's own __init__ (whose arguments differ).
        return _rebuild, (type(self), self.message, self.fix, dict(self.__dict__))


def _rebuild(cls, message, fix, state):
    error = cls.__new__(cls)
    LabError.__init__(error, message, fix=fix)
    error.__dict__.update(state)
    return error


class BadInput(LabError, ValueError):
    """An argument is malformed; raised before anything is created."""


class NeedsRoot(LabError, PermissionError):
    def __init__(self, what: str):
        super().__init__(f"{what} needs root", fix="run JupyterLab (or pytest) with sudo")


class MissingTool(LabError):
    """A program or package the lab drives is not installed."""

    def __init__(self, tool: str, *, package: str | None = None):
        package = package or tool
        super().__init__(f"{tool} is not installed",
                         fix=f"run `make test` as root, or `apt-get install {package}`")


class NotSupported(LabError):
    """The kernel or the machine cannot do this (no KVM, no such controller, ...)."""


class LabTimeout(LabError, TimeoutError):
    """Something did not happen within its time limit."""


class Unavailable(LabError, ConnectionError):
    """A service the lab talks to is not there: no Docker engine, no containerd, no etcd, no cluster."""


class QuorumLost(Unavailable):
    """A replicated service (a Swarm's managers, an etcd cluster) has fewer than a majority of
    its members up: it cannot agree on anything, so it refuses every change."""


class NotFound(LabError, LookupError):
    """The object asked for does not exist: an image, a pod, a Kubernetes object."""


class Refused(LabError):
    """The service was there and said no: a conflict, a foreign swarm, a name already taken."""
