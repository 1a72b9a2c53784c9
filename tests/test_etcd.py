"""helpers.etcd: a real etcd on loopback, its v3 API, and what survives a crash."""
import os
import time

import pytest

import helpers
from helpers import etcd
from helpers._core import names, procfs
from helpers.errors import BadInput, LabTimeout, MissingTool


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- pure logic, no etcd needed

@pytest.mark.parametrize("prefix, end", [("/registry/pods/", b"/registry/pods0"), ("a", b"b"), ("", b"\0")])
def test_prefix_end_is_the_first_key_after_the_prefix(prefix, end):
    assert etcd._prefix_end(prefix) == end


def test_bad_input_fails_before_anything_is_created():
    with pytest.raises(BadInput):
        etcd.Server("Not OK!")
    db = etcd.Client("http://127.0.0.1:9")
    with pytest.raises(BadInput):
        db.cas("/k", "v")  # neither mod_revision nor prev_value
    with pytest.raises(BadInput):
        db.lease(0)


def _fake_etcd(path, version):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'etcd Version: {version}'\necho 'Go Version: go1.26'\n")
    path.chmod(0o755)
    return path


def test_the_cached_etcd_comes_first_and_the_fallback_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(etcd, "HOME", tmp_path / "cache")
    monkeypatch.setattr(etcd, "CURRENT", tmp_path / "cache" / "CURRENT")
    system = _fake_etcd(tmp_path / "bin" / "etcd", "3.4.23")
    monkeypatch.setattr(etcd.shutil, "which", lambda name: str(system) if name == "etcd" else None)
    fallback = etcd.binary()
    assert (fallback.path, fallback.version) == (system, (3, 4, 23))
    assert f"no Debian unstable etcd in {tmp_path / 'cache'}" in str(fallback)
    cached = _fake_etcd(tmp_path / "cache" / "3.5.30-2" / etcd.BINARY, "3.5.30")
    assert etcd.binary().path == system           # not current yet: an unpacking in progress
    etcd.CURRENT.write_text("3.5.30-2\n")
    chosen = etcd.binary()
    assert (chosen.path, chosen.version) == (cached, (3, 5, 30))
    assert str(chosen) == "etcd 3.5.30 (Debian unstable's etcd-server 3.5.30-2, from the cache)"


def test_missing_etcd_is_a_missing_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(etcd.shutil, "which", lambda name: None)
    monkeypatch.setattr(etcd, "CURRENT", tmp_path / "CURRENT")   # and no cached one
    server = etcd.Server("missing")
    with pytest.raises(MissingTool, match="apt-get install etcd-server"):
        server.start()
    assert not server.dir.exists()


def test_nobody_listening_is_unreachable():
    with pytest.raises(etcd.Unreachable, match="no etcd answers"):
        etcd.Client("http://127.0.0.1:9", timeout=1).get("/k")


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server():
    with etcd.Server("test") as s:
        yield s
    assert not s.dir.exists() and not s.running


@pytest.fixture
def db(server):
    client = server.client()
    client.delete("/", prefix=True)
    return client


@pytest.mark.requires("etcd")
def test_put_get_prefix_delete(db):
    first = db.put("/registry/pods/default/web-1", "a")
    second = db.put("/registry/pods/default/web-0", b"\x00binary")
    db.put("/registry/pods/kube-system/dns", "c")
    assert second == first + 1  # every write is one revision of the whole store
    kv = db.get("/registry/pods/default/web-1")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"a", first, first, 1)
    assert db.get("/registry/pods/default/nope") is None
    listed = db.get_prefix("/registry/pods/default/")
    assert [kv.key for kv in listed] == ["/registry/pods/default/web-0", "/registry/pods/default/web-1"]
    assert listed[0].value == b"\x00binary"
    db.put("/registry/pods/default/web-1", "a2")
    assert db.get("/registry/pods/default/web-1").version == 2
    assert db.get("/registry/pods/default/web-1", revision=first).value == b"a"  # the past, still there
    assert db.delete("/registry/pods/", prefix=True) == 3
    assert db.get_prefix("/registry/") == []


