"""helpers._core.loop: the guarantee the three controllers share. A full pass every ``resync``
seconds whatever the watches do; watches only wake it early; a failing watch is retried with a
growing pause and never stops the loop; a failing pass is retried soon; stop() ends it all."""
import queue
import threading
import time

import pytest

from helpers._core import loop
from helpers._core.wait import until
from helpers.errors import LabTimeout


class Recorder:
    def __init__(self, fail=0):
        self.passes, self.fail = [], fail

    def __call__(self, keys):
        self.passes.append((time.monotonic(), keys))
        if self.fail:
            self.fail -= 1
            raise OSError("etcd is away")

    def full(self):
        return [t for t, keys in self.passes if keys is None]


class Stream:
    """A watch's stream that blocks until an event is put, or until it is closed."""

    def __init__(self):
        self.events, self.closed = queue.Queue(), False

    def __iter__(self):
        while (event := self.events.get()) is not None:
            yield event

    def close(self):
        self.closed = True
        self.events.put(None)


def test_a_full_pass_every_resync_while_the_watch_fails_each_time():
    step, opened, errors = Recorder(), [], []

    def broken():
        opened.append(time.monotonic())
        raise ConnectionError("504 Too large resource version")

    ctl = loop.Loop(step, resync=0.3, name="cnlab-test-loop", watches=[loop.Watch("things", broken)],
                    on_error=lambda where, e: errors.append(where))
    began = time.monotonic()
    with_threads = threading.active_count()
    ctl.start()
    time.sleep(2.5)
    ctl.stop()
    assert not ctl.running and threading.active_count() <= with_threads
    full = step.full()
    assert full[0] - began < 0.2 and len(full) >= 6  # at once, then every 0.3 s: the watch never mattered
    assert max(b - a for a, b in zip(full, full[1:])) < 0.6
    pauses = [b - a for a, b in zip(opened, opened[1:])]
    assert 3 <= len(opened) <= 5 and pauses == sorted(pauses) and pauses[-1] > 1.5 * pauses[0]  # 0.5, 1, 2 s
    assert set(errors) == {"things"} and ctl.last_error is None


def test_watches_wake_it_early_with_everything_or_with_keys():
    step, plain, keyed = Recorder(), Stream(), Stream()
    ctl = loop.Loop(step, resync=30, name="cnlab-test-loop",
                    watches=[loop.Watch("plain", lambda: plain),
                             loop.Watch("keyed", lambda: keyed, key=lambda e: e.get("name"))]).start()
    try:
        until(lambda: len(step.passes) == 1, 2, "the first pass")
        began = time.monotonic()
        plain.events.put("changed")
        until(lambda: len(step.passes) == 2, 2, "a pass woken by the plain watch")
        keyed.events.put({"name": "a"})
        keyed.events.put({"other": "no key: nothing to do"})
        until(lambda: len(step.passes) == 3, 2, "a pass woken by the keyed watch")
        assert time.monotonic() - began < 1  # woken, not by the 30 s resync
        assert [keys for _, keys in step.passes] == [None, None, frozenset({"a"})]
    finally:
        ctl.stop()
    assert plain.closed and keyed.closed and not ctl.running  # stop() closed the blocked streams


def test_a_failing_pass_is_retried_soon_and_its_error_kept_until_one_succeeds():
    step, errors = Recorder(fail=2), []
    ctl = loop.Loop(step, resync=30, retry=0.2, name="cnlab-test-loop",
                    on_error=lambda where, e: errors.append((where, str(e)))).start()
    try:
        until(lambda: len(step.passes) >= 2, 2, "a second try")
        assert isinstance(ctl.last_error, OSError)
        until(lambda: len(step.passes) == 3, 2, "a third try")
        until(lambda: ctl.last_error is None, 2, "the error cleared")
    finally:
        ctl.stop()
    assert errors == [("pass", "etcd is away")] * 2
    assert [keys for _, keys in step.passes] == [None] * 3
    assert 0.15 < step.passes[1][0] - step.passes[0][0] < 1


def test_delayed_wakes_and_restarts():
    step = Recorder()
    ctl = loop.Loop(step, resync=30, name="cnlab-test-loop").start()
    try:
        until(lambda: len(step.passes) == 1, 2, "the first pass")
        ctl.wake("b", after=0.3)
        ctl.wake("b", after=5)  # the earlier one wins
        until(lambda: len(step.passes) == 2, 2, "the delayed key")
        assert step.passes[1][1] == frozenset({"b"}) and step.passes[1][0] - step.passes[0][0] >= 0.3
    finally:
        ctl.stop()
    assert not ctl.running
    ctl.start()  # a stopped loop starts again with a full pass
    try:
        until(lambda: len(step.passes) == 3, 2, "the pass of a restarted loop")
        assert step.passes[2][1] is None
    finally:
        ctl.stop()


def test_runs_is_the_running_start_stop_and_with_of_every_controller():
    class Controller(loop.Runs):
        stop_timeout = 2.0

        def __init__(self):
            self._loop = loop.Loop(Recorder(), resync=0.05, name="cnlab-test-runs")
    ctl = Controller()
    assert not ctl.running and ctl.start() is ctl and ctl.running
    assert ctl.stop() is None and not ctl.running
    with Controller() as ctl:
        assert ctl.running
    assert not ctl.running


def test_until_backs_off_and_can_word_its_own_timeout():
    calls = {"plain": 0, "backoff": 0}

    def never(kind):
        calls[kind] += 1
        return False
    for kind, backoff in (("plain", None), ("backoff", 0.08)):
        with pytest.raises(LabTimeout, match="nothing: not within 0.5 s"):
            until(lambda: never(kind), 0.5, "nothing", interval=0.01, backoff=backoff)
    assert calls["plain"] >= 25 and calls["backoff"] <= 15, calls   # 0.01, 0.02, 0.04, 0.08, 0.08 ...
    with pytest.raises(LookupError, match="^said my way$"):
        until(lambda: False, 0, "x", error=lambda: LookupError("said my way"))
