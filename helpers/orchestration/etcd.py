"""A real etcd on loopback, and a small client for its v3 API.

``Server`` runs etcd as a one-member cluster on two free loopback ports, with its data under
``STATE/etcd/cnlab-etcd-<name>``. The etcd is Debian unstable's ``etcd-server`` 3.5, which
``python -m helpers apiserver build`` unpacks into the cache (Kubernetes 1.36 needs 3.5.13 or
later); where it has not, this machine's ``etcd`` (Debian bookworm's is 3.4), and ``binary()``
says which and why::

    with etcd.Server() as server:
        db = server.client()
        db.put("/registry/pods/default/web", "{}")
        db.get_prefix("/registry/pods/")

``Client`` speaks etcd's v3 API through the JSON gateway that etcd itself serves on its client
port (``POST /v3/kv/range`` and friends, keys and values base64-encoded). It is the same API,
field for field, that Kubernetes' API server uses over gRPC. It is written here on the
standard library, rather than taken from PyPI, because:
- ``etcd3`` is unmaintained (last release 2020) and its generated code breaks with today's
  protobuf;
- ``aetcd`` is asyncio + gRPC: awkward in a notebook and in the controller's thread;
- ``etcd3gw`` (OpenStack, maintained) speaks this same gateway, but (as of 2.7.0) its watch
  cannot be waited on with a timeout, and it drops the server's "compacted" answer and a lost
  connection silently: the iterator just blocks. Those are what a lab about watches must show.

Used in: 32-etcd, 33-controller, book/orchestration/orchestration.
"""
import base64
import contextlib
import http.client
import json
import queue
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers._core import daemon, names, owners, wait
from helpers import errors
from helpers.errors import BadInput, LabError, MissingTool


class EtcdError(LabError):
    """etcd answered with an error (the message is etcd's own)."""


class Unreachable(EtcdError, errors.Unavailable):
    def __init__(self, url):
        super().__init__(f"no etcd answers at {url}",
                         fix="start one with `with helpers.etcd.Server() as server:` (is it stopped?)")


class Compacted(EtcdError):
    """A watch asked for history that etcd has already compacted away (Kubernetes' 410 Gone)."""

    def __init__(self, revision):
        self.compact_revision = revision
        super().__init__(f"revisions before {revision} were compacted",
                         fix="list again, then watch from the revision that list returned")


# ---------------------------------------------------------------------------------- binary

HOME = names.CACHE / "etcd"       # <Debian version>/usr/bin/etcd, unpacked by the API server's build
CURRENT = HOME / "CURRENT"        # the version in use, written once it is complete
BINARY = Path("usr/bin/etcd")     # where the package puts it


@dataclass(frozen=True)
class Binary:
    """The etcd program a Server runs, its version, and where it comes from (and why that one)."""
    path: Path
    version: tuple[int, ...]
    origin: str

    def __str__(self):
        return f"etcd {'.'.join(map(str, self.version))} ({self.origin})"


