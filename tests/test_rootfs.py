"""The busybox root filesystem is complete, cached and rebuilt when broken; overlays copy on
write and leave whiteouts; image layers unpack and stack in order; a chroot can be escaped and
pivot_root closes the hole."""
import os
import stat
import subprocess

import pytest

from helpers import BadInput, oci, rootfs

root = pytest.mark.requires("root")


@root
def test_rootfs_runs_a_shell_and_is_cached():
    path = rootfs.busybox_rootfs()
    assert rootfs.is_rootfs(path)
    out = subprocess.run(["chroot", path, "/bin/sh", "-c", "id -un; cat /etc/hostname; echo x > /dev/null"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["root", "cnlab"]
    inode = os.stat(path / "bin" / "busybox").st_ino
    assert rootfs.busybox_rootfs() == path and os.stat(path / "bin" / "busybox").st_ino == inode


@root
def test_a_broken_rootfs_is_rebuilt(tmp_path):
    path = rootfs.busybox_rootfs(tmp_path)          # a cache of its own: others use the shared one
    assert path.parent == tmp_path
    os.remove(path / "bin" / "sh")
    assert not rootfs.is_rootfs(path)
    assert rootfs.is_rootfs(rootfs.busybox_rootfs(tmp_path))
    (path / rootfs._MARKER).write_text("an older busybox")
    inode = os.stat(path / "bin" / "busybox").st_ino
    assert os.stat(rootfs.busybox_rootfs(tmp_path) / "bin" / "busybox").st_ino != inode


def test_is_rootfs_rejects_a_plain_folder(tmp_path):
    (tmp_path / "bin").mkdir()
    assert not rootfs.is_rootfs(tmp_path)
    assert not rootfs.is_rootfs(tmp_path / "missing") and not rootfs.is_rootfs(42)


def _tree(base, links=()):
    for name in ("bin", "proc", "dev", "tmp", "etc"):
        (base / name).mkdir(parents=True, exist_ok=True)
    (base / "bin" / "busybox").write_text("#!/bin/busybox\n")
    (base / "bin" / "busybox").chmod(0o755)
    for name, target in links:
        (base / name).symlink_to(target)
    return base


def test_lookup_follows_symlinks_inside_the_root_and_searches_path(tmp_path):
    base = _tree(tmp_path / "r", [("bin/sh", "busybox"), ("bin/ls", "/bin/busybox"),
                                  ("bin/loop", "loop"), ("bin/out", "../../../../etc/passwd")])
    (base / "etc" / "motd").write_text("hi")
    assert rootfs.lookup(base, "sh") == "/bin/sh" and rootfs.lookup(base, "ls") == "/bin/ls"
    assert rootfs.resolve(base, "/bin/ls") == base / "bin" / "busybox"     # absolute: still inside
    assert rootfs.resolve(base, "/bin/../bin/./sh") == base / "bin" / "busybox"
    assert rootfs.lookup(base, "/etc/motd") is None                       # not executable
    assert rootfs.lookup(base, "loop") is None and rootfs.lookup(base, "nope") is None
    assert rootfs.resolve(base, "/bin/out") is None                       # /etc/passwd of the root
    assert rootfs.is_rootfs(base)


def test_lookup_sees_layers_top_first_and_honours_whiteouts(tmp_path):
    low = _tree(tmp_path / "low", [("bin/sh", "busybox"), ("bin/vi", "busybox")])
    top = tmp_path / "top"
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "tool").write_text("x")
    (top / "bin" / "tool").chmod(0o755)
    if os.geteuid() == 0:
        os.mknod(top / "bin" / "vi", stat.S_IFCHR, os.makedev(0, 0))      # vi deleted above
        assert rootfs.lookup([low, top], "vi") is None
    assert rootfs.lookup([low, top], "tool") == "/bin/tool" and rootfs.lookup([low, top], "sh") == "/bin/sh"
    assert rootfs.lookup([low], "tool") is None


@pytest.mark.parametrize("name, rule", [
    ("etc/.wh.group", ("deleted", "etc/group")), (".wh.motd", ("deleted", "motd")),
    ("data/.wh..wh..opq", ("opaque", "data")), (".wh..wh..opq", ("opaque", "")),
    ("etc/group", None), ("etc/x.wh.y", None),
])
def test_the_whiteout_rules_read_a_layer_entry(name, rule):
    assert rootfs.whiteout(name) == rule
    if rule and rule[0] == "deleted":          # and write one: the same rule both ways
        assert rootfs.whiteout_entry(rule[1]) == name


@root
def test_an_overlay_copies_on_write_and_leaves_whiteouts():
    lower = rootfs.busybox_rootfs()
    passwd = (lower / "etc" / "passwd").read_text()
    with rootfs.Overlay(lower) as fs:
        assert fs.mounted and (fs.merged / "bin" / "busybox").exists()
        assert rootfs._MARKER in os.listdir(fs.merged)
        (fs.merged / "etc" / "passwd").write_text(passwd + "guest:x:1000:1000::/home:/bin/sh\n")
        os.remove(fs.merged / "etc" / "group")
        (fs.merged / "tmp" / "new").mkdir()
        assert fs.changes() == {"etc/group": "deleted", "etc/passwd": "changed", "tmp/new": "changed"}
        whiteout = os.lstat(fs.upper / "etc" / "group")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        assert not (fs.merged / "etc" / "group").exists()
        assert "guest" in (fs.upper / "etc" / "passwd").read_text()
        assert (lower / "etc" / "passwd").read_text() == passwd and (lower / "etc" / "group").exists()
        layer = oci.commit(fs.upper)
        path = fs.path
    assert not path.exists()
    assert layer.names() == ["etc", "etc/.wh.group", "etc/passwd"]
    with open("/proc/self/mountinfo") as f:
        assert str(path) not in f.read()


@root
def test_layers_unpack_once_and_stack_in_order():
    base = oci.busybox_layer()
    app = oci.layer({"app/run.sh": "#!/bin/sh\necho v1\n", "etc/motd": "one\n"})
    fix = oci.layer({"app/run.sh": "#!/bin/sh\necho v2\n"}, delete=["etc/motd", "etc/group"])
    dirs = rootfs.layer_dirs([base, app, fix])
    assert [d.name for d in dirs] == [x.diff_id.split(":")[1] for x in (base, app, fix)]
    assert rootfs.layer_dirs([app]) == [dirs[1]]                      # content-addressed: reused
    assert stat.S_ISCHR(os.lstat(dirs[2] / "etc" / "motd").st_mode)  # a whiteout, overlay-style
    assert rootfs.is_rootfs(dirs) and rootfs.lookup(dirs, "/app/run.sh") == "/app/run.sh"
    with rootfs.Overlay(dirs) as fs:
        assert (fs.merged / "app" / "run.sh").read_text().endswith("v2\n")
        assert not (fs.merged / "etc" / "motd").exists() and not (fs.merged / "etc" / "group").exists()
        assert (fs.merged / "etc" / "passwd").exists()


def test_overlay_options_put_the_top_layer_first(tmp_path):
    assert rootfs.overlay_options([tmp_path / "a", tmp_path / "b"], "/u", "/w") == \
        f"lowerdir={tmp_path}/b:{tmp_path}/a,upperdir=/u,workdir=/w"
    with pytest.raises(BadInput):
        rootfs.Overlay(tmp_path / "missing")


@root
def test_a_chroot_can_be_escaped_but_pivot_root_closes_the_hole():
    path = rootfs.busybox_rootfs()
    assert rootfs.escape(path) is True
    assert rootfs.escape(path, pivot_root=True) is False
    assert os.listdir(path / "tmp") == []                          # the jail was never written to
