"""helpers.oci (an image layout written by hand) and helpers.runc (a bundle through runc's lifecycle).

The layout tests are pure file work in a temporary folder; the runc tests run real containers
under the course's runc root and check that runc, its cgroups and the bundles leave nothing.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from helpers import oci, runc
from helpers.errors import BadInput


def _sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def layout(tmp_path):
    return oci.Layout.create(tmp_path / "layout")


# --- layers -----------------------------------------------------------------------------------

def test_a_layer_has_two_digests_and_is_reproducible():
    first = oci.layer({"etc/motd": "hello\n", "app/run.sh": "#!/bin/sh\necho hi\n"})
    again = oci.layer({"app/run.sh": "#!/bin/sh\necho hi\n", "etc/motd": "hello\n"})
    assert (first.digest, first.diff_id) == (again.digest, again.diff_id)
    assert first.diff_id == _sha(first.tar) and first.digest == _sha(first.blob)
    assert gzip.decompress(first.blob) == first.tar and first.digest != first.diff_id
    with tarfile.open(fileobj=io.BytesIO(first.tar)) as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert list(entries) == ["app", "app/run.sh", "etc", "etc/motd"]       # sorted, parents first
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in entries.values()} == {(0, 0, 0, "")}
    assert entries["app/run.sh"].mode == 0o755 and entries["etc/motd"].mode == 0o644


def test_a_change_of_one_byte_changes_the_digest():
    assert oci.layer({"a": "1"}).diff_id != oci.layer({"a": "2"}).diff_id


def test_deleting_a_file_is_a_whiteout_entry():
    assert oci.layer(delete=["etc/hostname", "motd"]).names() == [".wh.motd", "etc",
                                                                  "etc/.wh.hostname"]


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "", "a//b", "./a"])
def test_paths_outside_the_image_are_refused(name):
    with pytest.raises(BadInput, match="not a path inside an image"):
        oci.layer({name: "x"})


@pytest.mark.requires("root")
def test_the_busybox_layer_is_reproducible_and_leaves_dev_to_the_runtime():
    first, again = oci.busybox_layer(), oci.busybox_layer()
    assert first.digest == again.digest and first.diff_id == again.diff_id
    names = first.names()
    assert "bin/busybox" in names and "bin/sh" in names and "dev" in names
    assert not any(n.startswith("dev/") for n in names) and ".cnlab-rootfs" not in names


# --- the layout -------------------------------------------------------------------------------

def test_an_image_is_an_index_a_manifest_a_config_and_blobs(layout):
    base, app = oci.layer({"bin/hello": "#!/bin/sh\necho base\n"}), oci.layer({"etc/motd": "hi\n"})
    entry = layout.add_image("cnlab/hello:1", [base, app], cmd=["/bin/hello"])
    root = layout.path
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["manifests"] == [entry]
    assert entry["annotations"] == {oci.REF_NAME: "1", oci.IMAGE_NAME: "cnlab/hello:1"}
    manifest_bytes = (root / "blobs/sha256" / entry["digest"].split(":")[1]).read_bytes()
    assert _sha(manifest_bytes) == entry["digest"] and len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST
    assert [x["digest"] for x in manifest["layers"]] == [base.digest, app.digest]   # compressed
    assert {x["mediaType"] for x in manifest["layers"]} == {oci.MEDIA_LAYER}
    config = layout.json(manifest["config"])
    assert config["rootfs"]["diff_ids"] == [base.diff_id, app.diff_id]             # uncompressed
    assert config["config"]["Cmd"] == ["/bin/hello"] and config["os"] == "linux"
    blobs = {p.name for p in (root / "blobs/sha256").iterdir()}
    assert blobs == {d.split(":")[1] for d in (entry["digest"], manifest["config"]["digest"],
                                                 base.digest, app.digest)}
    assert [x.diff_id for x in layout.layers("cnlab/hello:1")] == [base.diff_id, app.diff_id]


def test_the_same_content_is_stored_once_and_images_share_it(layout):
    base = oci.layer({"bin/x": "x"})
    layout.add_image("cnlab/a:1", [base], cmd=["x"])
    layout.add_image("cnlab/b:1", [base, oci.layer({"y": "y"})], cmd=["y"])
    layout.add_image("cnlab/a:1", [base], cmd=["x", "again"])          # replaces the old entry
    assert sorted(layout.images()) == ["cnlab/a:1", "cnlab/b:1"]
    assert len(list((layout.path / "blobs/sha256").glob(base.digest.split(":")[1]))) == 1


def test_a_changed_blob_is_caught_by_its_digest(layout):
    entry = layout.add_image("cnlab/hello:1", [oci.layer({"a": "1"})], cmd=["a"])
    config = layout.manifest("cnlab/hello:1")["config"]
    path = layout.path / "blobs/sha256" / config["digest"].split(":")[1]
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"b"'))
    with pytest.raises(oci.DigestMismatch, match="was changed"):
        layout.config("cnlab/hello:1")
    assert entry


@pytest.mark.parametrize("name", ["hello", "cnlab/hello", "Cnlab/Hello:1", "cnlab/hello:"])
def test_an_image_needs_a_lower_case_name_with_a_tag(layout, name):
    with pytest.raises(BadInput, match="with a tag"):
        layout.add_image(name, [oci.layer({"a": "1"})])


def test_missing_images_and_folders_are_named(layout, tmp_path):
    with pytest.raises(BadInput, match="no image 'cnlab/nothing:1'"):
        layout.config("cnlab/nothing:1")
    with pytest.raises(BadInput, match="not an OCI image layout"):
        oci.Layout(tmp_path)


def test_layers_are_applied_in_order_with_whiteouts(layout, tmp_path):
    base = oci.layer({"etc/hostname": "box\n", "etc/motd": "old\n", "data/a": "1", "data/b": "2"})
    upper = oci.layer({"etc/motd": "new\n"}, delete=["etc/hostname"])
    opaque = oci.layer({"data/.wh..wh..opq": "", "data/c": "3", "new/.wh..wh..opq": ""})
    layout.add_image("cnlab/stack:1", [base, upper, opaque], cmd=["sh"])
    root = layout.unpack("cnlab/stack:1", tmp_path / "rootfs")
    assert (root / "etc/motd").read_text() == "new\n"                   # the upper layer wins
    assert not (root / "etc/hostname").exists()                        # whited out
    assert sorted(os.listdir(root / "data")) == ["c"]                   # opaque: lower files hidden
    assert not list(root.rglob(".wh.*"))                                # markers are not files


def _raw_layer(name, data=b"owned"):
    """A layer as a hostile image could ship it: one entry, no parent directories."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return oci.Layer.from_tar(out.getvalue())