def version(path) -> tuple[int, ...]:
    """What ``etcd --version`` says, as numbers: ``(3, 5, 30)``."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        raise EtcdError(f"{path} does not run: {e}", fix=f"rm -rf {HOME} and fetch it again") from e
    found = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out.stdout)
    if found is None:
        raise EtcdError(f"{path} --version printed no version: {(out.stdout + out.stderr)[-200:]}",
                        fix=f"rm -rf {HOME} and fetch it again")
    return tuple(map(int, found.groups()))


def cached() -> Path | None:
    """The etcd unpacked in the cache, or None."""
    try:
        path = HOME / CURRENT.read_text().strip() / BINARY
    except OSError:
        return None
    return path if path.is_file() else None


def binary() -> Binary:
    """The etcd to run: Debian unstable's from the cache, else this machine's, saying why."""
    path = cached()
    if path is not None:
        return Binary(path, version(path), f"Debian unstable's etcd-server {path.parents[2].name}, "
                                           f"from the cache")
    system = shutil.which("etcd")
    if system is None:
        raise MissingTool("etcd", package="etcd-server")
    return Binary(Path(system), version(system), f"this machine's {system}: no Debian unstable "
                                                 f"etcd in {HOME}")


# ---------------------------------------------------------------------------------- server

class Server:
    """One etcd process: ``start()``, ``stop()``, ``kill()`` (SIGKILL), ``restart()``, ``remove()``.

    The process carries ``--name cnlab-etcd-<name>`` so that ``ps`` and ``sweep()`` recognise it.
    Leaving the ``with`` block stops it and removes its data unless ``keep=True``.
    """

    def __init__(self, name=None, *, keep=False, timeout=30.0):
        name = name or secrets.token_hex(3)
        self.name = names.name("etcd", names.check(name, "etcd server name", most=41))
        self.dir = names.STATE / "etcd" / self.name
        self.keep = keep
        self.timeout = timeout
        self.client_url = f"http://127.0.0.1:{names.free_port()}"
        self.peer_url = f"http://127.0.0.1:{names.free_port()}"
        self._daemon: daemon.Daemon | None = None
        self.binary: Binary | None = None    # which etcd runs, once started

    @property
    def data_dir(self):
        return self.dir / "data"

    @property
    def log(self):
        return self.dir / "etcd.log"

    @property
    def pid(self):
        return self._daemon.pid if self.running else None

    @property
    def running(self):
        return self._daemon is not None and self._daemon.running

    def start(self):
        """Start (again, on the same data); ``EtcdError`` or ``LabTimeout`` with its log if it
        does not become healthy, and then nothing it made is left (its data, if it had some)."""
        if self.running:
            return self
        self.binary = binary()
        made_parent, made_dir = not self.dir.parent.exists(), not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [self.binary.path, "--name", self.name, "--data-dir", str(self.data_dir),
                   "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                   "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                   "--initial-cluster", f"{self.name}={self.peer_url}",
                   "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr"]
        self._daemon = daemon.Daemon(command, log=self.log, what=str(self.binary), error=EtcdError)
        try:
            self._daemon.start(self._healthy, timeout=self.timeout,
                               fix="read the log above; is the port taken or the data dir damaged?")
        except BaseException:             # the daemon is dead: what this start made goes too
            if made_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            if made_parent:
                with contextlib.suppress(OSError):    # another server's since: leave it
                    self.dir.parent.rmdir()
            raise
        return self

    def _healthy(self):
        with contextlib.suppress(OSError, ValueError, EtcdError):
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as r:
                healthy = json.load(r).get("health") == "true"
            # ... and it is this etcd that answers, not another one on the same port
            members = Client(self.client_url, timeout=1).call("cluster/member/list", {})["members"]
            return healthy and [m.get("name") for m in members] == [self.name]
        return False

    def log_tail(self, lines=15):
        return self._daemon.log_tail(lines) if self._daemon else "(no log)"

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL if etcd has not exited within ``timeout`` seconds."""
        if self._daemon:
            self._daemon.stop(timeout)
        return self

    def kill(self):
        """SIGKILL: a crash. Every write etcd acknowledged is already on disk (its WAL)."""
        if self._daemon:
            self._daemon.kill()
        return self

    def restart(self):
        """Start again on the same data dir and ports."""
        return self.stop().start()

    def remove(self):
        """Stop, then delete the data dir and log."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, timeout=5.0):
        return Client(self.client_url, timeout=timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if not self.keep:
            self.remove()

    def __repr__(self):
        return f"<etcd.Server {self.name} {self.client_url} {'running' if self.running else 'stopped'}>"


@owners.sweeper(owners.SERVERS + 5)
def sweep():
    """Kill every etcd the course started (``--name cnlab-...``) and remove their data dirs."""
    def ours(p):
        argv = p.argv
        return (Path(argv[0]).name == "etcd" and "--name" in argv[:-1]
                and argv[argv.index("--name") + 1].startswith(names.PREFIX))
    daemon.strays(ours, timeout=0)
    shutil.rmtree(names.STATE / "etcd", ignore_errors=True)


# ---------------------------------------------------------------------------------- client

def _b64(data):
    return base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode()


def _prefix_end(prefix):
    """The first key after every key that starts with ``prefix`` (etcd's ``range_end``)."""
    end = bytearray(prefix.encode())
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it. Revisions are etcd's logical clock (Kubernetes' resourceVersion)."""
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int     # how many times this key was written since it was created
    lease: int = 0

    @classmethod
    def _from(cls, kv):
        return cls(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")),
                   int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                   int(kv.get("version", 0)), int(kv.get("lease", 0)))


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: ``type`` is "PUT" or "DELETE"."""
    type: str
    key: str
    value: bytes
    mod_revision: int

    @classmethod
    def _from(cls, event):
        kv = KeyValue._from(event["kv"])
        return cls(event.get("type", "PUT"), kv.key, kv.value, kv.mod_revision)


