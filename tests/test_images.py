"""helpers.images: offline builds, layers, containers with limits, and the typed errors.

The shared Docker engine is never stopped (other work uses it): "the engine stops" is tested on
a private dockerd that the test starts and stops; "the engine is not running" by pointing the
client at a socket where nothing listens, and "the engine does not answer" at a socket that
accepts connections and never replies.
"""
import contextlib
import shutil
import socket
import threading

import pytest

from helpers import engine, images, resources
from helpers._core import daemon
from helpers.errors import BadInput, LabError, LabTimeout

NOWHERE = "unix:///run/cnlab/nothing.sock"
WEB = "cnlab/test-web:1"
DOCKERFILE = """FROM {base}
COPY index.html /www/index.html
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


# --- bad input, refused before Docker is called ------------------------------------------------

@pytest.mark.parametrize("text, size", [("64m", 64 << 20), ("64M", 64 << 20), ("1g", 1 << 30),
                                        ("6144k", 6 << 20), ("7340032", 7 << 20),
                                        ("7340032b", 7 << 20), (10 << 20, 10 << 20)])
def test_memory_strings_are_docker_s_forms(text, size):
    assert images.parse_memory(text) == size


@pytest.mark.parametrize("text", ["64x", "1.5g", "64mb", "64 m", "-1", "", "m", None, True, 5.5,
                                  "1t"])
def test_bad_memory_strings_say_the_accepted_forms(text):
    with pytest.raises(BadInput, match="'64m', '1g'"):
        images.parse_memory(text)


@pytest.mark.parametrize("text", ["5m", 1024, "0"])
def test_memory_below_docker_s_minimum_is_refused(text):
    with pytest.raises(BadInput, match="6 MiB|not a size"):
        images.parse_memory(text)


@pytest.mark.parametrize("limits, word", [({"memory": "lots"}, "memory"), ({"cpus": 0}, "cpus"),
                                          ({"cpus": 0.001}, "0.01"), ({"cpus": 1000}, "0.01"),
                                          ({"pids": 0}, "pids"), ({"pids": "ten"}, "pids")])
def test_bad_limits_fail_before_docker_is_asked(monkeypatch, limits, word):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)          # no engine: BadInput must come first
    with pytest.raises(BadInput, match=word):
        images.run("cnlab/busybox:latest", **limits)


@pytest.mark.parametrize("ref", ["web", "busybox:latest", "cnlab/Web:1", "cnlab/web", "other/web:1"])
def test_only_course_image_names_are_built(ref):
    with pytest.raises(BadInput, match="course image name"):
        images.build(ref, "FROM scratch\n")


# --- the engine is not there, or does not answer ---------------------------------------------

def test_no_engine_is_engine_unavailable_saying_how_to_start_it():
    with pytest.raises(images.EngineUnavailable, match="nothing.sock.*start it with `sudo dockerd"):
        images.client(base_url=NOWHERE)


def test_docker_host_is_honoured_everywhere(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    for call in (images.client, images.busybox, lambda: images.layers("cnlab/busybox:latest")):
        with pytest.raises(images.EngineUnavailable):
            call()
    engine.sweep()                                      # nothing to sweep where there is no engine


@pytest.fixture
def silent_engine(tmp_path):
    """A unix socket that accepts connections and never answers: a hung dockerd."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"unix://{path}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_an_engine_that_does_not_answer_is_a_lab_timeout(silent_engine):
    import requests
    with pytest.raises(LabTimeout, match="did not answer within 1 s") as caught:
        images.client(timeout=1, base_url=silent_engine)
    assert isinstance(caught.value, images.EngineUnavailable)       # callers checking for an engine
    assert not isinstance(caught.value, requests.exceptions.RequestException)


def private_engine(where) -> daemon.Daemon:
    """A dockerd of its own (no bridge, no iptables) with its files in ``where``, in network and
    mount namespaces of its own (on the host's, its start would delete docker0), run as the course
    runs every daemon: it dies with the process that started it (test_daemons kills one so)."""
    url = f"unix://{where}/docker.sock"

    def answers():
        with contextlib.suppress(images.EngineUnavailable):
            images.client(timeout=2, base_url=url).close()
            return url
    engine = daemon.Daemon(
        ["unshare", "--net", "--mount", "--propagation", "private", "dockerd", "--host", url,
         "--data-root", f"{where}/data", "--exec-root", f"{where}/exec", "--pidfile", f"{where}/docker.pid",
         "--bridge", "none", "--iptables=false", "--ip-masq=false"],
        log=where / "dockerd.log", what="the private dockerd")
    return engine.start(answers, timeout=30)


