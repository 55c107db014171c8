"""Member images: split, merge, placement past a domain's max-image-size, and
every bad member refused with a message naming the member and the section,
exit 4, nothing written.  (Crash safety: tests/test_crash_members.py; with
libvirt: tests/e2e/test_members.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.plan import plan_for
from nvmgr.errors import (
    BusyError,
    ExitCode,
    InvalidInputError,
    KeyRequiredError,
    MemberError,
    NoSpaceError,
    UsageError,
    WrongKeyError,
)
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.convert import convert
from nvmgr.image.image import Image
from nvmgr.image.members import merge, split
from nvmgr.provision.prepare import copy_for_clone, grow, plan_with_offsets
from tests.conftest import RunCli

SPECS = [SectionSpec("uefi-vars", 8192, Binding.PFLASH), SectionSpec("tpm", 8192, Binding.TPM),
         SectionSpec("blob", 4096)]


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "-" for p in paths]


def _image(tmp_path: Path, key: Kek | None = None, fmt: str = "raw") -> Path:
    p = tmp_path / "vm.nvram"
    with Image.create(str(p), SPECS, kek=key, fmt=fmt) as img:
        img.put("uefi-vars", b"V" * 8192)
        img.put("tpm", b"tpm state")
        img.put("blob", b"blob bytes")
    (tmp_path / "other").mkdir(exist_ok=True)
    return p


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_split_and_merge_keep_every_byte(tmp_path: Path, fmt: str) -> None:
    p = _image(tmp_path)
    m = tmp_path / "other" / "m.nvram"
    with Image.open(str(p), writable=True) as img:
        r = split(img, ["uefi-vars", "tpm"], str(m), fmt=fmt)
        assert r.created and r.index == 1
    with Image.open(str(p)) as img:
        assert img.check().ok
        assert [(s.name, s.member) for s in img.sections()] == [
            ("uefi-vars", 1), ("tpm", 1), ("blob", None)]
        assert img.get("uefi-vars") == b"V" * 8192 and img.get("tpm") == b"tpm state"
        assert img.image_path_of("tpm") == str(m) and img.member_image(1).fmt == fmt
    with Image.open(str(m)) as mi:  # a member is an nvmgr image naming its parent
        with Image.open(str(p)) as img:
            assert mi.directory.parent == img.directory.image_uuid
    with Image.open(str(p), writable=True) as img:
        img.put("tpm", b"new state")  # writes go to the member, crash-safely
        merge(img, str(m))
    assert not m.exists()
    with Image.open(str(p)) as img:
        assert img.check().ok and img.directory.members is None
        assert img.get("tpm") == b"new state" and img.get("uefi-vars") == b"V" * 8192


def test_cli_split_merge_list_info(tmp_path: Path, nvmgr: RunCli) -> None:
    p = _image(tmp_path)
    m = tmp_path / "other" / "m.nvram"
    r = nvmgr("split", p, "blob", "--into", m, "-O", "json")
    assert r.returncode == 0, r.stderr
    assert b'"index": 1' in r.stdout
    ls = nvmgr("list", p)
    assert b"MEMBER" in ls.stdout
    info = nvmgr("info", p)
    assert f"member 1: {m}".encode() in info.stdout and b"blob" in info.stdout
    assert nvmgr("get", p, "blob").stdout == b"blob bytes"
    again = nvmgr("split", p, "blob", "--into", m)
    assert again.returncode == ExitCode.USAGE and b"already" in again.stderr
    assert nvmgr("merge", p, tmp_path / "nope.nvram").returncode == ExitCode.NOT_FOUND
    assert nvmgr("merge", p, m).returncode == 0 and not m.exists()


def _split_blob(tmp_path: Path) -> tuple[Path, Path]:
    p = _image(tmp_path)
    m = tmp_path / "other" / "m.nvram"
    with Image.open(str(p), writable=True) as img:
        split(img, ["blob"], str(m))
    return p, m


def _refused(p: Path, m: Path, nvmgr: RunCli, match: str) -> None:
    """get, check and put each refuse with exit 4, naming the member and the
    section; no byte of the image or the member changes."""
    before = _digest(p, m)
    with Image.open(str(p)) as img, pytest.raises(MemberError, match=match):
        img.get("blob")
    for args in (("get", p, "blob"), ("check", p), ("put", p, "blob", "-")):
        r = nvmgr(*args)
        said = r.stdout + r.stderr  # check prints its report, errors included
        assert r.returncode == ExitCode.CORRUPT, (args, said)
        assert b"member image 1" in said and b"blob" in said, said
    assert _digest(p, m) == before


def test_a_missing_member(tmp_path: Path, nvmgr: RunCli) -> None:
    p, m = _split_blob(tmp_path)
    m.rename(tmp_path / "elsewhere")
    _refused(p, m, nvmgr, r"member image 1 .*blob.* is missing")


def test_a_member_of_another_image(tmp_path: Path, nvmgr: RunCli) -> None:
    """A member made for image A, named by image B (same UUID recorded): refused."""
    p, m = _split_blob(tmp_path)
    q = tmp_path / "b" / "vm.nvram"
    q.parent.mkdir()
    _image(q.parent)
    with Image.open(str(p)) as a:
        record = a.directory.members[0]  # type: ignore[index]
        stub = a.directory.find("blob")
    with Image.open(str(q), writable=True) as b:
        d = b._copy_dir()
        d.members = [record]
        d.sections = [dataclasses.replace(stub) if s.name == "blob" else s  # type: ignore[type-var]
                      for s in d.sections]
        b._commit(d)
    _refused(q, m, nvmgr, r"member image 1 .* belongs to image .*not to this image")


def test_a_member_replaced_by_another_image(tmp_path: Path, nvmgr: RunCli) -> None:
    p, m = _split_blob(tmp_path)
    m.unlink()
    with Image.open(str(p)) as img:
        parent = img
        with Image.create(str(m), [SectionSpec("blob", 4096)], parent=parent):
            pass  # the right parent and section, another image UUID
    _refused(p, m, nvmgr, r"member image 1 .* is image .*the directory names")


def test_a_member_without_the_section(tmp_path: Path, nvmgr: RunCli) -> None:
    p, m = _split_blob(tmp_path)
    with Image.open(str(m), writable=True) as mi:
        d = mi._copy_dir()
        d.sections = []
        mi._commit(d)
    _refused(p, m, nvmgr, r"section blob is missing from member image 1")


def test_a_live_section_in_use_is_not_moved(tmp_path: Path, nvmgr: RunCli) -> None:
    p = _image(tmp_path)
    with Image.open(str(p), writable=True) as img:
        img.set_in_use(["uefi-vars"], True)
    before = _digest(p)
    r = nvmgr("split", p, "uefi-vars", "--into", tmp_path / "other" / "m.nvram")
    assert r.returncode == ExitCode.BUSY and b"uefi-vars" in r.stderr
    assert _digest(p) == before and not (tmp_path / "other" / "m.nvram").exists()


def test_a_file_in_the_way_is_never_overwritten(tmp_path: Path, nvmgr: RunCli) -> None:
    p = _image(tmp_path)
    theirs = tmp_path / "other" / "m.nvram"
    theirs.write_bytes(b"someone's file")
    r = nvmgr("split", p, "blob", "--into", theirs)
    assert r.returncode == ExitCode.BUSY and b"never written over" in r.stderr
    assert theirs.read_bytes() == b"someone's file"


def test_encrypted_members_need_the_key_and_follow_rekey(tmp_path: Path) -> None:
    k1, k2 = Kek(b"1" * 32, "one"), Kek(b"2" * 32, "two")
    p = _image(tmp_path, key=k1)
    m = tmp_path / "other" / "m.nvram"
    with Image.open(str(p), writable=True) as img, pytest.raises(KeyRequiredError):
        split(img, ["tpm"], str(m))
    assert not m.exists()
    with Image.open(str(p), writable=True, kek=k1) as img:
        split(img, ["tpm"], str(m))
        img.rekey(k2)
    with Image.open(str(p), kek=k2) as img:
        assert img.get("tpm") == b"tpm state" and img.check().ok
    with Image.open(str(m), kek=k1) as mi, pytest.raises(WrongKeyError):
        mi.get("tpm")  # the old key left the member too
    with Image.open(str(p), writable=True, kek=k2) as img:
        merge(img, str(m))
        assert img.get("tpm") == b"tpm state"


def test_grow_past_max_image_size_goes_into_members(tmp_path: Path) -> None:
    p = _image(tmp_path)
    limit = 2 << 20
    with Image.open(str(p), writable=True) as img:
        placed = grow(img, [SectionSpec("small", 4096), SectionSpec("big", 960 << 10),
                            SectionSpec("more", 4096)], max_image_size=limit)
        where = {s.name: s.member for s in img.sections()}
        assert where["small"] is None and where["big"] is not None and where["more"] is not None
        assert [n for r in placed for n in r.sections] == ["big", "more"]
        assert img.directory.image_size <= limit
        with pytest.raises(NoSpaceError, match="huge"):
            grow(img, [SectionSpec("huge", 1 << 20)], max_image_size=limit)
        members = [mi.path for _m, mi in img.members()]
    assert members and all(os.path.getsize(m) <= limit for m in members)
    assert os.path.getsize(p) <= limit
    with Image.open(str(p)) as img:
        assert img.check().ok


def test_grow_within_the_size_an_image_has_into_raw_members_beside_another_path(
        tmp_path: Path) -> None:
    """attach --live of a qcow2 image the running QEMU holds: the image is
    opened through another location, cannot grow, and new sections go into a
    raw member beside the image's file (a qcow2 member there is passed over);
    a hole within the image's size is still used in place; the domain's
    max-image-size still bounds the member."""
    p = _image(tmp_path, fmt="qcow2")
    (tmp_path / "elsewhere").mkdir()
    with Image.open(str(p), writable=True) as img:
        img.remove("blob")  # a hole of 4096 bytes inside the image
        split(img, ["tpm"], str(tmp_path / "other" / "q.qcow2"), fmt="qcow2")
        size = img.container.size()  # the qcow2's virtual size: what QEMU's node has
        grow(img, [SectionSpec("fits", 4096, Binding.BLOCK)], in_place_limit=size,
             member_fmt="raw", beside=str(tmp_path / "elsewhere" / "vm.qcow2"))
        assert img.section("fits").member is None and img.container.size() == size
        before = _digest(p, tmp_path / "other" / "q.qcow2")
        with pytest.raises(NoSpaceError, match="state0"):
            grow(img, [SectionSpec("state0", 1 << 20, Binding.BLOCK)], in_place_limit=size,
                 max_image_size=64 << 10, member_fmt="raw", beside=str(p))
        assert _digest(p, tmp_path / "other" / "q.qcow2") == before
        assert not (tmp_path / "vm.m2.nvram").exists()
        placed = grow(img, [SectionSpec("state0", 64 << 10, Binding.BLOCK),
                            SectionSpec("state1", 8192, Binding.BLOCK)],
                      contents={"state0": b"S" * 1000}, in_use=["state0"],
                      in_place_limit=size, member_fmt="raw",
                      beside=str(tmp_path / "elsewhere" / "vm.qcow2"))
        (r,) = placed
        assert r.created and r.sections == ["state0", "state1"]
        assert r.member == str(tmp_path / "elsewhere" / "vm.m2.nvram")  # raw: not .qcow2
        assert img.container.size() == size and img.directory.image_size <= size
        m = img.directory.member(img.section("state0").member)  # type: ignore[arg-type]
        assert m is not None and m.fmt == "raw" and m.index == 2
        assert img.member_image(m.index).fmt == "raw"
        assert img.get("state0")[:1000] == b"S" * 1000
        assert img.section("state0").dirty and not img.section("state1").dirty
    with Image.open(str(p)) as img:
        assert img.check().ok
        assert img.get("tpm") == b"tpm state" and img.get("uefi-vars") == b"V" * 8192


def test_max_image_size_metadata_bounds() -> None:
    base = ("<domain type='kvm'><name>x</name><memory>1</memory><os><type>hvm</type></os>"
            "<metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' "
            "max-image-size='{}'/></metadata></domain>")
    assert parse_domain(base.format("2G")).nvmgr.max_image_size == 2 << 30  # type: ignore[union-attr]
    for bad in ("1K", "lots", "300T"):
        with pytest.raises(InvalidInputError, match="max-image-size"):
            parse_domain(base.format(bad))


def test_convert_and_clone_copy_members(tmp_path: Path) -> None:
    p, m = _split_blob(tmp_path)
    out = tmp_path / "copy.qcow2"
    convert(str(p), str(out), "qcow2")
    with Image.open(str(out)) as c, Image.open(str(p)) as img:
        assert c.check().ok and c.get("blob") == b"blob bytes"
        assert c.image_path_of("blob") == str(tmp_path / "copy.m1.qcow2") != str(m)
        assert c.directory.image_uuid == img.directory.image_uuid  # a copy, as for plain images
    dom = uuid.uuid4()
    new = copy_for_clone(str(p), str(tmp_path / "clone.nvram"), dom, None)
    with Image.open(str(tmp_path / "clone.nvram")) as c, Image.open(str(p)) as img:
        assert c.check().ok and c.directory.image_uuid == new
        assert c.get("blob") == b"blob bytes" and c.get("tpm") == b""  # fresh TPM
        mc = c.member_image(1)
        assert mc.path != str(m) and mc.directory.parent == new
        assert mc.directory.image_uuid != img.member_image(1).directory.image_uuid


def test_qemu_arguments_point_a_live_slice_into_its_member(tmp_path: Path) -> None:
    xml = (Path(__file__).parent / "data" / "uefi-tpm2-in.xml").read_text()
    dom = parse_domain(xml)
    plan = plan_for(dom, encrypted=False)
    img_path = tmp_path / "vm.nvram"
    with Image.create(str(img_path), [SectionSpec(s.name, s.capacity, s.binding)
                                      for s in plan.sections]) as img:
        split(img, ["uefi-vars"], str(tmp_path / "m.nvram"))
        placed = plan_with_offsets(plan, img.directory, img)
        args = qemuargs.qemu_args(placed, str(img_path), "raw", domain_uuid=uuid.uuid4())
        files = qemuargs.slice_files(args)
        offset, path = files[qemuargs.node_name("uefi-vars")]
        assert path == str(tmp_path / "m.nvram") and offset == img.section("uefi-vars").offset
        assert str(img_path) not in " ".join(args)  # no live section left in the image itself
    with pytest.raises(UsageError):
        qemuargs.qemu_args(dataclasses.replace(placed, sections=tuple(
            dataclasses.replace(s, member_path="relative.nvram") for s in placed.sections)),
            str(img_path), "raw", domain_uuid=uuid.uuid4())


def test_busy_member_is_busy(tmp_path: Path) -> None:
    """A second nvmgr writer on a member: the usual exit 7, not a corruption."""
    p, m = _split_blob(tmp_path)
    with Image.open(str(m), writable=True), Image.open(str(p), writable=True) as img:
        with pytest.raises(BusyError):
            img.put("blob", b"x")


def test_max_image_size_survives_the_rewrite_of_the_metadata() -> None:
    xml = (Path(__file__).parent / "data" / "uefi-tpm2-in.xml").read_text()
    xml = xml.replace("</devices>", "</devices><metadata><nvmgr:nvram xmlns:nvmgr="
                      "'https://nvmgr.dev/schemas/metadata/1' max-image-size='64M'/></metadata>",
                      1)
    dom = parse_domain(xml)
    assert dom.nvmgr is not None and dom.nvmgr.max_image_size == 64 << 20
    plan = plan_for(dom, encrypted=False)
    qemuargs.apply_plan(dom, plan, "/var/lib/libvirt/nvmgr/x.nvram", "raw", uuid.uuid4())
    again = parse_domain(dom.to_xml())
    assert again.nvmgr is not None and again.nvmgr.max_image_size == 64 << 20


# ---------------------------------------------------------------- a member rolled back

def test_a_member_replaced_by_an_older_copy_of_itself(tmp_path: Path, nvmgr: RunCli) -> None:
    """Same UUID, same parent, an older directory generation: refused (exit 4)
    by get, check and put, naming the member, its section and both
    generations; nothing written."""
    p, m = _split_blob(tmp_path)
    old = m.read_bytes()  # a copy of the member, as a backup of the file would keep it
    with Image.open(str(p), writable=True) as img:
        img.put("blob", b"newer bytes")  # the member's commit, then the image records it
        gen = img.member_image(1).directory.generation
    with Image.open(str(p)) as img:
        assert img.directory.members[0].generation == gen  # type: ignore[index]
    m.write_bytes(old)
    _refused(p, m, nvmgr, rf"member image 1 \(.*holding section\(s\) blob\) is an older copy "
                          rf"of itself: its directory is generation {gen - 1}.* recorded "
                          rf"generation {gen}")


def test_a_member_newer_than_recorded_is_taken_and_old_records_check_nothing(
        tmp_path: Path) -> None:
    """A crash between the member's commit and the image's leaves the member
    newer than the record: taken.  An image written before the record
    existed (no generation): opened, and recorded at its next commit."""
    p, m = _split_blob(tmp_path)
    with Image.open(str(m), writable=True) as mi:  # the member alone: the image's commit lost
        mi.put("blob", b"member only")
    with Image.open(str(p)) as img:
        assert img.get("blob") == b"member only" and img.check().ok
    with Image.open(str(p), writable=True) as img:  # as an older nvmgr wrote it
        d = img._copy_dir()
        d.members = [dataclasses.replace(x, generation=None) for x in d.members or []]
        img._commit(d)
    with Image.open(str(p), writable=True) as img:
        assert img.directory.members[0].generation is None  # type: ignore[index]
        assert img.get("blob") == b"member only" and img.check().ok
        img.put("blob", b"again")
        assert img.directory.members[0].generation == (  # type: ignore[index]
            img.member_image(1).directory.generation)


def test_the_hook_refuses_a_start_on_a_rolled_back_member(tmp_path: Path) -> None:
    """The prepare hook (its own process, as libvirtd runs it) refuses the
    start, naming the member; neither file changes."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hookdom import wired_domain

    d = wired_domain(tmp_path, "rollback")
    assert d.hook("prepare", "begin").returncode == 0
    assert d.hook("release", "end").returncode == 0
    with Image.open(str(d.image)) as img:
        tpm = next(s.name for s in img.directory.sections if s.binding is Binding.TPM)
    m = tmp_path / "other" / "tpm.nvram"
    m.parent.mkdir(exist_ok=True)
    with Image.open(str(d.image), writable=True) as img:
        split(img, [tpm], str(m))
        old = m.read_bytes()
        img.put(tpm, b"TPM state written after the copy")
    m.write_bytes(old)
    before = _digest(d.image, m)
    r = d.hook("prepare", "begin")
    assert r.returncode != 0, r.stderr
    assert b"member image 1" in r.stderr and b"older copy" in r.stderr, r.stderr
    assert _digest(d.image, m) == before
