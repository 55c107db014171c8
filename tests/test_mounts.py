"""nvmgr.storage.mounts: the one reader of /proc/self/mountinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmgr.storage import mounts

# Lines in the kernel's format (proc(5)): an octal-escaped mount point, optional
# fields before the " - " separator, then the filesystem type.
SAMPLE = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
31 30 0:26 / /run/nvmgr rw master:7 - tmpfs nvmgr rw
40 22 0:40 / /srv/with\\040space rw - fuse.sshfs host: rw
41 22 0:41 / /srv/export rw - fuse /dev/fuse rw
42 30 0:42 / /run/nvmgr rw - ext4 /dev/sdb1 rw
"""


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(SAMPLE)
    real = mounts.mounts
    monkeypatch.setattr(mounts, "mounts", lambda mountinfo=str(f): real(mountinfo))


def test_escapes_optional_fields_and_types_are_read(tmp_path: Path) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(SAMPLE + "garbage line without separator\n")
    got = mounts.mounts(str(f))
    assert [(m.point, m.fstype) for m in got] == [
        ("/", "ext4"), ("/run", "tmpfs"), ("/run/nvmgr", "tmpfs"),
        ("/srv/with space", "fuse.sshfs"), ("/srv/export", "fuse"), ("/run/nvmgr", "ext4")]


def test_the_deepest_and_last_mount_decides_the_filesystem(sample: None) -> None:
    assert mounts.filesystem_of("/run/x") == "tmpfs"
    assert mounts.filesystem_of("/runner") == "ext4"  # a prefix is not a parent
    # mounted over: the later mount on the same point is the one seen
    assert mounts.filesystem_of("/run/nvmgr/u/image.key") == "ext4"
    assert mounts.filesystem_of("/srv/with space/f") == "fuse.sshfs"


def test_fuse_mount_points_only_exactly(sample: None) -> None:
    assert mounts.is_fuse_mount("/srv/export")
    assert mounts.is_fuse_mount("/srv/with space")
    assert not mounts.is_fuse_mount("/srv/export/sub")
    assert not mounts.is_fuse_mount("/run")


def test_this_process_sees_its_root() -> None:
    assert any(m.point == "/" for m in mounts.mounts())
    assert mounts.filesystem_of("/proc/self") == "proc"
