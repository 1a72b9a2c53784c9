"""An OCI image, written by hand: layers, digests, a config, a manifest, an index.

An image is nothing but files addressed by their sha256 (``blobs/sha256/<hex>``) and three JSON
documents that point at each other by digest::

    index.json --> manifest --> config (with the layers' uncompressed digests, the "diff_ids")
                           \\--> layers (gzipped tars, named by their compressed digest)

    layout = oci.Layout.create(path)
    ref = layout.add_image("cnlab/hello:1", [oci.busybox_layer(), oci.layer({"hello.txt": "hi"})],
                           cmd=["cat", "/hello.txt"])
    layout.unpack(ref, rootfs)            # the layers applied in order, whiteouts honoured
    layout.archive(tarball)               # one tar, what ``ctr images import`` reads
    oci.commit(overlay.upper)             # a container's upper layer as a layer: docker commit

Layers are reproducible (entries sorted, owner 0, a fixed mtime, gzip without a timestamp),
so the same content always has the same digest. ``helpers.runc`` turns an image into a bundle.

Used in: 23-filesystems, 25-oci-runc, book/containers/images-filesystems, book/containers/oci-docker-cri.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from helpers._core import names, owners
from helpers.containers import rootfs
from helpers.errors import BadInput, LabError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"     # the tag, in index.json (OCI)
IMAGE_NAME = "io.containerd.image.name"             # the full name, read by ``ctr images import``
EPOCH = 0                                           # every entry's mtime: 1970-01-01, reproducible
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SKIP = {"dev", rootfs._MARKER}                     # the runtime makes /dev; the marker is a cache's


class DigestMismatch(LabError):
    """A blob's content does not hash to the digest it is stored under: it was corrupted."""


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document):
    """JSON as bytes, keys sorted and no spaces: the same document always has the same digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layer:
    """One filesystem change set: the tar (its digest is the config's ``diff_id``) and the
    gzipped blob that is stored and shipped (its digest is the manifest's)."""
    tar: bytes
    blob: bytes
    comment: str = ""

    @classmethod
    def from_tar(cls, tar, comment=""):
        return cls(tar, gzip.compress(tar, compresslevel=6, mtime=0), comment)

    @property
    def diff_id(self):
        return digest(self.tar)

    @property
    def digest(self):
        return digest(self.blob)

    def names(self):
        """The paths in the layer, in the order they are stored."""
        with tarfile.open(fileobj=io.BytesIO(self.tar)) as tar:
            return tar.getnames()


def _info(name, mode):
    """A tar header that carries only what the file is, never when or by whom it was made."""
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(mode)
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tree_layer(root, comment=""):
    """A reproducible layer of everything under ``root``: sorted entries, owner 0, fixed mtime.
    /dev's contents and the rootfs cache marker are left out (the runtime mounts its own /dev)."""
    root = Path(root)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts):
            rel = path.relative_to(root)
            if rel.parts[0] in _SKIP and (len(rel.parts) > 1 or not path.is_dir()):
                continue
            st = path.lstat()
            info = _info(rel.as_posix(), st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                raise BadInput(f"{path} is neither a file, a directory nor a symlink",
                               fix="image layers here hold only those; leave devices to the runtime")
    return Layer.from_tar(out.getvalue(), comment or f"files of {root.name}")


def busybox_layer():
    """The course's base layer: helpers.rootfs's busybox root filesystem, reproducibly tarred."""
    return tree_layer(rootfs.busybox_rootfs(), "busybox rootfs")


def layer(files=None, *, delete=(), comment=""):
    """A layer from a dict ``{"path": str | bytes}`` (mode 0644, or 0755 for an ``"#!"`` script)
    plus whiteouts for the paths in ``delete``: how an upper layer removes a lower layer's file."""
    files = dict(files or {})
    entries = {}
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        if not isinstance(data, bytes):
            raise BadInput(f"the content of {name!r} must be str or bytes, not {type(content).__name__}")
        entries[_clean(name)] = data
    for name in delete:
        entries[rootfs.whiteout_entry(_clean(name))] = b""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in entries for i in range(1, p.count("/") + 1)})
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(set(dirs) | set(entries), key=lambda p: p.split("/")):
            if name in entries:
                data = entries[name]
                info = _info(name, 0o755 if data.startswith(b"#!") else 0o644)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info = _info(name, 0o755)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    what = ", ".join([f"+{n}" for n in files] + [f"-{n}" for n in delete])
    return Layer.from_tar(out.getvalue(), comment or what)


