"""Orphaned images (issue 9, part 2): the record in the image, the survey, adopt and fresh.

The record is the directory's ``orphaned [5]`` field (schemas/nvmgr.asn1).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nvmgr.errors import BusyError, DERError, OrphanedImageError
from nvmgr.format import asn1, codec
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding, Orphaned
from nvmgr.image.image import Image
from nvmgr.provision import orphans

SPECS = [SectionSpec("uefi-vars", 8192, Binding.PFLASH),
         SectionSpec("tpm-permall", 8192, Binding.TPM)]
OWNER = uuid.UUID("5c0a1e55-0000-4000-8000-000000000001")
NEW = uuid.UUID("5c0a1e55-0000-4000-8000-000000000002")


def _image(path: Path, owner: uuid.UUID | None = OWNER) -> Path:
    with Image.create(str(path), SPECS, domain_uuid=owner) as img:
        img.put("uefi-vars", b"vars" * 100)
        img.put("tpm-permall", b"tpm state")
    return path


def _headers(path: Path) -> tuple[bytes, bytes]:
    with Image.open(str(path)) as img:
        area = img.directory.header_area
    raw = path.read_bytes()
    return raw[:area], raw[area:2 * area]


def test_the_record_is_in_both_header_copies(tmp_path: Path) -> None:
    p = _image(tmp_path / "vm1.nvram")
    assert codec.decode_header(_headers(p)[0]).orphaned is None
    assert orphans.mark_orphaned(str(p), str(OWNER), "vm1", when=1_764_590_000)
    for copy in _headers(p):
        d = codec.decode_header(copy)
        assert d.orphaned == Orphaned(1_764_590_000, "vm1") and d.domain_uuid == OWNER
        assert asn1.decode_header(copy) == d  # the pyasn1 reference agrees
    with Image.open(str(p)) as img:  # the state is untouched
        assert img.get("uefi-vars") == b"vars" * 100 and img.get("tpm-permall") == b"tpm state"
        assert img.check().ok
    # Recorded once: the first time stays.
    assert not orphans.mark_orphaned(str(p), str(OWNER), "vm1", when=1_900_000_000)
    assert orphans.record_of(str(p)) == Orphaned(1_764_590_000, "vm1")


def test_only_the_owner_named_is_recorded(tmp_path: Path) -> None:
    p = _image(tmp_path / "vm1.nvram")
    assert not orphans.mark_orphaned(str(p), str(NEW), "other")  # adopted meanwhile
    assert not orphans.mark_orphaned(str(tmp_path / "gone.nvram"), str(OWNER), "vm1")
    assert orphans.record_of(str(p)) is None


def test_an_orphan_record_without_an_owner_is_refused(tmp_path: Path) -> None:
    p = _image(tmp_path / "x.nvram", None)
    with Image.open(str(p)) as img:
        d = img.directory
    d.orphaned = Orphaned(0, None)
    with pytest.raises(DERError, match="orphan record without an owner"):
        codec.encode_header(d)


def test_adopt_gives_the_same_image_a_new_owner(tmp_path: Path) -> None:
    p = _image(tmp_path / "vm1.nvram")
    with Image.open(str(p)) as img:
        image_uuid = img.directory.image_uuid
    orphans.mark_orphaned(str(p), str(OWNER), "vm1")
    assert orphans.adopt(str(p), NEW) == image_uuid  # the same image, a new owner
    for copy in _headers(p):  # in both header copies, the record gone
        d = codec.decode_header(copy)
        assert (d.domain_uuid, d.orphaned) == (NEW, None)
    with Image.open(str(p)) as img:
        assert img.directory.domain_uuid == NEW and img.directory.image_uuid == image_uuid
        assert img.get("uefi-vars") == b"vars" * 100 and img.get("tpm-permall") == b"tpm state"
        assert img.check().ok


def test_move_aside_keeps_the_image_and_names_it(tmp_path: Path) -> None:
    p = _image(tmp_path / "vm1.nvram")
    before = p.read_bytes()
    dst = orphans.move_aside(str(p), OWNER)
    assert not p.exists() and Path(dst).parent == tmp_path
    assert Path(dst).name.startswith("vm1.orphan-") and dst.endswith(".nvram")
    record = orphans.record_of(dst)  # recorded on the way, if it was not
    assert record is not None and record.domain_name is None
    with Image.open(dst) as img:
        assert img.get("uefi-vars") == b"vars" * 100 and img.get("tpm-permall") == b"tpm state"
    assert len(Path(dst).read_bytes()) == len(before)
    # A second orphan moved aside in the same second gets its own name.
    _image(p)
    dst2 = orphans.move_aside(str(p), OWNER)
    assert dst2 != dst and Path(dst).exists() and Path(dst2).exists()


def test_move_aside_waits_for_no_one_it_cannot_get(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p = _image(tmp_path / "vm1.nvram")
    monkeypatch.setattr(orphans, "LOCK_WAIT", 0.0)
    with Image.open(str(p), writable=True), pytest.raises(BusyError):
        orphans.move_aside(str(p), OWNER)
    assert p.exists()  # nothing moved while another writer held it


def test_survey_states(tmp_path: Path) -> None:
    for n, owner in enumerate(("a", "b", "c", "d"), 1):
        _image(tmp_path / f"{owner}.nvram", uuid.UUID(int=n))
    _image(tmp_path / "e.nvram", None)
    orphans.mark_orphaned(str(tmp_path / "c.nvram"), str(uuid.UUID(int=3)), "gone-vm", when=0)
    (tmp_path / "notes.txt").write_text("not an image")
    broken = _image(tmp_path / "f.nvram", uuid.UUID(int=5))
    raw = bytearray(broken.read_bytes())
    area = len(_headers(broken)[0])
    for at in (60, area + 60):  # inside each copy's directory: both digests fail
        raw[at] ^= 0xFF
    broken.write_bytes(bytes(raw))
    (tmp_path / ".hidden").write_bytes(b"")
    found = orphans.survey(orphans.candidates([str(tmp_path)]),
                           {str(uuid.UUID(int=1)): ("vm-a", True),
                            str(uuid.UUID(int=2)): ("vm-b", False)})
    by = {Path(e.path).name: e for e in found}
    assert set(by) == {"a.nvram", "b.nvram", "c.nvram", "d.nvram", "e.nvram", "f.nvram"}
    assert (by["a.nvram"].state, by["a.nvram"].domain) == ("running", "vm-a")
    assert (by["b.nvram"].state, by["b.nvram"].domain) == ("defined", "vm-b")
    assert (by["c.nvram"].state, by["c.nvram"].domain,
            by["c.nvram"].orphaned_since) == ("orphaned", "gone-vm", "1970-01-01T00:00:00Z")
    assert (by["d.nvram"].state, by["d.nvram"].orphaned_since) == ("orphaned", None)
    assert by["d.nvram"].domain_uuid == str(uuid.UUID(int=4))
    assert by["e.nvram"].state == "unowned"
    assert by["f.nvram"].state == "unreadable" and by["f.nvram"].error


def test_the_refusal_names_both_choices_and_not_the_bare_command() -> None:
    e = orphans.refusal("/i/vm1.nvram", OWNER, None, "vm1", "nvmgr define vm1.xml")
    assert isinstance(e, OrphanedImageError) and isinstance(e, BusyError)
    text = str(e)
    assert "'nvmgr define vm1.xml --adopt'" in text and "'nvmgr define vm1.xml --fresh'" in text
    assert f"domain {OWNER}, which no longer exists" in text
    assert "run nvmgr define" not in text
    text = str(orphans.refusal("/i/vm1.nvram", OWNER, Orphaned(0, "vm1"), "vm1",
                               "nvmgr reconcile vm1"))
    assert "domain vm1, undefined at 1970-01-01T00:00:00Z. Choose" in text
    assert "'nvmgr reconcile vm1 --adopt'" in text




def test_prepare_refuses_another_domains_image_naming_the_command_that_fixes_it(
        tmp_path: Path) -> None:
    """The hook's prepare (prepare_image) on an image another domain owns: a clone's
    refusal names 'nvmgr reconcile NAME'; an orphan's names its --adopt / --fresh;
    the owner itself, back, clears the record."""
    from nvmgr.domain.elements import parse_domain
    from nvmgr.domain.plan import plan_for
    from nvmgr.provision.prepare import prepare_image

    image = _image(tmp_path / "vm.nvram", OWNER)
    xml = """<domain type='qemu'><name>vm2</name><uuid>{u}</uuid><metadata>
      <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1" image='{i}'/></metadata>
      <memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>
      </domain>"""
    clone = plan_for(parse_domain(xml.format(u=NEW, i=image)))
    before = image.read_bytes()
    with pytest.raises(BusyError) as e:
        prepare_image(clone, kek=None, fmt="raw", path=str(image))
    assert not isinstance(e.value, OrphanedImageError)
    assert "run 'nvmgr reconcile vm2'" in str(e.value) and "nvmgr define" not in str(e.value)
    orphans.mark_orphaned(str(image), str(OWNER), "vm1", when=0)
    with pytest.raises(OrphanedImageError) as e:
        prepare_image(clone, kek=None, fmt="raw", path=str(image))
    assert "'nvmgr reconcile vm2 --adopt'" in str(e.value)
    assert "'nvmgr reconcile vm2 --fresh'" in str(e.value)
    assert orphans.record_of(str(image)) == Orphaned(0, "vm1")
    assert len(image.read_bytes()) == len(before)
    owner = plan_for(parse_domain(xml.format(u=OWNER, i=image)))
    img, _, _ = prepare_image(owner, kek=None, fmt="raw", path=str(image))
    img.close()
    assert orphans.record_of(str(image)) is None  # its own domain is back