@dataclass(frozen=True)
class Swap:
    """The outcome of a compare-and-swap. Losing is an answer, not an error: re-read and retry."""
    succeeded: bool
    revision: int            # the store's revision after the transaction
    current: KeyValue | None  # on failure: what the key holds now (None if it does not exist)


class Client:
    """put/get/delete, prefixes, watches, leases and compare-and-swap on etcd's v3 API.

    ``require_leader``: the member refuses at once ("etcdserver: no leader") when it has no
    Raft leader, instead of holding the request until its own timeout (etcdctl's
    ``--require-leader``, gRPC metadata ``hasleader``). It refuses serializable reads then too.
    """

    def __init__(self, url, *, timeout=5.0, require_leader=False):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.require_leader = require_leader

    def call(self, path, body):
        """POST one JSON request to the gateway (``/v3/<path>``) and return etcd's JSON answer."""
        headers = {"Content-Type": "application/json"}
        if self.require_leader:    # the JSON gateway passes Grpc-Metadata-* headers on as metadata
            headers["Grpc-Metadata-hasleader"] = "true"
        request = urllib.request.Request(f"{self.url}/v3/{path}", data=json.dumps(body).encode(),
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("message") or e.reason
            except ValueError:
                message = e.reason
            raise EtcdError(f"etcd refused {path}: {message}") from e
        except (urllib.error.URLError, OSError) as e:
            raise Unreachable(self.url) from e

    def revision(self):
        """The store's current revision: every write adds one."""
        return int(self.call("kv/range", {"key": _b64("\0"), "limit": 1})["header"]["revision"])

    def put(self, key, value, *, lease=None):
        """Write a key; return the revision of this write. Once it returns, the write is durable."""
        body = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = lease.id if isinstance(lease, Lease) else int(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def get(self, key, *, revision=None, serializable=False):
        """The key's KeyValue, or None. ``revision`` reads the past (until it is compacted).
        ``serializable``: answered from this member's own copy, without asking the leader
        whether it is current (fast, works without a quorum, possibly stale)."""
        found = self._range({"key": _b64(key), "serializable": serializable}, revision)
        return found[0] if found else None

    def get_prefix(self, prefix, *, revision=None, keys_only=False, serializable=False):
        """Every key under ``prefix``, sorted by key (the way Kubernetes lists a resource)."""
        return self._range({"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                            "keys_only": keys_only, "serializable": serializable}, revision)

    def _range(self, body, revision):
        if revision is not None:
            body["revision"] = int(revision)
        return [KeyValue._from(kv) for kv in self.call("kv/range", body).get("kvs", [])]

    def delete(self, key, *, prefix=False):
        """Delete a key (or every key under a prefix); return how many were deleted."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key))
        return int(self.call("kv/deleterange", body).get("deleted", 0))

    def cas(self, key, value, *, mod_revision=None, prev_value=None):
        """Write ``value`` only if the key is unchanged; one transaction, like Kubernetes' updates.

        ``mod_revision``: the key's mod_revision as you read it (0: "only if it does not exist").
        ``prev_value``: compare the value instead. On failure, ``Swap.current`` is the key now.
        """
        if (mod_revision is None) == (prev_value is None):
            raise BadInput("cas() compares exactly one thing: give mod_revision or prev_value")
        if mod_revision is not None:
            compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                       "mod_revision": int(mod_revision)}
        else:
            compare = {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(prev_value)}
        answer = self.call("kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        succeeded = bool(answer.get("succeeded", False))
        current = None
        if not succeeded:
            kvs = answer["responses"][0]["response_range"].get("kvs", [])
            current = KeyValue._from(kvs[0]) if kvs else None
        return Swap(succeeded, int(answer["header"]["revision"]), current)

    def lease(self, ttl):
        """Grant a lease: keys put with it are deleted when it expires (``ttl`` seconds unrefreshed)."""
        if int(ttl) < 1:
            raise BadInput(f"lease TTL {ttl!r}: give at least 1 second")
        answer = self.call("lease/grant", {"TTL": int(ttl)})
        return Lease(self, int(answer["ID"]), int(answer["TTL"]))

    def watch(self, key, *, prefix=False, start_revision=None):
        """Watch a key (or a prefix) from now, or replay history from ``start_revision``."""
        return Watch(self, key, prefix=prefix, start_revision=start_revision)

    def __repr__(self):
        return f"<etcd.Client {self.url}>"


class Lease:
    """A lease: the keys attached to it live as long as someone keeps it alive."""

    def __init__(self, client, id, ttl):
        self.client, self.id, self.ttl = client, id, ttl

    def keepalive(self):
        """Refresh the lease once; return its TTL again (0 if it has already expired)."""
        answer = self.client.call("lease/keepalive", {"ID": self.id})
        return int(answer.get("result", {}).get("TTL", 0))

    def remaining(self):
        """Seconds left before expiry; -1 once expired."""
        return int(self.client.call("lease/timetolive", {"ID": self.id}).get("TTL", -1))

    def keys(self):
        answer = self.client.call("lease/timetolive", {"ID": self.id, "keys": True})
        return sorted(base64.b64decode(k).decode() for k in answer.get("keys", []))

    def revoke(self):
        """End the lease now: its keys are deleted at once."""
        self.client.call("lease/revoke", {"ID": self.id})

    def __repr__(self):
        return f"<etcd.Lease ttl={self.ttl}>"


_CLOSED = object()  # what a closed watch's queue ends with


def _canceled(result):
    compacted = int(result.get("compact_revision", 0))
    return Compacted(compacted) if compacted else EtcdError(f"etcd canceled the watch: {result}")


class Watch:
    """A live stream of events. Iterate it with a time limit; close it (or use ``with``) when done.

    The watch is registered with etcd before the constructor returns: every change after that is
    seen. ``start_revision`` replays from that revision on (resume after a disconnect); etcd
    answers ``Compacted`` if that history is gone. A background thread reads the HTTP stream.
    """

    def __init__(self, client, key, *, prefix=False, start_revision=None):
        request = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(_prefix_end(key))
        if start_revision is not None:
            request["start_revision"] = int(start_revision)
        host, _, port = client.url.removeprefix("http://").partition(":")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=client.timeout)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.revision = None  # the store's revision when the watch started
        try:
            self._connection.request("POST", "/v3/watch", json.dumps({"create_request": request}),
                                     {"Content-Type": "application/json"})
            self._response = self._connection.getresponse()
            created = json.loads(self._response.readline())["result"]
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            self._connection.close()
            raise Unreachable(client.url) from e
        if created.get("canceled"):
            self._connection.close()
            raise _canceled(created)
        self.revision = int(created["header"]["revision"])
        # the revision of the last event read: after a break, watch again from the one after
        self.last_revision = self.revision if start_revision is None else int(start_revision) - 1
        self._connection.sock.settimeout(None)  # from now on the stream may be idle for long
        threading.Thread(target=self._read, name="cnlab-etcd-watch", daemon=True).start()

    def _read(self):
        try:
            while line := self._response.readline():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("canceled"):
                    raise _canceled(result)
                for event in result.get("events", []):
                    event = Event._from(event)
                    self.last_revision = event.mod_revision
                    self._queue.put(event)
            raise EtcdError("etcd ended the watch stream (did it stop?)",
                            fix=f"watch again with start_revision={self.last_revision + 1}: "
                                "nothing is missed")
        except EtcdError as e:  # handed to the reader of the queue, unless we closed on purpose
            if not self._closed:
                self._queue.put(e)
        except Exception as e:
            if not self._closed:
                self._queue.put(EtcdError(f"the watch stream broke: {e!r}",
                                          fix=f"watch again with start_revision={self.last_revision + 1}"))

    def get(self, timeout):
        """The next event, or None if there is none within ``timeout`` seconds (or it is closed)."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception) or item is _CLOSED:
            self._queue.put(item)  # the stream is over: say so again next time
            if item is _CLOSED:
                return None
            raise item
        return item

    def events(self, *, timeout, count=None):
        """Yield events until ``count`` of them arrived or ``timeout`` seconds passed in total."""
        deadline = time.monotonic() + timeout
        seen = 0
        while count is None or seen < count:
            event = self.get(wait.remaining(deadline))
            if event is None:
                return
            seen += 1
            yield event

    def close(self):
        self._closed = True
        self._queue.put(_CLOSED)
        with contextlib.suppress(OSError):
            if self._connection.sock is not None:
                self._connection.sock.shutdown(socket.SHUT_RDWR)
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        """Events as they come, forever (until closed): use ``events(timeout=...)`` in notebooks."""
        while (event := self.get(None)) is not None:
            yield event
