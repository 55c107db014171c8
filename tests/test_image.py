"""The image core through the library: sections, commits, keys, growth, check."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.errors import (
    BusyError,
    CorruptError,
    KeyRequiredError,
    NoSpaceError,
    NotFoundError,
    UsageError,
    WrongKeyError,
)
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import LUKS_HEADER_SIZE, Binding
from nvmgr.image.image import Image

FORMATS = ["raw", "qcow2"]
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def specs() -> list[SectionSpec]:
    return [
        SectionSpec("efivars", 540672, Binding.PFLASH),
        SectionSpec("tpm-permall", 64 * 1024, Binding.TPM),
        SectionSpec("nic0-eeprom", 256, Binding.OPAQUE, device="net0"),
    ]


def kek() -> Kek:
    return Kek(os.urandom(32), "test")


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        b = f.read()[offset]
        f.seek(offset)
        f.write(bytes([b ^ 0x40]))


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_new_image_has_empty_sections_and_two_header_copies(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs(), fmt=fmt) as img:
        assert [s.name for s in img.directory.sections] == ["efivars", "tpm-permall", "nic0-eeprom"]
        assert all(s.length == 0 for s in img.directory.sections)
    with Image.open(path) as img:
        assert [h.error for h in img.headers] == [None, None]
        assert {h.generation for h in img.headers} == {1, 2}
        assert img.check().ok
        assert img.get("nic0-eeprom") == b""


def test_put_get_round_trip_every_binding(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / "vm.nvram")
    vars_blob = OVMF_VARS.read_bytes()
    tpm = os.urandom(6110)
    eeprom = os.urandom(256)
    with Image.create(path, specs(), fmt=fmt) as img:
        img.put("efivars", vars_blob)
        img.put("tpm-permall", tpm)
        img.put("nic0-eeprom", eeprom)
    with Image.open(path) as img:
        assert img.get("efivars") == vars_blob
        assert img.get("tpm-permall") == tpm
        assert img.get("nic0-eeprom") == eeprom
        s = img.section("tpm-permall")
        assert s.length == len(tpm) and s.crc32 == zlib.crc32(tpm)


def test_live_section_stays_at_its_offset_across_puts(tmp_path: Path) -> None:
    """QEMU's slice offset is baked into the domain: a put must not move it."""
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        before = img.section("efivars").offset
        img.put("efivars", b"\x01" * 540672)
        img.put("efivars", b"\x02" * 540672)
        s = img.section("efivars")
        assert (s.offset, s.home) == (before, None)
    raw = Path(path).read_bytes()
    assert raw[before : before + 540672] == b"\x02" * 540672


def test_ordinary_section_alternates_slots_and_keeps_old_bytes_until_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        first = img.put("nic0-eeprom", b"A" * 100).offset
        second = img.put("nic0-eeprom", b"B" * 100).offset
        assert first != second
        assert img.section("nic0-eeprom").spare == first


def test_data_larger_than_capacity_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        img.put("nic0-eeprom", b"x" * 10)
    before = Path(path).read_bytes()
    with Image.open(path, writable=True) as img, pytest.raises(NoSpaceError, match="capacity 256"):
        img.put("nic0-eeprom", b"x" * 257)
    assert Path(path).read_bytes() == before


