"""The busybox root filesystem is complete, cached, and rebuilt when broken."""
import os
import subprocess

import pytest

from helpers import rootfs


@pytest.mark.requires("root")
def test_rootfs_runs_a_shell_and_is_cached():
    path = rootfs.busybox_rootfs()
    assert rootfs.is_rootfs(path)
    out = subprocess.run(["chroot", path, "/bin/sh", "-c", "id -un; cat /etc/hostname; echo x > /dev/null"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["root", "cnlab"]
    inode = os.stat(path / "bin" / "busybox").st_ino
    assert rootfs.busybox_rootfs() == path and os.stat(path / "bin" / "busybox").st_ino == inode


@pytest.mark.requires("root")
def test_a_broken_rootfs_is_rebuilt():
    path = rootfs.busybox_rootfs()
    os.remove(path / "bin" / "sh")
    assert not rootfs.is_rootfs(path)
    assert rootfs.is_rootfs(rootfs.busybox_rootfs())


def test_is_rootfs_rejects_a_plain_folder(tmp_path):
    (tmp_path / "bin").mkdir()
    assert not rootfs.is_rootfs(tmp_path)