@pytest.fixture
def private():
    where = resources.state_dir("docker-test")
    try:
        engine = private_engine(where)
        try:
            yield f"unix://{where}/docker.sock", engine
        finally:
            engine.stop(timeout=30)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.requires("root", "docker")
def test_an_engine_that_stops_is_engine_unavailable_saying_how_to_start_it(private, monkeypatch):
    url, engine = private
    with contextlib.closing(images.client(base_url=url)) as client:
        assert client.version()["Version"]
    engine.stop(timeout=30)
    assert not engine.running
    with pytest.raises(images.EngineUnavailable, match="start it with `sudo dockerd"):
        images.client(base_url=url)
    monkeypatch.setenv("DOCKER_HOST", url)
    with pytest.raises(images.EngineUnavailable):
        images.busybox()


# --- for real ---------------------------------------------------------------------------------

@pytest.mark.requires("docker")
def test_missing_images_are_image_missing_saying_how_to_build_them():
    with pytest.raises(images.ImageMissing, match=r"cnlab/nothing:1 .*images\.build\("):
        images.run("cnlab/nothing:1")
    with pytest.raises(images.ImageMissing, match=r"cnlab/nothing:1"):
        images.build(WEB, "FROM cnlab/nothing:1\n")
    with pytest.raises(images.ImageMissing, match=r"images\.busybox\(\)"):
        images.layers("cnlab/busybox:no-such-tag")


@pytest.mark.requires("docker")
def test_an_offline_build_and_its_layers():
    base = images.busybox()
    ref = images.build(WEB, DOCKERFILE.format(base=base), {"index.html": "hello\n"})
    try:
        steps = images.layers(ref)
        base_steps = images.layers(base)
        assert steps[:len(base_steps)] == base_steps                  # the base's layers, shared
        copy, cmd, label = steps[len(base_steps):]
        assert "COPY" in copy.created_by and copy.diff_id.startswith("sha256:") and copy.size == 6
        assert "CMD" in cmd.created_by and cmd.diff_id is None and cmd.size == 0
        assert "LABEL cnlab=images" in label.created_by and label.diff_id is None
        with contextlib.closing(images.client()) as c:
            assert c.images.get(ref).attrs["RootFS"]["Layers"] == [s.diff_id for s in steps if s.diff_id]
    finally:
        images.remove_image(ref)
    with pytest.raises(images.ImageMissing):
        images.layers(ref)
    images.remove_image(ref)                                           # already gone is fine


@pytest.mark.requires("docker")
def test_a_container_is_namespaces_and_cgroups_seen_from_the_host():
    with images.run(images.busybox(), ["sleep", "60"], name="test-limits", memory="64m", cpus=0.5,
                    pids=20) as box:
        view = images.host_view(box)
        assert view.pid == box.pid > 1
        assert {"uts", "pid", "mnt", "net", "ipc"} <= set(view.isolated())
        assert "user" not in view.isolated()                           # Docker's default
        assert (view.memory, view.cpus, view.pids) == (64 << 20, 0.5, 20)
        assert all(box.docker.id in str(folder) for folder in view.cgroups.values())
        code, output = box.exec(["sh", "-c", "for i in $(seq 30); do sleep 1 & done; wait"])
        assert "can't fork" in output                                  # the pids limit bites
    with contextlib.closing(images.client()) as c:
        assert not c.containers.list(all=True, filters={"name": "cnlab-test-limits"})


@pytest.mark.requires("docker")
def test_waiting_too_long_is_a_lab_timeout_not_a_read_timeout():
    with images.run(images.busybox(), ["sleep", "60"], name="test-wait") as box:
        with pytest.raises(LabTimeout, match="waiting for cnlab-test-wait"):
            box.wait(timeout=1)
        box.docker.kill()
        assert box.wait() == 137                                       # SIGKILLed


@pytest.mark.requires("docker")
def test_docker_s_own_refusals_are_lab_errors():
    with images.run(images.busybox(), ["sleep", "60"], name="test-twice"):
        with pytest.raises(LabError, match="already in use"):
            images.run(images.busybox(), ["sleep", "60"], name="test-twice")