@pytest.mark.requires("etcd")
def test_watch_sees_changes_and_resumes_from_a_revision(db):
    with db.watch("/jobs/", prefix=True) as watch:
        start = watch.revision
        db.put("/jobs/a", "1")
        db.put("/other", "not watched")
        db.delete("/jobs/a")
        events = list(watch.events(timeout=5, count=2))
    assert [(e.type, e.key, e.value) for e in events] == [("PUT", "/jobs/a", b"1"),
                                                          ("DELETE", "/jobs/a", b"")]
    assert events[1].mod_revision == start + 3
    with db.watch("/jobs/", prefix=True, start_revision=start + 1) as replay:  # a reconnect
        assert [e.type for e in replay.events(timeout=5, count=2)] == ["PUT", "DELETE"]


@pytest.mark.requires("etcd")
def test_watch_times_out_quietly_and_ends_on_close(db):
    watch = db.watch("/quiet")
    began = time.monotonic()
    assert list(watch.events(timeout=0.3)) == []
    assert 0.25 < time.monotonic() - began < 2
    watch.close()
    assert watch.get(1) is None and list(watch) == []


@pytest.mark.requires("etcd")
def test_watch_from_compacted_history_says_so(db):
    old = db.put("/c", "1")
    db.put("/c", "2")
    db.call("kv/compaction", {"revision": db.revision()})
    with pytest.raises(etcd.Compacted) as e:
        with db.watch("/c", start_revision=old) as watch:
            watch.get(5)
    assert e.value.compact_revision > old


@pytest.mark.requires("etcd")
def test_lease_keeps_keys_alive_then_expires_them(db):
    lease = db.lease(2)
    db.put("/leader", "me", lease=lease)
    assert lease.keys() == ["/leader"] and db.get("/leader").lease == lease.id
    with db.watch("/leader") as watch:
        for _ in range(3):  # 3 s of keepalives outlive the 2 s TTL
            time.sleep(1)
            assert lease.keepalive() == 2
        assert db.get("/leader") is not None
        expired = watch.get(10)  # now nobody keeps it alive
    assert (expired.type, expired.key) == ("DELETE", "/leader")
    assert db.get("/leader") is None and lease.remaining() == -1 and lease.keepalive() == 0


@pytest.mark.requires("etcd")
def test_revoke_deletes_attached_keys_at_once(db):
    lease = db.lease(60)
    db.put("/session/a", "1", lease=lease)
    db.put("/session/b", "2", lease=lease.id)
    lease.revoke()
    assert db.get_prefix("/session/") == []


@pytest.mark.requires("etcd")
def test_compare_and_swap_has_one_winner(db):
    db.put("/counter", "0")
    alice, bob = db.get("/counter"), db.get("/counter")  # both read revision r
    won = db.cas("/counter", "alice", mod_revision=alice.mod_revision)
    lost = db.cas("/counter", "bob", mod_revision=bob.mod_revision)
    assert won.succeeded and won.current is None
    assert not lost.succeeded and lost.current.value == b"alice" and lost.revision == won.revision
    assert db.cas("/counter", "carol", prev_value="alice").succeeded
    assert not db.cas("/counter", "dave", mod_revision=0).succeeded  # 0: "only if absent"
    assert db.cas("/new", "x", mod_revision=0).succeeded
    assert db.get("/counter").value == b"carol"


