"""Waiting with a deadline: the one loop behind every "wait until ..." in the course."""
import time
from typing import Callable, TypeVar

from helpers.errors import LabTimeout

T = TypeVar("T")


def until(check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
          backoff: float | None = None, detail: Callable[[], str] = lambda: "",
          fix: str | None = None, error: Callable[[], Exception] | None = None) -> T:
    """Call ``check`` until it returns something true, and return that; ``LabTimeout`` after
    ``timeout`` seconds, naming ``what`` was waited for and ``detail()`` (what was seen last),
    or ``error()`` when the caller words its own.

    It checks every ``interval`` seconds; with ``backoff``, the pause doubles each time up to
    ``backoff`` seconds (a fast first look, then no spin). ``check`` is called at least once,
    even with ``timeout=0``. An exception it raises propagates at once: a condition that can
    never become true should say so, not time out.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            if error is not None:
                raise error()
            seen = detail()
            raise LabTimeout(f"{what}: not within {timeout:g} s" + (f" ({seen})" if seen else ""),
                             fix=fix)
        time.sleep(min(interval, remaining(deadline)))
        if backoff is not None:
            interval = min(2 * interval, backoff)


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never below zero."""
    return max(0.0, deadline - time.monotonic())
