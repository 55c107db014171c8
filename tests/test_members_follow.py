"""Everything follows members (issue 7, 2): backup and restore, snapshot
--domain and migrate-image of a split image, with libvirt's domain object
faked (real images, real qemu-img).  A member rolled back to an older copy of
itself: ``tests/test_members.py``.

The real VM with its UEFI vars in a member is ``tests/e2e/test_members.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.domain.elements import parse_domain
from nvmgr.image import members
from nvmgr.image.handoff import copy_for_migration
from nvmgr.image.image import Image
from nvmgr.virt import backup as bk
from nvmgr.virt import conn as virt_conn

NS = "https://nvmgr.dev/schemas/metadata/1"
KiB = 1024


class FakeDomain:
    """The parts of a libvirt virDomain that backup uses."""

    def __init__(self, xml: str) -> None:
        self.xml, self.active, self.calls = xml, False, []  # type: list[str]

    def isActive(self) -> bool:  # noqa: N802 - libvirt's name
        return self.active

    def state(self) -> list[int]:
        return [1 if self.active else 5, 0]

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")


@pytest.fixture
def split_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A defined domain (three sections) whose image keeps fru0 and the live
    block section state0 in a member in another directory; libvirt faked.
    Parametrized indirectly with "key": the domain names a key file (its
    sections encrypted, state0 a LUKS volume)."""
    image = tmp_path / "img" / "vm.nvram"
    image.parent.mkdir()
    key: Kek | None = None
    key_attr = ""
    if getattr(request, "param", None) == "key":
        raw = os.urandom(32)
        kf = tmp_path / "key"
        kf.write_bytes(raw)
        kf.chmod(0o600)
        key, key_attr = Kek(raw, "file"), f" key-file='{kf}'"
    xml = (f"<domain type='qemu'><name>vm</name><uuid>{uuid.uuid4()}</uuid><metadata>"
           f"<nvmgr:nvram xmlns:nvmgr='{NS}' image='{image}' format='raw'{key_attr}>"
           "<nvmgr:section name='fru0' size='4K'/>"
           "<nvmgr:section name='vpd0' size='8K'/>"
           "<nvmgr:section name='state0' size='64K' binding='block'/>"
           "</nvmgr:nvram></metadata>"
           "<memory>65536</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
           "<devices/></domain>")
    dom = FakeDomain(xml)

    @contextlib.contextmanager
    def connect(uri: str | None = None, *, readonly: bool = False) -> Iterator[object]:
        yield object()

    monkeypatch.setattr(virt_conn, "connect", connect)
    monkeypatch.setattr(virt_conn, "lookup", lambda _c, _n: dom)
    monkeypatch.setattr(virt_conn, "domain_xml", lambda *_a, **_k: dom.xml)
    monkeypatch.setattr(virt_conn, "define", lambda x, uri=None: "vm")
    monkeypatch.setattr(virt_conn, "exists", lambda *_a, **_k: True)
    monkeypatch.setattr(virt_conn, "is_active", lambda *_a, **_k: dom.active)
    monkeypatch.setattr(virt_conn, "require_inactive", lambda *_a, **_k: None)
    monkeypatch.setattr(virt_conn, "uuid_exists", lambda *_a, **_k: True)
    from nvmgr.virt.define import _define

    _define(parse_domain(xml), xml, uri=None, kek=key)
    member = tmp_path / "fast" / "vm-m.nvram"
    member.parent.mkdir()
    data = {"fru0": b"F" * 3000, "vpd0": b"V" * 5000, "state0": os.urandom(64 * KiB)}
    with Image.open(str(image), writable=True, kek=key) as img:
        for n, b in data.items():
            img.put(n, b)
        members.split(img, ["fru0", "state0"], str(member))
    yield {"image": image, "member": member, "dom": dom, "data": data, "tmp": tmp_path,
           "key": key}


def _stored(path: Path, key: Kek | None = None) -> dict[str, bytes]:
    with Image.open(str(path), kek=key) as img:
        return {s.name: img.get(s.name) for s in img.directory.sections}


@pytest.mark.parametrize("split_vm", ["key"], indirect=True)
def test_backup_and_restore_of_an_encrypted_split_image(split_vm: dict[str, Any]) -> None:
    image, data, key = split_vm["image"], split_vm["data"], split_vm["key"]
    with Image.open(str(image), kek=key) as img:
        assert img.directory.encrypted and img.section("state0").luks
        assert img.section("state0").member == 1
    out = split_vm["tmp"] / "backup.nvram"
    bk.backup("vm", str(out), kek=key)
    with Image.open(str(out), kek=key) as b:
        assert not b.directory.members and b.check().ok and b.directory.encrypted
    assert _stored(out, key) == data
    with Image.open(str(image), writable=True, kek=key) as img:
        for n in data:
            img.put(n, b"changed")
    bk.restore("vm", str(out), kek=key)
    assert _stored(image, key) == data


