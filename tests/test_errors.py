"""helpers.errors: every LabError subclass in the package survives the trip a forked child's
error makes (pickle), with its type, text, fix and attributes, whatever its __init__ takes."""
import inspect
import pickle

import pytest

import helpers
from helpers import errors
from helpers._core import owners


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _classes():
    owners._import_all()   # every module of the package, so every subclass is defined
    return sorted(set(_all_subclasses(errors.LabError)) | {errors.LabError},
                  key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _instance(cls):
    """One instance built through the class's own __init__, with sample arguments."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is p.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for sample in ("sample", 7, 1.5):
        try:
            return cls(*[sample] * len(params))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            continue
    pytest.fail(f"{cls.__qualname__} cannot be built with sample arguments: add a case here")


CLASSES = _classes()


def test_the_tree_is_found_and_shared():
    names = {c.__name__ for c in CLASSES}
    assert len(CLASSES) > 40 and {"EngineTimeout", "UnknownKind", "NeedsRoot", "MissingTool"} <= names
    # one name per idea: "not reachable" and "not found" share a base whichever module raises them
    assert issubclass(helpers.images.EngineUnavailable, errors.Unavailable)
    assert issubclass(helpers.cri.RuntimeUnavailable, errors.Unavailable)
    assert issubclass(helpers.etcd.Unreachable, errors.Unavailable)
    assert issubclass(helpers.cluster.NoCluster, errors.Unavailable)
    assert issubclass(helpers.cluster.NotFound, errors.NotFound)
    assert issubclass(helpers.cri.NotFound, errors.NotFound)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__.removeprefix('helpers.')}.{c.__qualname__}")
def test_round_trip(cls):
    error = _instance(cls)
    error.extra = {"seen": [1, 2]}          # state set after __init__ travels too
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error) and back.args == error.args
    assert (back.message, back.fix) == (error.message, error.fix)
    assert back.__dict__ == error.__dict__


@pytest.mark.requires("root")
def test_an_error_raised_in_a_child_arrives_as_it_was_raised():
    with pytest.raises(errors.NeedsRoot) as caught:
        helpers.ns.run(_raise_needs_root, new=["uts"])
    assert str(caught.value) == str(errors.NeedsRoot("mounting"))


def _raise_needs_root():
    raise errors.NeedsRoot("mounting")