def test_unknown_section_is_not_found(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    Image.create(path, specs()).close()
    with Image.open(path) as img, pytest.raises(NotFoundError, match="no section named 'nope'"):
        img.get("nope")


def test_second_writer_is_busy_and_waiting_writer_gets_in(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / "vm.nvram")
    Image.create(path, specs(), fmt=fmt).close()
    first = Image.open(path, writable=True)
    try:
        with pytest.raises(BusyError, match="another nvmgr process holds the image"):
            Image.open(path, writable=True)
    finally:
        first.close()
    with Image.open(path, writable=True, wait=1.0) as img:
        img.put("nic0-eeprom", b"ok")


def test_encrypted_sections_wrong_key_missing_key_and_corruption_differ(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    k = kek()
    secret = os.urandom(5000)
    with Image.create(path, specs(), kek=k) as img:
        assert img.section("tpm-permall").encrypted
        assert not img.section("efivars").encrypted  # QEMU reads it live
        img.put("tpm-permall", secret)
    assert secret not in Path(path).read_bytes()
    with Image.open(path) as img, pytest.raises(KeyRequiredError):
        img.get("tpm-permall")
    with Image.open(path, kek=kek()) as img, pytest.raises(WrongKeyError, match="not one of"):
        img.get("tpm-permall")
    with Image.open(path, kek=k) as img:
        assert img.get("tpm-permall") == secret
        off = img.section("tpm-permall").offset
    _flip_byte(path, off + 17)
    with Image.open(path, kek=k) as img:
        with pytest.raises(CorruptError, match="section tpm-permall is corrupted"):
            img.get("tpm-permall")
        report = img.check()
        assert not report.ok and "tpm-permall" in report.errors[0]


def test_mac_catches_corruption_the_crc_was_recomputed_for(tmp_path: Path) -> None:
    """A forged crc32 does not fool the MAC: tampering reads as corruption, not a wrong key."""
    path = str(tmp_path / "vm.nvram")
    k = kek()
    with Image.create(path, specs(), kek=k) as img:
        img.put("tpm-permall", b"secret" * 100)
        s = img.section("tpm-permall")
        ct = bytearray(img.container.read(s.offset, s.stored_length))
        ct[3] ^= 1
        img.container.write(s.offset, bytes(ct))
        new = img._copy_dir()
        ns = new.find("tpm-permall")
        assert ns is not None
        ns.crc32 = zlib.crc32(bytes(ct))
        img._commit(new)
    with Image.open(path, kek=k) as img:
        with pytest.raises(CorruptError, match="MAC mismatch"):
            img.get("tpm-permall")
        assert not img.check().ok


def test_rekey_replaces_the_key_without_rewriting_section_data(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    old, new = kek(), kek()
    with Image.create(path, specs(), kek=old) as img:
        img.put("tpm-permall", b"state" * 50)
        s = img.section("tpm-permall")
        stored = img.container.read(s.offset, s.stored_length)
    with Image.open(path, writable=True, kek=old) as img:
        img.rekey(new)
        s = img.section("tpm-permall")
        assert img.container.read(s.offset, s.stored_length) == stored
    with Image.open(path, kek=new) as img:
        assert img.get("tpm-permall") == b"state" * 50
    with Image.open(path, kek=old) as img, pytest.raises(WrongKeyError):
        img.get("tpm-permall")


def test_rekey_needs_an_encrypted_image_and_its_key(tmp_path: Path) -> None:
    # Errors with context, not asserts (which python -O would strip).
    plain, enc = str(tmp_path / "plain.nvram"), str(tmp_path / "enc.nvram")
    Image.create(plain, specs()).close()
    Image.create(enc, specs(), kek=kek()).close()
    with Image.open(plain, writable=True) as img:
        with pytest.raises(UsageError, match="not encrypted") as ei:
            img.rekey(kek())
        assert ei.value.image == plain
    with Image.open(enc, writable=True) as img:
        with pytest.raises(KeyRequiredError) as kei:
            img.rekey(kek())
        assert kei.value.image == enc


def test_put_refuses_a_section_without_a_spare_slot(tmp_path: Path) -> None:
    # A valid directory may list a non-live section without its second slot;
    # put has nowhere crash-safe to write and says so.
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        new = img._copy_dir()
        ns = new.find("nic0-eeprom")
        assert ns is not None
        ns.spare = None
        img._commit(new)
    with Image.open(path, writable=True) as img:
        with pytest.raises(CorruptError, match="section nic0-eeprom has no spare slot") as ei:
            img.put("nic0-eeprom", b"x")
        assert (ei.value.image, ei.value.section) == (path, "nic0-eeprom")
        assert img.get("nic0-eeprom") == b""


def test_two_key_slots_for_rotation(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    a, b = kek(), kek()
    with Image.create(path, specs(), kek=a) as img:
        img.put("nic0-eeprom", b"e" * 200)
        img.rekey(b, keep_old=True)
        assert len(img.directory.key_slots or []) == 2
    for k in (a, b):
        with Image.open(path, kek=k) as img:
            assert img.get("nic0-eeprom") == b"e" * 200
    with Image.open(path, writable=True, kek=b) as img:
        img.remove_key(a.key_id)
        with pytest.raises(UsageError, match="last key slot"):
            img.remove_key(b.key_id)


def test_grow_adds_sections_without_moving_existing_ones(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs(), fmt=fmt) as img:
        img.put("efivars", b"v" * 540672)
        img.put("nic0-eeprom", b"n" * 256)
        before = {s.name: s.offset for s in img.directory.sections}
        size = img.directory.image_size
        img.add_sections([SectionSpec("pci-vpd", 32 * 1024, Binding.FWCFG),
                          SectionSpec("nvram2", 8192, Binding.BLOCK)])
        assert img.directory.image_size > size
        assert img.container.size() >= img.directory.image_size
        assert {s.name: s.offset for s in img.directory.sections if s.name in before} == before
        img.put("nvram2", b"b" * 8192)
    with Image.open(path) as img:
        assert img.check().ok
        assert img.get("efivars") == b"v" * 540672
        assert img.get("nvram2") == b"b" * 8192


def test_resize_moves_an_ordinary_section_and_keeps_its_data(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        img.put("nic0-eeprom", b"q" * 256)
        img.resize_section("nic0-eeprom", 64 * 1024)
        img.put("nic0-eeprom", b"r" * 60000)
        with pytest.raises(NoSpaceError, match="cannot grow"):
            img.resize_section("efivars", 2 << 20)
    with Image.open(path) as img:
        assert img.get("nic0-eeprom") == b"r" * 60000
        assert img.check().ok


def test_in_use_live_sections_are_reported_not_failed_and_reseal_clears(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        img.put("efivars", b"\0" * 540672)
        img.set_in_use(["efivars"], True)
        off = img.section("efivars").offset
    with open(path, "r+b") as f:  # what QEMU does while the VM runs
        f.seek(off + 4096)
        f.write(b"written by the guest")
    with Image.open(path, writable=True) as img:
        report = img.check()
        assert report.ok and any("in use" in w for w in report.warnings)
        assert img.reseal() == ["efivars"]
        assert not img.section("efivars").dirty
        assert img.check().ok
        assert b"written by the guest" in img.get("efivars")


def test_remove_drops_a_section(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.nvram")
    with Image.create(path, specs()) as img:
        img.remove("nic0-eeprom")
        assert img.directory.find("nic0-eeprom") is None
    with Image.open(path) as img:
        assert [s.name for s in img.directory.sections] == ["efivars", "tpm-permall"]


def test_create_refuses_to_overwrite(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "vm.nvram"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        Image.create(str(path), specs(), fmt=fmt)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "x" * 65, "-lead", "a..b", "sp ace"])
def test_bad_section_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid section name"):
        SectionSpec(name, 4096)


@pytest.mark.parametrize("size", [0, -1, 1 << 41])
def test_bad_sizes_are_refused(size: int) -> None:
    with pytest.raises(UsageError, match="outside"):
        SectionSpec("ok", size)


def test_live_sections_must_be_sector_multiples_and_count_their_luks_header() -> None:
    with pytest.raises(UsageError, match="multiple of 512"):
        SectionSpec("vars", 1000, Binding.PFLASH)
    with pytest.raises(UsageError, match="must count the 2,068,480-byte LUKS header"):
        SectionSpec("vars", 4096, Binding.PFLASH, encrypted=True)
    s = SectionSpec("vars", 4096 + LUKS_HEADER_SIZE, Binding.PFLASH, encrypted=True)
    assert s.reserved == 4096 + LUKS_HEADER_SIZE  # no cipher padding: QEMU's LUKS


def _file_reads(monkeypatch: pytest.MonkeyPatch, img: Image) -> list[tuple[int, int]]:
    """Every read of the raw image's file from now on, as (offset, length): single
    reads and each piece of a long one."""
    reads: list[tuple[int, int]] = []
    f = img.container._file  # type: ignore[attr-defined]
    real_read, real_pieces = f.read, f.pieces

    def read(off: int, n: int) -> bytes:
        reads.append((off, n))
        return real_read(off, n)  # type: ignore[no-any-return]

    def pieces(off: int, length: int, piece: int) -> Iterator[memoryview]:
        for p in real_pieces(off, length, piece):
            reads.append((off, len(p)))
            off += len(p)
            yield p

    monkeypatch.setattr(f, "read", read)
    monkeypatch.setattr(f, "pieces", pieces)
    return reads


def test_get_to_unverified_first_reads_once_and_raises_after_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verified_first=False (a sink published only on success): one pass whatever
    the size, bytes handed on as read, CorruptError at the end; encrypted sections
    are still checked before any byte goes out."""
    from nvmgr.image import image as image_mod

    monkeypatch.setattr(image_mod, "CHUNK", 4096)
    monkeypatch.setattr(image_mod, "ONE_PASS_MAX", 8192)  # two passes when verified first
    path = str(tmp_path / "vm.nvram")
    payload = os.urandom(5 * 4096 + 100)
    with Image.create(path, [SectionSpec("blob", 64 * 1024, Binding.OPAQUE)]) as img:
        img.put("blob", payload)
        offset = img.section("blob").offset
    with Image.open(path) as img:
        reads = _file_reads(monkeypatch, img)
        got: list[bytes] = []
        assert img.get_to("blob", lambda b: got.append(bytes(b)), verified_first=False) \
            == len(payload)
        assert b"".join(got) == payload
        assert sum(n for o, n in reads if offset <= o < offset + len(payload)) == len(payload)
    _flip_byte(path, offset + 5 * 4096 + 3)  # one flipped byte in the last piece
    with Image.open(path) as img:
        seen: list[bytes] = []
        with pytest.raises(CorruptError, match="section blob is corrupted"):
            img.get_to("blob", lambda b: seen.append(bytes(b)), verified_first=False)
        assert len(seen) == 6  # written, for the caller to throw away
    k = kek()
    enc = str(tmp_path / "enc.nvram")
    with Image.create(enc, [SectionSpec("blob", 64 * 1024, Binding.OPAQUE, encrypted=True)],
                      kek=k) as img:
        img.put("blob", payload)
        offset = img.section("blob").offset
    _flip_byte(enc, offset + 5 * 4096 + 3)
    with Image.open(enc, kek=k) as img:
        seen.clear()
        with pytest.raises(CorruptError, match="blob"):
            img.get_to("blob", lambda b: seen.append(bytes(b)), verified_first=False)
        assert seen == []  # no byte decrypted before the check


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
def test_get_to_reads_once_up_to_its_bound_and_writes_nothing_unverified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_pass: bool) -> None:
    """get_to streams in CHUNK pieces: sections up to ONE_PASS_MAX read once (the
    crc checked over each piece while the next is read), larger ones twice; either
    way a corrupted byte anywhere is found before *write* sees any byte."""
    from nvmgr.image import image as image_mod

    monkeypatch.setattr(image_mod, "CHUNK", 4096)
    monkeypatch.setattr(image_mod, "ONE_PASS_MAX", 1 << 20 if one_pass else 8192)
    path = str(tmp_path / "vm.nvram")
    payload = os.urandom(5 * 4096 + 100)  # six pieces, the last one short
    with Image.create(path, [SectionSpec("blob", 64 * 1024, Binding.OPAQUE)]) as img:
        img.put("blob", payload)
        offset = img.section("blob").offset
    with Image.open(path) as img:
        reads = _file_reads(monkeypatch, img)
        got: list[bytes] = []
        assert img.get_to("blob", lambda b: got.append(bytes(b))) == len(payload)
        assert b"".join(got) == payload
        assert len(got) == 6 and all(len(g) == 4096 for g in got[:5])
        in_blob = [r for r in reads if offset <= r[0] < offset + len(payload)]
        assert sum(n for _o, n in in_blob) == len(payload) * (1 if one_pass else 2)
    _flip_byte(path, offset + 3 * 4096 + 7)  # one flipped byte in the fourth piece
    with Image.open(path) as img:
        seen: list[bytes] = []
        with pytest.raises(CorruptError, match="section blob is corrupted"):
            img.get_to("blob", seen.append)
        assert seen == []