@pytest.mark.parametrize("running", [False, True])
def test_backup_of_a_split_image_holds_every_members_sections_and_restore_puts_them_back(
        split_vm: dict[str, Any], running: bool) -> None:
    image, member, data = split_vm["image"], split_vm["member"], split_vm["data"]
    dom = split_vm["dom"]
    if running:  # QEMU writes the live slice in the member's file, in use
        dom.active = True
        with Image.open(str(image), writable=True) as img:
            img.set_in_use(["state0"], True)
            mi = img.member_image(1)
            s = mi.directory.find("state0")
            assert s is not None
            data["state0"] = os.urandom(64 * KiB)
            mi.container.write(s.offset, data["state0"])
            mi.container.flush()
    out = split_vm["tmp"] / "backup.nvram"
    r = bk.backup("vm", str(out))
    assert sorted(r.sections) == ["state0"]  # the live slice read from the member's file
    assert dom.calls == (["suspend", "resume"] if running else [])
    with Image.open(str(out)) as b:  # one file: every section in it, none in a member
        assert not b.directory.members
        assert all(s.member is None for s in b.directory.sections)
        assert b.check().ok and not b.section("state0").dirty
    assert _stored(out) == data
    assert sorted(os.listdir(out.parent)) == ["backup.nvram", "fast", "img"]  # no leftovers

    dom.active = False
    with Image.open(str(image), writable=True) as img:
        img.set_in_use(["state0"], False)
        for n in data:
            img.put(n, b"changed")
    rr = bk.restore("vm", str(out))
    assert rr.restored == sorted(data)
    with Image.open(str(image)) as img:  # back where the domain keeps them: the member
        assert img.section("fru0").member == 1 and img.section("state0").member == 1
        assert img.section("vpd0").member is None
        assert {n: img.get(n) for n in data} == data and img.check().ok
    assert member.exists()


def test_snapshot_of_a_split_domain_covers_its_members(split_vm: dict[str, Any]) -> None:
    image, data = split_vm["image"], split_vm["data"]
    got = bk.snapshot_create("vm", "s1")
    assert _stored(Path(str(got["snapshot"]))) == data
    assert [s["name"] for s in bk.snapshot_list("vm")] == ["s1"]
    with Image.open(str(image), writable=True) as img:
        img.put("fru0", b"later")
    bk.snapshot_revert("vm", "s1")
    with Image.open(str(image)) as img:
        assert img.get("fru0") == data["fru0"] and img.section("fru0").member == 1


def test_migrate_image_copies_members_where_the_destination_finds_them(
        split_vm: dict[str, Any]) -> None:
    image, member, data, tmp = (split_vm[k] for k in ("image", "member", "data", "tmp"))
    # The destination's root mounted under /dst here: the member keeps its absolute path there.
    dst = Path(str(tmp / "dst") + str(image))
    dst.parent.mkdir(parents=True)
    r = copy_for_migration(str(image), str(dst))
    target = Path(str(tmp / "dst") + str(member))
    assert r["members"] == [{"index": 1, "path": str(target), "recorded": str(member)}]
    assert target.exists() and not list(dst.parent.glob(".*"))
    with Image.open(str(dst)) as c:
        assert c.directory.members[0].path == str(member)  # the destination's own path
        assert c.directory.image_uuid == Image.open(str(image)).directory.image_uuid
    # Read from where the destination has it: the prefix taken away.
    shutil.copy(dst, tmp / "check.nvram")
    with Image.open(str(tmp / "check.nvram"), writable=True) as c:
        new = c._copy_dir()
        new.members = [m.__class__(m.index, str(target), m.image_uuid, m.fmt)
                       for m in new.members or []]
        c._commit(new)
    assert _stored(tmp / "check.nvram") == data
    with Image.open(str(tmp / "check.nvram")) as c:
        assert c.check().ok

    # A copy to a path that maps nothing: the member beside it, recorded relative.
    other = tmp / "elsewhere" / "copy.nvram"
    other.parent.mkdir()
    r = copy_for_migration(str(image), str(other))
    beside = other.parent / "copy.m1.nvram"
    assert r["members"] == [{"index": 1, "path": str(beside), "recorded": "copy.m1.nvram"}]
    assert _stored(other) == data
    with Image.open(str(other)) as c:
        assert c.check().ok and c.member_path(c.directory.members[0]) == str(beside)
    with Image.open(str(image)) as img:  # the source as it was
        assert img.member_path(img.directory.members[0]) == str(member) and img.check().ok


def test_migrate_image_never_overwrites_a_member_target_that_is_not_its_own(
        split_vm: dict[str, Any]) -> None:
    image, tmp = split_vm["image"], split_vm["tmp"]
    other = tmp / "elsewhere" / "copy.nvram"
    other.parent.mkdir()
    (other.parent / "copy.m1.nvram").write_bytes(b"someone's file")
    with pytest.raises(Exception, match="copy.m1.nvram .* already exists"):
        copy_for_migration(str(image), str(other))
    assert not other.exists() and (other.parent / "copy.m1.nvram").read_bytes() == b"someone's file"
    assert sorted(os.listdir(other.parent)) == ["copy.m1.nvram"]
