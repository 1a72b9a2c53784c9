"""The course's pytest plugin: requirements become visible skips, and nothing may leak.

- ``@pytest.mark.requires("root", "docker")`` on a test, or ``{"cnlab": {"requires": [...]}}``
  in a notebook's metadata, is checked against ``helpers.doctor``; what this machine lacks is
  skipped with the reason, and the run ends with the list of what was skipped and why.
- A test that declares requirements must not leave any ``cnlab`` resource behind; the whole
  run must not either (that covers the notebooks). What leaked is reported, then swept, unless
  CNLAB_SWEEP_LEAKS=0 (for a machine where someone else's run is alive at the same time).
"""
import os

import pytest

import helpers
from helpers import doctor, labs
from helpers._core import owners


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*names): skip unless this machine has each named "
                                       "capability (see helpers.doctor.REQUIREMENTS)")


def _requirements(item):
    if item.path.suffix == ".ipynb":
        return labs.load(item.path).requires
    return tuple(name for mark in item.iter_markers("requires") for name in mark.args)


def pytest_collectstart(collector):
    """A notebook that only a real cluster can run is committed without outputs and checked in
    nbval's lax mode: only cells marked NBVAL_CHECK_OUTPUT are compared."""
    if collector.path.suffix == ".ipynb" and hasattr(collector, "compare_outputs"):
        if labs.load(collector.path).nbval == "lax":
            collector.compare_outputs = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = _requirements(item)
        why = doctor.unmet(needs) if needs else []
        if why:
            item.add_marker(pytest.mark.skip(reason="needs " + ", ".join(needs) + ": " + "; ".join(why)))


SWEEP = os.environ.get("CNLAB_SWEEP_LEAKS", "1") != "0"


def _sweep():
    if SWEEP:
        held = owners.journal(False)   # the plugin's own sweep is no fixture's
        helpers.cleanup()
        if held:
            owners.journal(True).extend(held)


@pytest.fixture(autouse=True)
def _no_leaks(request):
    """A test that touches the machine must give back everything it took, even when it fails."""
    if not _requirements(request.node) or request.node.path.suffix == ".ipynb":
        yield
        return
    before = set(helpers.leftovers())
    yield
    # files under STATE may belong to a module's fixture (a server's folder): the run's check has them
    leaked = [item for item in helpers.leftovers() if item not in before and not item.startswith("state ")]
    if leaked:
        _sweep()
        pytest.fail("left behind: " + "; ".join(leaked), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A fixture's teardown that sweeps (``etcd.sweep()`` as a safety net) hides a leak from the
    check above: what such a sweep removed fails the test whose teardown it ran in."""
    if not _requirements(item) or item.path.suffix == ".ipynb":
        return (yield)
    owners.journal(True)
    try:
        result = yield
    finally:
        swept = owners.journal(False)
    if swept:
        pytest.fail("left behind, and swept by a fixture: " + "; ".join(swept), pytrace=False)
    return result


def pytest_sessionstart(session):
    """What an earlier, crashed run left is swept first, so that this run starts clean."""
    found = helpers.leftovers()
    if found and SWEEP:
        print("\nswept before the run (left by an earlier one): " + "; ".join(found))
        _sweep()
        found = helpers.leftovers()
    session.config._cnlab_before = set(found)


def pytest_sessionfinish(session, exitstatus):
    leaked = [i for i in helpers.leftovers() if i not in session.config._cnlab_before]
    session.config._cnlab_leaked = leaked
    if leaked:
        _sweep()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = {}
    for report in terminalreporter.stats.get("skipped", []):
        path, _, name = report.nodeid.partition("::")
        reason = report.longrepr[2].removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else ""
        key = path if path.endswith(".ipynb") else report.nodeid
        skipped.setdefault(key, reason)
    tw = terminalreporter
    if skipped:
        tw.section("skipped on this machine, and why")
        notebooks = {k: v for k, v in skipped.items() if k.endswith(".ipynb")}
        for title, group in (("notebooks", notebooks),
                             ("tests", {k: v for k, v in skipped.items() if k not in notebooks})):
            if group:
                tw.write_line(f"{title} ({len(group)}):")
                for key, reason in sorted(group.items()):
                    tw.write_line(f"  {key}: {reason}")
    else:
        tw.section("nothing was skipped: this machine ran every test and notebook")
    guest = getattr(config, "_cnlab_v2guest", None)     # tests/test_v2guest.py's result
    if guest:
        tw.section("the cgroup v2 path, run for real in a v2-only guest")
        tw.write_line(guest)
    leaked = getattr(config, "_cnlab_leaked", [])
    if leaked:
        tw.section("LEAKED: the run left these behind", red=True)
        for item in leaked:
            tw.write_line(f"  {item}")