def commit(upper, comment="committed"):
    """A container's upper layer (``rootfs.Overlay.upper``, ``Sandbox.upper``) as an image layer,
    what ``docker commit`` keeps: its files, plus a ``.wh.`` entry for each whiteout. Files
    only: modes are 0644, or 0755 for scripts (see ``layer``)."""
    upper = Path(upper)
    files, deleted = {}, []
    for rel, what in rootfs.changes(upper).items():
        path = upper / rel
        if what == "deleted":
            deleted.append(rel)
        elif what == "changed" and path.is_file() and not path.is_symlink():
            files[rel] = path.read_bytes()
    return layer(files, delete=deleted, comment=comment)


def _clean(name):
    """A path inside an image: relative, no ``..``, no empty parts."""
    parts = str(name).strip("/").split("/")
    if not name or not all(parts) or ".." in parts or "." in parts:
        raise BadInput(f"{name!r} is not a path inside an image",
                       fix="use a relative path such as 'etc/motd' or 'app/run.sh'")
    return "/".join(parts)


class Layout:
    """An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/sha256/``.
    One layout can hold several images, each named in index.json."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "oci-layout").is_file():
            raise BadInput(f"{self.path} is not an OCI image layout (no oci-layout file)",
                           fix="create one with oci.Layout.create(path)")

    @classmethod
    def create(cls, path=None):
        """A new, empty layout (default: under the course's state folder; any old one goes)."""
        path = Path(path) if path else names.state_dir("oci") / "layout"
        if path.exists():
            shutil.rmtree(path)
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
        (path / "index.json").write_bytes(canonical(
            {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}))
        return cls(path)

    # -- blobs --

    def put(self, data, media_type):
        """Store a blob under its digest; return its descriptor (mediaType, digest, size)."""
        found = digest(data)
        (self.path / "blobs" / "sha256" / found.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": found, "size": len(data)}

    def blob(self, descriptor_or_digest):
        """A blob's bytes, checked against its digest (and its size, given a descriptor)."""
        d = descriptor_or_digest
        wanted = d["digest"] if isinstance(d, dict) else d
        algorithm, _, hexdigest = wanted.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64:
            raise BadInput(f"{wanted!r} is not a sha256 digest", fix="use 'sha256:' and 64 hex digits")
        path = self.path / "blobs" / "sha256" / hexdigest
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise LabError(f"blob {wanted} is missing from {self.path}",
                           fix="rebuild the image with Layout.add_image") from e
        if digest(data) != wanted or (isinstance(d, dict) and len(data) != d["size"]):
            raise DigestMismatch(f"blob {path.name[:12]} was changed: its content hashes to "
                                 f"{digest(data)}", fix="rebuild the image; never edit a blob in place")
        return data

    def json(self, descriptor):
        return json.loads(self.blob(descriptor))

    # -- images --

    def index(self):
        return json.loads((self.path / "index.json").read_bytes())

    def add_image(self, name, layers, *, cmd=None, entrypoint=None, env=(PATH,), workdir="/",
                  labels=None):
        """Write an image: its layer blobs, then the config, the manifest, and an index entry.
        ``name`` is a reference like ``cnlab/hello:1`` (any old image of that name is replaced).
        Returns the manifest's descriptor."""
        tag = _tag(name)
        if not layers or not all(isinstance(x, Layer) for x in layers):
            raise BadInput("an image needs a list of oci.Layer objects",
                           fix="e.g. [oci.busybox_layer(), oci.layer({'hello.txt': 'hi'})]")
        descriptors = [self.put(x.blob, MEDIA_LAYER) for x in layers]
        settings = {"Env": list(env), "WorkingDir": workdir,
                    "Labels": {names.LABEL: "oci", **(labels or {})}}
        if cmd is not None:
            settings["Cmd"] = list(cmd)
        if entrypoint is not None:
            settings["Entrypoint"] = list(entrypoint)
        config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
                  "config": settings,
                  "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
                  "history": [{"created": "1970-01-01T00:00:00Z", "created_by": x.comment}
                              for x in layers]}
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                    "config": self.put(canonical(config), MEDIA_CONFIG), "layers": descriptors}
        entry = self.put(canonical(manifest), MEDIA_MANIFEST)
        entry["annotations"] = {REF_NAME: tag, IMAGE_NAME: name}
        index = self.index()
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get(IMAGE_NAME) != name] + [entry]
        (self.path / "index.json").write_bytes(canonical(index))
        return entry

    def images(self):
        """{name: manifest descriptor} for every image in the index."""
        return {m["annotations"][IMAGE_NAME]: m for m in self.index()["manifests"]}

    def manifest(self, name):
        try:
            return self.json(self.images()[name])
        except KeyError as e:
            raise BadInput(f"no image {name!r} in {self.path}",
                           fix=f"add it with add_image, or use one of {sorted(self.images())}") from e

    def config(self, name):
        return self.json(self.manifest(name)["config"])

    def layers(self, name):
        """The image's layers, bottom first, read back (and checked) from their blobs."""
        manifest, config = self.manifest(name), self.config(name)
        found = []
        for descriptor, diff_id, history in zip(manifest["layers"], config["rootfs"]["diff_ids"],
                                                config["history"]):
            blob = self.blob(descriptor)
            tar = gzip.decompress(blob)
            if digest(tar) != diff_id:
                raise DigestMismatch(f"layer {descriptor['digest']} does not unpack to its diff_id "
                                     f"{diff_id}", fix="rebuild the image")
            found.append(Layer(tar, blob, history.get("created_by", "")))
        return found

    def unpack(self, name, target):
        """Apply the image's layers to ``target`` in order, the way a snapshotter does."""
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        for x in self.layers(name):
            apply(x, target)
        return target

    def archive(self, out):
        """The layout as one reproducible tar (oci-layout, index.json, blobs), the form
        ``ctr images import`` reads."""
        out = Path(out)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.path.rglob("*"), key=lambda p: p.relative_to(self.path).parts):
                name = path.relative_to(self.path).as_posix()
                if path.is_dir():
                    info = _info(name, 0o755)
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info = _info(name, 0o644)
                    info.size = path.stat().st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
        return out