@pytest.mark.parametrize("name", ["etc/passwd", "../passwd", "/etc/../../passwd"])
def test_a_layer_cannot_write_outside_the_root(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to(outside)          # a lower layer's symlink, pointing out
    with pytest.raises(BadInput, match="escapes|not a path inside"):
        oci.apply(_raw_layer(name), root)
    assert not (outside / "passwd").exists() and not (tmp_path / "passwd").exists()


def test_an_upper_directory_replaces_a_lower_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    oci.apply(oci.layer({"etc/passwd": "root"}), root)
    assert (root / "etc").is_dir() and not (root / "etc").is_symlink()
    assert (root / "etc/passwd").read_text() == "root" and not (outside / "passwd").exists()


def test_the_archive_is_what_ctr_imports(layout, tmp_path):
    layout.add_image("cnlab/hello:1", [oci.layer({"a": "1"})], cmd=["a"])
    archive = layout.archive(tmp_path / "image.tar")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert {"oci-layout", "index.json", "blobs/sha256"} <= set(names)
    assert archive.read_bytes() == layout.archive(tmp_path / "again.tar").read_bytes()


# --- runc -------------------------------------------------------------------------------------

@pytest.fixture
def image(tmp_path):
    layout = oci.Layout.create(tmp_path / "layout")
    layout.add_image("cnlab/hello:1", [oci.busybox_layer(), oci.layer({"etc/motd": "from a layer\n"})],
                     cmd=["sh", "-c", "cat /etc/motd; hostname; exec sleep 60"])
    return layout


def _cgroups(name):
    return list(Path("/sys/fs/cgroup").glob(f"*/{name}"))


@pytest.mark.requires("runc")
def test_runc_spec_is_the_default_bundle_config():
    config = runc.spec()
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert {n["type"] for n in config["linux"]["namespaces"]} == {"pid", "network", "ipc", "uts", "mount"}
    assert config["process"]["terminal"] is True


@pytest.mark.requires("runc")
def test_a_bundle_runs_through_the_whole_lifecycle(image):
    bundle = runc.Bundle.from_image(image, "cnlab/hello:1", "lifecycle", hostname="box")
    assert bundle.config["process"]["terminal"] is False and bundle.config["hostname"] == "box"
    assert (bundle.path / "rootfs/bin/busybox").is_file()
    with runc.Container(bundle) as box:
        created = box.create()
        assert (created.id, created.status) == ("cnlab-lifecycle", "created") and created.pid > 0
        assert _cgroups(box.id)
        assert box.output() == ""                                     # runc init waits: no output
        running = box.start()
        assert running.status == "running" and running.pid == created.pid
        box.kill("KILL")
        assert box.wait("stopped").status == "stopped"
        box.delete()
        assert not box.exists() and not _cgroups(box.id)
        assert box.output() == "from a layer\nbox\n"
    assert not bundle.path.exists() and runc.containers() == []


@pytest.mark.requires("runc")
def test_a_failed_create_says_why_and_leaves_nothing(image):
    bundle = runc.Bundle.from_image(image, "cnlab/hello:1", "broken", args=["/no/such/program"])
    with pytest.raises(runc.RuncError, match="/no/such/program.*no such file"):
        with runc.Container(bundle) as box:
            box.create()
    assert runc.containers() == [] and not _cgroups("cnlab-broken") and not bundle.path.exists()


@pytest.mark.requires("runc")
def test_bad_names_and_statuses_are_refused(image):
    with pytest.raises(BadInput, match="container name"):
        runc.Bundle.from_image(image, "cnlab/hello:1", "Bad Name")
    with pytest.raises(BadInput, match="no image"):
        runc.Bundle.from_image(image, "cnlab/nothing:1", "x")
    assert not (runc.BUNDLES / "cnlab-x").exists()
    with runc.Container(runc.Bundle.from_image(image, "cnlab/hello:1", "statuses")) as box:
        for step, status in ((box.create, "created"), (box.start, "running"),
                             (lambda: box.kill("KILL"), "stopped")):
            step()
            with pytest.raises(BadInput, match="not a lifecycle status"):
                box.wait("exited", timeout=0.5)           # Docker's word, not the runtime spec's
            assert box.state().status == status and box.wait(status).status == status


@pytest.mark.requires("runc")
def test_sweep_deletes_what_a_crash_left(image):
    box = runc.Container(runc.Bundle.from_image(image, "cnlab/hello:1", "crashed"))
    box.create()
    box.start()                           # and never deleted: as if the kernel had died
    assert [c.id for c in runc.containers()] == ["cnlab-crashed"]
    runc.sweep()
    runc.sweep()                          # twice is fine
    assert runc.containers() == [] and not _cgroups("cnlab-crashed")
    assert not runc.BUNDLES.exists()
