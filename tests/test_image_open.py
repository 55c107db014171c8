"""Opening damaged, truncated and foreign files.

Header A sits at offset 0, header B at offset headerAreaSize; the valid copy
with the highest generation wins.  Nothing here may change the file: every
failing command (including the writable ``put``) is checked against the
file's SHA-256 before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from nvmgr.errors import CorruptError, DERError, ExitCode, ForeignImageError
from nvmgr.format import codec
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]

AREA = 65536  # header_area_for() of a small image
SPECS = [SectionSpec("vars", 65536, Binding.PFLASH), SectionSpec("tpm", 16384, Binding.TPM)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make(path: Path, *puts: tuple[str, bytes], header_area: int | None = None) -> Path:
    with Image.create(str(path), SPECS, header_area=header_area) as img:
        for name, data in puts:
            img.put(name, data)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    # create: A = gen 1, B = gen 2; the two puts: A = gen 3, B = gen 4.
    return _make(tmp_path / "vm.nvram", ("tpm", b"old"), ("tpm", b"new"))


def _headers(path: Path, area: int = AREA) -> list[tuple[int, int]]:
    """(offset, DER length) of header A and header B."""
    raw = path.read_bytes()
    return [(off, codec.header_length(raw[off:])) for off in (0, area)]


def _generation(path: Path, slot: int, area: int = AREA) -> int:
    off, n = _headers(path, area)[slot]
    return codec.decode_header(path.read_bytes()[off : off + n], padded=False).generation


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# Ways to damage one header copy, each given (path, offset of the copy, DER length).
def _flip_digest(path: Path, off: int, n: int) -> None:
    _patch(path, off + n - 1, bytes([path.read_bytes()[off + n - 1] ^ 0x01]))


def _flip_uuid(path: Path, off: int, n: int) -> None:
    # Inside the directory: the digest no longer matches.
    raw = path.read_bytes()
    at = off + raw[off : off + n].index(b"\x04\x10") + 2
    _patch(path, at, bytes([raw[at] ^ 0xFF]))


def _indefinite_length(path: Path, off: int, n: int) -> None:
    # 30 81 xx | 30 81 yy ...: the directory's length form 81 becomes 80 (BER's
    # indefinite length, which DER forbids).
    raw = path.read_bytes()
    assert raw[off + 3 : off + 5] == b"\x30\x81"
    _patch(path, off + 4, b"\x80")


def _junk_in_padding(path: Path, off: int, n: int) -> None:
    _patch(path, off + AREA - 1, b"\x01")


def _zero(path: Path, off: int, n: int) -> None:
    _patch(path, off, bytes(AREA))


def _zero_tail(path: Path, off: int, n: int) -> None:
    # The digest and the directory's last bytes read as zeros (a torn write).
    _patch(path, off + n - 40, bytes(40))


DAMAGE: dict[str, tuple[Callable[[Path, int, int], None], str]] = {
    "digest": (_flip_digest, "header digest does not match"),
    "directory-byte": (_flip_uuid, "header digest does not match"),
    "indefinite-length": (_indefinite_length, "indefinite length"),
    "junk-in-padding": (_junk_in_padding, "non-zero bytes after the directory"),
    "zeroed-tail": (_zero_tail, "DER: length missing"),
}


def _damage(path: Path, slot: int, how: str) -> None:
    off, n = _headers(path)[slot]
    DAMAGE[how][0](path, off, n)


def _assert_cli_fails(nvmgr: RunCli, path: Path, code: ExitCode, message: str,
                      *commands: list[str], tmp_path: Path, error: str | None = None) -> None:
    """Each command exits *code*, names *message* (and the error class *error* in its
    JSON), prints no traceback and leaves the file's bytes as they were.

    By default: ``info`` and the writable ``put``.
    """
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"payload")
    before = _sha(path)
    for cmd in commands or (["info"], ["put", "tpm", "PAYLOAD"]):
        args = [cmd[0], str(path), *[str(payload) if a == "PAYLOAD" else a for a in cmd[1:]]]
        res = nvmgr(*args, "--output", "json")
        err = res.stderr.decode()
        assert res.returncode == int(code), (cmd, err)
        assert message in err, (cmd, err)
        assert "Traceback" not in err, err
        reported = json.loads(res.stdout)
        assert reported["exit_code"] == int(code)
        if error is not None:
            assert reported["error"] == error, (cmd, reported)
        assert _sha(path) == before, f"nvmgr {cmd[0]} modified the file"


# --------------------------------------------------------------- the healthy baseline


def test_healthy_image_opens_from_the_newest_copy(image: Path, nvmgr: RunCli) -> None:
    assert [_generation(image, 0), _generation(image, 1)] == [3, 4]
    with Image.open(str(image)) as img:
        assert img.directory.generation == 4
        assert img.get("tpm") == b"new"
        assert [h.error for h in img.headers] == [None, None]
        report = img.check()
        assert report.ok and report.warnings == []
    res = nvmgr("info", image, "--output", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["generation"] == 4


# --------------------------------------------------------------- truncated images


@pytest.mark.parametrize("cut", [1, 16384])
def test_truncated_below_image_size(image: Path, nvmgr: RunCli, tmp_path: Path, cut: int) -> None:
    size = image.stat().st_size
    os.truncate(image, size - cut)
    with pytest.raises(CorruptError, match=rf"image is truncated: {size - cut} bytes, "
                                           rf"its directory needs {size}"):
        Image.open(str(image))
    with pytest.raises(CorruptError, match="truncated"):
        Image.open(str(image), writable=True)
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "truncated", tmp_path=tmp_path,
                      error="CorruptError")


def test_truncated_to_the_header_areas(image: Path, nvmgr: RunCli, tmp_path: Path) -> None:
    os.truncate(image, 2 * AREA)  # both headers intact, no section data at all
    with pytest.raises(CorruptError, match="truncated") as info:
        Image.open(str(image))
    assert not isinstance(info.value, ForeignImageError | DERError)
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "truncated", ["check"], ["get", "tpm"],
                      tmp_path=tmp_path, error="CorruptError")


@pytest.mark.parametrize("size", [0, 2 * AREA - 1])
def test_truncated_below_two_header_areas(image: Path, nvmgr: RunCli, tmp_path: Path,
                                          size: int) -> None:
    os.truncate(image, size)
    with pytest.raises(ForeignImageError, match=rf"{size} bytes is smaller than two header"):
        Image.open(str(image))
    with pytest.raises(ForeignImageError):
        Image.open(str(image), writable=True)
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "not an nvmgr image", tmp_path=tmp_path,
                      error="ForeignImageError")


# --------------------------------------------------------------- foreign files


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def _ext4ish() -> bytes:
    # 1 KiB boot block, then a superblock: inode/block counts, log block size,
    # the 0xEF53 magic at 0x38, a UUID and a volume name; the rest zeros.
    sb = bytearray(1024)
    struct.pack_into("<IIIII", sb, 0, 128, 1024, 51, 900, 117)
    struct.pack_into("<I", sb, 0x18, 2)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    sb[0x68:0x78] = bytes(range(16))
    sb[0x78:0x80] = b"rootfs\x00\x00"
    return bytes(1024) + bytes(sb) + bytes((1 << 20) - 2048)


def _qcow2_header_with_junk() -> bytes:
    # QFI\xfb, version 3, then junk where the cluster bits and tables belong.
    rng = random.Random(7)
    return b"QFI\xfb\x00\x00\x00\x03" + rng.randbytes(256 * 1024)


FOREIGN: dict[str, Callable[[], bytes]] = {
    "zeros": lambda: bytes(1 << 20),
    "random": lambda: random.Random(1).randbytes(1 << 20),
    "ext4ish": _ext4ish,
    "png": _png,
    "png-padded": lambda: _png() + random.Random(3).randbytes(300_000),
    # Start like other DER/BER formats: a SEQUENCE, but no nvmgr OID.
    "der-sequence": lambda: b"\x30\x82\x01\x00" + random.Random(4).randbytes(3 * AREA),
    "der-non-minimal-length": lambda: bytes.fromhex("308200ff") + bytes(3 * AREA),
    # BER CMS SignedData (what openssl smime writes): indefinite lengths.
    "ber-cms": lambda: bytes.fromhex("3080 06092a864886f70d010702 a080 3080 020101")
    + random.Random(6).randbytes(3 * AREA),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_file(tmp_path: Path, nvmgr: RunCli, kind: str) -> None:
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(FOREIGN[kind]())
    with pytest.raises(ForeignImageError, match="not an nvmgr image"):
        Image.open(str(path))
    with pytest.raises(ForeignImageError):
        Image.open(str(path), writable=True)
    _assert_cli_fails(nvmgr, path, ExitCode.CORRUPT, "not an nvmgr image", tmp_path=tmp_path,
                      error="ForeignImageError")


def test_foreign_qcow2_with_junk_content(tmp_path: Path, nvmgr: RunCli) -> None:
    """A real qcow2 (QEMU opens it) whose guest content is junk."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or shutil.which("qemu-storage-daemon") is None:
        pytest.skip("QEMU tools are not installed")
    raw = tmp_path / "junk.raw"
    raw.write_bytes(random.Random(5).randbytes(512 * 1024))
    path = tmp_path / "junk.qcow2"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True, capture_output=True)
    with pytest.raises(ForeignImageError, match="not an nvmgr image"):
        Image.open(str(path))
    _assert_cli_fails(nvmgr, path, ExitCode.CORRUPT, "not an nvmgr image", tmp_path=tmp_path,
                      error="ForeignImageError")