def _tag(name):
    """``registry/repo:tag`` -> ``tag``; a name without a tag is refused (be explicit)."""
    repo, colon, tag = str(name).rpartition(":")
    if not colon or not repo or "/" in tag or not tag or name != name.lower().strip():
        raise BadInput(f"{name!r} is not an image name with a tag",
                       fix="use lower-case 'repository:tag', e.g. 'cnlab/hello:1'")
    return tag


def apply(x, target):
    """Apply one layer on top of ``target``: first its whiteouts (they delete what lower layers
    made), then its entries. An entry that would land outside ``target`` is refused."""
    target = Path(target).resolve()
    with tarfile.open(fileobj=io.BytesIO(x.tar)) as tar:
        members = [(m, rootfs.whiteout(m.name)) for m in tar.getmembers()]
        for _, rule in members:
            if rule is None:
                continue
            kind, rel = rule
            if kind == "opaque":
                folder = _inside(target, rel) if rel else target
                for child in folder.iterdir() if folder.is_dir() else ():
                    _remove(child)
            else:
                _remove(_inside(target, rel))
        for m, rule in members:
            if rule is not None:
                continue
            path = _inside(target, m.name)
            if m.isdir():
                if not path.is_dir() or path.is_symlink():
                    _remove(path)
                    path.mkdir()
                os.chmod(path, m.mode)
                continue
            _remove(path)          # never write through a lower layer's symlink
            tar.extract(m, target, set_attrs=True, filter="fully_trusted")


def _inside(target, name):
    """``target/name``, refusing names (and symlinked parents) that lead out of ``target``."""
    path = target / _clean(name)
    parent = Path(os.path.realpath(path.parent))
    if parent != target and target not in parent.parents:
        raise BadInput(f"layer entry {name!r} escapes the root filesystem",
                       fix="an image must not write outside its root; this layer is unsafe")
    return path


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@owners.sweeper(owners.FILES)
def sweep():
    """Remove the image layouts kept under the course's state folder."""
    shutil.rmtree(names.STATE / "oci", ignore_errors=True)