@pytest.mark.requires("etcd")
def test_kill_9_keeps_every_acknowledged_write():
    with etcd.Server("crash") as server:
        db = server.client()
        acknowledged = {f"/registry/configmaps/default/cm-{i:03}": f"value {i}" for i in range(200)}
        for key, value in acknowledged.items():
            db.put(key, value)  # returned: etcd has it in its write-ahead log, fsynced
        last = db.revision()
        pid = server.pid
        server.kill()
        assert not _alive(pid)
        with pytest.raises(etcd.Unreachable):
            db.get("/registry/configmaps/default/cm-000")
        server.start()
        assert server.pid != pid
        back = {kv.key: kv.value.decode() for kv in db.get_prefix("/registry/configmaps/")}
        assert back == acknowledged and db.revision() == last
    assert not server.dir.exists()


def _gone(server, state_existed):
    """Nothing of a server whose start failed is left: no process, no folder it made."""
    assert not server.running and server.pid is None
    assert list(procfs.processes(lambda p: server.name in p.line)) == []
    assert not server.dir.exists()
    assert (names.STATE / "etcd").exists() == state_existed


@pytest.mark.requires("etcd")
def test_a_server_that_never_becomes_healthy_times_out_and_leaves_nothing(monkeypatch):
    existed = (names.STATE / "etcd").exists()
    monkeypatch.setattr(etcd.Server, "_healthy", lambda self: False)
    server = etcd.Server("never", timeout=1)
    began = time.monotonic()
    with pytest.raises(LabTimeout, match=r"to become ready: not within 1 s") as e:
        server.start()
    assert time.monotonic() - began < 10
    assert "etcd" in str(e.value) and server._daemon.process.returncode == -9   # killed, reaped
    _gone(server, existed)


@pytest.mark.requires("etcd")
def test_a_server_that_exits_at_once_fails_with_its_log_and_leaves_nothing():
    existed = (names.STATE / "etcd").exists()
    server = etcd.Server("badflag")
    server.client_url = "http://127.0.0.1:99999"     # no such port: etcd refuses its flags
    with pytest.raises(etcd.EtcdError, match=r"exited with status [1-9]") as e:
        server.start()
    assert "invalid port" in str(e.value) and not isinstance(e.value, LabTimeout)   # its log
    _gone(server, existed)


@pytest.mark.requires("etcd")
def test_a_server_runs_the_etcd_that_binary_chooses(server):
    chosen = etcd.binary()
    assert server.binary == chosen
    assert os.path.realpath(f"/proc/{server.pid}/exe") == os.path.realpath(chosen.path)
    if etcd.cached() is not None:   # the cache holds Debian unstable's: then it is that one
        assert chosen.path == etcd.cached() and chosen.version >= (3, 5, 13)


@pytest.mark.requires("etcd")
def test_a_taken_port_fails_with_the_log():
    with etcd.Server("first") as first:
        second = etcd.Server("second")
        second.client_url = first.client_url
        with pytest.raises(etcd.EtcdError, match="address already in use"):
            second.start()
        assert not second.running
        second.remove()
        assert first.client().put("/still", "fine")


@pytest.mark.requires("etcd")
def test_a_watch_says_where_to_resume_when_etcd_goes_away():
    with etcd.Server("resume") as server:
        db = server.client()
        watch = db.watch("/k")
        db.put("/k", "1")
        assert watch.get(5).value == b"1"
        server.kill()
        with pytest.raises(etcd.EtcdError, match=f"start_revision={watch.last_revision + 1}"):
            watch.get(5)
        server.start()
        db.put("/k", "2")  # written while nobody watched
        with db.watch("/k", start_revision=watch.last_revision + 1) as resumed:
            assert resumed.get(5).value == b"2"
        watch.close()


@pytest.mark.requires("etcd")
def test_keep_and_sweep():
    server = etcd.Server("kept", keep=True)
    with server:
        server.client().put("/k", "v")
    assert server.dir.exists() and not server.running
    server.start()  # a stray server, as after a crashed notebook
    assert server.client().get("/k").value == b"v"
    assert any(server.name in item for item in helpers.leftovers())
    etcd.sweep()
    server.kill()                   # reaps what the sweep killed
    assert not server.running and not server.dir.exists()
    assert not any(server.name in item for item in helpers.leftovers())