def test_foreign_qcow2_looking_header_with_junk(tmp_path: Path, nvmgr: RunCli) -> None:
    """QCOW2's magic, then junk: QEMU refuses it, nvmgr reports a corrupt file (exit 4),
    not a tool failure, and neither ``info`` nor ``put`` writes to it."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("QEMU tools are not installed")
    path = tmp_path / "fake.qcow2"
    path.write_bytes(_qcow2_header_with_junk())
    with pytest.raises(CorruptError):
        Image.open(str(path))
    _assert_cli_fails(nvmgr, path, ExitCode.CORRUPT, "qcow2", tmp_path=tmp_path)


# --------------------------------------------------------------- one copy damaged


@pytest.mark.parametrize("how", list(DAMAGE))
def test_header_a_damaged_b_used(image: Path, nvmgr: RunCli, how: str) -> None:
    _damage(image, 0, how)
    before = _sha(image)
    with Image.open(str(image)) as img:
        assert img.directory.generation == 4  # B's
        assert img.get("tpm") == b"new"
        assert img.headers[1].error is None
        report = img.check()  # verifies both copies
    assert report.ok
    assert report.headers[0].error is not None and DAMAGE[how][1] in report.headers[0].error
    assert report.headers[1].error is None and report.headers[1].generation == 4
    assert any(w.startswith("header copy A is unusable") for w in report.warnings)
    assert not any("header copy B" in w for w in report.warnings)
    assert _sha(image) == before
    if how == "digest":
        # Read-only commands work and do not repair (or otherwise touch) the file.
        res = nvmgr("check", image, "--output", "json")
        assert res.returncode == 0, res.stderr
        assert any("header copy A" in w for w in json.loads(res.stdout)["warnings"])
        res = nvmgr("get", image, "tpm")
        assert res.returncode == 0 and res.stdout == b"new", res.stderr
        assert _sha(image) == before


@pytest.mark.parametrize("how", list(DAMAGE))
def test_header_b_damaged_a_used(image: Path, nvmgr: RunCli, how: str) -> None:
    _damage(image, 1, how)
    before = _sha(image)
    with Image.open(str(image)) as img:
        assert img.directory.generation == 3  # A's
        assert img.get("tpm") == b"old"
        assert img.headers[0].error is None
        report = img.check()  # verifies both copies
    assert report.ok
    assert report.headers[0].error is None and report.headers[0].generation == 3
    assert report.headers[1].error is not None and DAMAGE[how][1] in report.headers[1].error
    assert any(w.startswith("header copy B is unusable") for w in report.warnings)
    if how == "digest":
        res = nvmgr("get", image, "tpm")
        assert res.returncode == 0 and res.stdout == b"old", res.stderr
    assert _sha(image) == before


def test_header_a_zeroed_b_found_by_probing(tmp_path: Path) -> None:
    # A larger header area: with A gone, B is found by probing each allowed size.
    area = 4 * AREA
    path = _make(tmp_path / "big.nvram", ("tpm", b"v0"), ("tpm", b"v1"), header_area=area)
    _patch(path, 0, bytes(area))
    with Image.open(str(path)) as img:
        assert img.directory.header_area == area
        assert img.headers[1].offset == area
        assert img.get("tpm") == b"v1"
        assert img.check().headers[0].error == "no nvmgr directory here"


def test_b_at_the_wrong_offset_is_not_used(tmp_path: Path) -> None:
    # A copy of B placed where a smaller header area would put it is refused.
    area = 2 * AREA
    path = _make(tmp_path / "big.nvram", header_area=area)
    raw = bytearray(path.read_bytes())
    b = bytes(raw[area : 2 * area])
    raw[0:area] = bytes(area)
    raw[AREA : AREA + AREA] = b[:AREA]
    raw[area : 2 * area] = bytes(area)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptError):
        Image.open(str(path))
    # Put back where it belongs, the same copy opens.
    raw[AREA : 2 * AREA] = bytes(AREA)
    raw[area : 2 * area] = b
    path.write_bytes(bytes(raw))
    with Image.open(str(path)) as img:
        assert img.headers[1].offset == area


def test_put_after_a_damaged_repairs_a(image: Path) -> None:
    _damage(image, 0, "digest")
    with Image.open(str(image), writable=True) as img:
        img.put("tpm", b"newer")
        assert img.directory.generation == 5
    assert _generation(image, 0) == 5
    with Image.open(str(image)) as img:
        assert img.get("tpm") == b"newer"
        assert [h.error for h in img.headers] == [None, None]
        assert img.check().warnings == []


# --------------------------------------------------------------- both copies damaged


@pytest.mark.parametrize(("how_a", "how_b"), [
    ("digest", "digest"),
    ("indefinite-length", "junk-in-padding"),
    ("directory-byte", "zeroed-tail"),
])
def test_both_damaged(image: Path, nvmgr: RunCli, tmp_path: Path, how_a: str, how_b: str) -> None:
    _damage(image, 0, how_a)
    _damage(image, 1, how_b)
    with pytest.raises(DERError, match=r"both header copies are damaged \(A: .*; B: .*\)") as info:
        Image.open(str(image))
    assert DAMAGE[how_a][1] in str(info.value).split("; B:")[0]
    with pytest.raises(DERError):
        Image.open(str(image), writable=True)
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "both header copies are damaged",
                      ["info"], ["check"], ["put", "tpm", "PAYLOAD"], tmp_path=tmp_path,
                      error="DERError")


@pytest.mark.parametrize("how_a", ["zero", "digest"])
def test_both_damaged_names_b_defect(image: Path, how_a: str) -> None:
    # B's own defect is reported even when A is unreadable and B is found by
    # probing the allowed header area sizes (the last offset probed holds zeros).
    _damage(image, 1, "digest")
    off, n = _headers(image)[0]
    (_zero if how_a == "zero" else _flip_digest)(image, off, n)
    with pytest.raises(DERError, match=r"B: header digest does not match"):
        Image.open(str(image))


def test_a_zeroed_and_b_damaged_is_refused_without_writing(
    image: Path, nvmgr: RunCli, tmp_path: Path
) -> None:
    _damage(image, 1, "digest")
    _zero(image, 0, 0)
    with pytest.raises(CorruptError):
        Image.open(str(image))
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "image", tmp_path=tmp_path)


def test_newer_a_with_bad_digest_loses_to_older_b(image: Path, nvmgr: RunCli) -> None:
    with Image.open(str(image), writable=True) as img:
        img.put("tpm", b"newer")  # A = gen 5 holds "newer"; B = gen 4 holds "new"
    assert [_generation(image, 0), _generation(image, 1)] == [5, 4]
    _damage(image, 0, "digest")
    before = _sha(image)
    with Image.open(str(image)) as img:
        assert img.directory.generation == 4
        assert img.get("tpm") == b"new"
        assert "header digest does not match" in (img.check().headers[0].error or "")
    res = nvmgr("get", image, "tpm")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"new"
    assert _sha(image) == before


def test_both_copies_zeroed_is_foreign(image: Path, nvmgr: RunCli, tmp_path: Path) -> None:
    _patch(image, 0, bytes(2 * AREA))
    with pytest.raises(ForeignImageError, match=r"no directory in either header copy"):
        Image.open(str(image))
    _assert_cli_fails(nvmgr, image, ExitCode.CORRUPT, "not an nvmgr image", tmp_path=tmp_path,
                      error="ForeignImageError")
