"""The plumbing of a level-triggered controller, written once for the three of the course: the
replica set controller (lab 33, ``helpers.controller``), the Website controller (lab 35,
``helpers.websites``) and the Echo operator (lab 44, ``helpers.operator``); chapter
"Orchestration".

A controller must never depend on seeing every event, so ``Loop`` gives the guarantee of
client-go's informers (a resync every period, a fresh list whenever a watch breaks) in its
simplest form: a full pass (``step(None)``: list everything, act on the difference) runs every
``resync`` seconds whatever the watches do. Watches only wake it early, with a full pass or a pass
of a few keys. A watch that fails asks for a full pass at once, is opened again after a growing
pause, and never stops the loop; a pass that fails is run again soon. So a broken watch delays a fix, and loses none.
"""
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Self

from helpers._core import wait

EVERYTHING: Any = None   # the key of a full pass
BACKOFF = (0.5, 5.0)     # a failed watch waits 0.5 s, then twice as long each time, at most 5 s


@dataclass(frozen=True)
class Watch:
    """A source of wake-ups: ``open()`` returns a new stream of events, which may end (a server's
    timeout) or raise; ``key(event)`` names what to reconcile (None: nothing), and without ``key``
    every event asks for a full pass. A stream with a ``close()`` is closed when the loop stops."""
    name: str
    open: Callable[[], Iterable[Any]]
    key: Callable[[Any], Hashable | None] | None = None


class Stream:
    """An iterable and what to close with it: Docker's events and the client they came from."""

    def __init__(self, events: Iterable[Any], *closers: Callable[[], object]) -> None:
        self.events, self.closers = events, closers

    def __iter__(self) -> Iterator[Any]:
        return iter(self.events)

    def close(self) -> None:
        for close in self.closers:
            with contextlib.suppress(Exception):
                close()


class Loop:
    """Run ``step`` in a thread: ``step(None)`` for a full pass, ``step(keys)`` for a set of keys.

    ``on_error(where, error)`` hears of every failure (``where`` is ``"pass"`` or the watch's
    name): the controller decides what its log says. ``log`` keeps the last 200 entries a
    controller appends, for people to read, never to decide.
    """

    def __init__(self, step: Callable[[frozenset | None], object], *, resync: float, name: str,
                 watches: Iterable[Watch] = (), retry: float = 1.0,
                 on_error: Callable[[str, Exception], object] = lambda where, error: None) -> None:
        self.step, self.resync, self.name, self.watches = step, resync, name, list(watches)
        self.retry, self.on_error = retry, on_error
        self.log: deque = deque(maxlen=200)
        self.last_error: Exception | None = None   # of the last pass: None once one succeeds
        self._due: dict[Hashable, float] = {}      # key (EVERYTHING: a full pass) -> when it is due
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: dict[str, Any] = {}

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> "Loop":
        if self.running:
            return self
        self._stop.clear()
        self.wake()  # the first pass lists everything
        self._threads = [threading.Thread(target=self._run, name=self.name, daemon=True)]
        self._threads += [threading.Thread(target=self._watch, args=(w,), name=f"{self.name}-watch-{w.name}",
                                           daemon=True) for w in self.watches]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and close its watches; wait at most ``timeout`` seconds for its threads (a
        stream that cannot be closed ends on its server's timeout)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            streams = list(self._streams.values())
        for stream in streams:
            _close(stream)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(wait.remaining(deadline))

    def wake(self, key: Hashable = EVERYTHING, *, after: float = 0.0) -> None:
        """Ask for a pass of ``key`` (by default, of everything) within ``after`` seconds."""
        due = time.monotonic() + after
        with self._cond:
            self._due[key] = min(self._due.get(key, due), due)
            self._cond.notify_all()

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the loop stops first; True if it did."""
        return self._stop.wait(seconds)

    def _take(self) -> set | None:
        """Wait for the keys that are due, and take them (None: the loop stops)."""
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                ready = {key for key, due in self._due.items() if due <= now}
                if ready:
                    for key in ready:
                        del self._due[key]
                    if EVERYTHING in ready:  # the next resync, counted from this full pass
                        self._due[EVERYTHING] = min(self._due.get(EVERYTHING, now + self.resync),
                                                    now + self.resync)
                    return ready
                self._cond.wait(min(self._due.values(), default=now + self.resync) - now)
        return None

    def _run(self) -> None:
        while (ready := self._take()) is not None:
            everything = EVERYTHING in ready
            try:
                self.step(None if everything else frozenset(ready))
                self.last_error = None
            except Exception as e:  # the API, etcd or the runtime away: say so, then try again soon
                self.last_error = e
                self.on_error("pass", e)
                for key in ready:
                    self.wake(key, after=min(self.resync, self.retry))

    def _watch(self, source: Watch) -> None:
        pause = BACKOFF[0]
        while not self._stop.is_set():
            try:
                stream = source.open()
                opened = time.monotonic()
                with self._cond:
                    self._streams[source.name] = stream
                try:
                    for event in [] if self._stop.is_set() else stream:  # stop() came while it opened
                        pause = BACKOFF[0]  # it delivers: the next failure starts afresh
                        if self._stop.is_set():
                            break
                        key = EVERYTHING if source.key is None else source.key(event)
                        if source.key is None or key is not None:
                            self.wake(key)
                finally:
                    with self._cond:
                        self._streams.pop(source.name, None)
                    _close(stream)
                self._stop.wait(opened + BACKOFF[0] - time.monotonic())  # ended: open again, not in a spin
            except Exception as e:  # a broken watch only delays: the resync still comes
                if self._stop.is_set():
                    return
                self.on_error(source.name, e)
                self.wake()  # it may have missed events: list again now, as a client-go reflector does
                self._stop.wait(pause)
                pause = min(2 * pause, BACKOFF[1])


class Runs:
    """What every controller on a ``Loop`` (its ``self._loop``) offers: ``running``, ``start()``
    (in threads), ``stop()`` (waiting at most ``stop_timeout`` seconds for them), and a ``with``
    block that starts and stops it."""
    _loop: Loop
    stop_timeout: float = 10.0

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> Self:
        self._loop.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and its watches (what it made stays: it is the workload)."""
        self._loop.stop(self.stop_timeout if timeout is None else timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _close(stream: Any) -> None:
    with contextlib.suppress(Exception):  # a generator running in another thread cannot be closed
        if callable(getattr(stream, "close", None)):
            stream.close()
