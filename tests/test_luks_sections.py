"""Live sections of an encrypted image are LUKS volumes inside their slot (issue 8, part 1).

QEMU's ``luks`` driver opens them on the raw slice as the VM runs; nvmgr
reads and writes them offline through qemu-img over anonymous memory files.
The passphrase is derived from the image's data key, never a KEK, and never
passes through argv, the environment or a persistent file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import RunCli, make_key

from nvmgr.crypto.cipher import Kek
from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.errors import CorruptError, ExitCode, KeyRequiredError, NoSpaceError, WrongKeyError
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import LUKS_HEADER_SIZE, Binding
from nvmgr.image.image import Image
from nvmgr.storage import qemu

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

PAYLOAD = 540672  # OVMF's 4M varstore
KEK = bytes(range(32))


def _image(path: Path, kek: Kek | None = None) -> Image:
    return Image.create(str(path), [
        SectionSpec("uefi-vars", PAYLOAD + LUKS_HEADER_SIZE, Binding.PFLASH, encrypted=True),
        SectionSpec("tpm", 4096, Binding.TPM),
    ], kek=kek or Kek(KEK))


def _vars() -> bytes:
    """A varstore-like payload: UTF-16 variable names, as OVMF stores them."""
    body = "BootOrder".encode("utf-16-le") + b"\x01\x00" + "Boot0001".encode("utf-16-le")
    return (body * (PAYLOAD // len(body) + 1))[:PAYLOAD]


def test_the_luks_header_size_is_what_this_qemu_img_writes() -> None:
    """LUKS_HEADER_SIZE is derived (8 slots of 64 x 4000 bytes, 4 KiB aligned,
    after one 4 KiB header block); measured here: qemu-img's payload offset."""
    vol = qemu.luks_volume(b"", 4096, b"0" * 64)
    assert vol[:6] == b"LUKS\xba\xbe"
    offset = int.from_bytes(vol[104:108], "big") * 512  # LUKS1 phdr: payload-offset, sectors
    assert offset == LUKS_HEADER_SIZE == 2_068_480
    assert len(vol) == LUKS_HEADER_SIZE + 4096


def test_put_get_round_trip_leaves_no_plaintext_in_the_image(tmp_path: Path) -> None:
    path = tmp_path / "i.nvram"
    data = _vars()
    with _image(path) as img:
        img.put("uefi-vars", data)
        s = img.section("uefi-vars")
        # the slot holds the whole volume: its length is the slice QEMU opens
        assert (s.luks, s.length, s.capacity, s.payload) == (
            True, PAYLOAD + LUKS_HEADER_SIZE, PAYLOAD + LUKS_HEADER_SIZE, PAYLOAD)
        assert s.crypto is None
        assert img.get("uefi-vars") == data
        img.put("uefi-vars", data[:1000])  # shorter: zero-padded to the payload
        assert img.get("uefi-vars") == data[:1000] + bytes(PAYLOAD - 1000)
        with pytest.raises(NoSpaceError, match="do not fit section uefi-vars \\(capacity 540672\\)"):
            img.put("uefi-vars", data + b"x")
        assert img.check().ok
    raw = path.read_bytes()
    assert "BootOrder".encode("utf-16-le") not in raw
    assert raw.count(b"LUKS\xba\xbe") == 2  # the slot, and the copy left in scratch


def test_the_passphrase_is_derived_from_the_data_key_not_the_kek(tmp_path: Path) -> None:
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", b"v1")
        phrase = img.luks_passphrase()
        assert len(phrase) == 64 and bytes.fromhex(phrase.decode()) != KEK
        assert KEK.hex().encode() != phrase
        new = Kek(bytes(range(1, 33)))
        img.rekey(new)  # only the wrapping of the data key changes
        assert img.luks_passphrase() == phrase
    with Image.open(str(path), kek=new) as img:
        assert img.get("uefi-vars")[:2] == b"v1"
    other = tmp_path / "other.nvram"
    with _image(other) as img:  # another image: another data key, another passphrase
        assert img.luks_passphrase() != phrase


def test_no_key_in_any_argv_or_environment(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real = qemu.run

    def spy(tool: str, args: list[str], **kw: object) -> qemu.Result:
        seen.append([tool, *args])
        return real(tool, args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(qemu, "run", spy)
    with _image(tmp_path / "i.nvram") as img:
        img.put("uefi-vars", _vars())
        img.get("uefi-vars")
        phrase = img.luks_passphrase().decode()
    assert seen
    for argv in seen:
        text = " ".join(argv)
        assert phrase not in text and KEK.hex() not in text
        assert "secret,id=k,file=/dev/fd/" in text  # the passphrase: from a memory file
    assert not any(phrase in v or KEK.hex() in v for v in os.environ.values())


def test_check_without_the_key_finds_corruption_of_the_ciphertext(tmp_path: Path,
                                                                 nvmgr: RunCli) -> None:
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", _vars())
        off = img.section("uefi-vars").offset
    r = nvmgr("check", path)
    assert r.returncode == 0, r.stderr
    assert b"LUKS volume not opened (no key)" in r.stdout
    with open(path, "r+b") as f:  # one byte of the payload's ciphertext
        f.seek(off + LUKS_HEADER_SIZE + 12345)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    r = nvmgr("check", path)
    assert r.returncode == ExitCode.CORRUPT
    assert b"section uefi-vars is corrupted (crc32" in r.stdout + r.stderr


def test_wrong_key_is_exit_5_and_corruption_exit_4(tmp_path: Path, nvmgr: RunCli) -> None:
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", _vars())
        off = img.section("uefi-vars").offset
    good = make_key(tmp_path / "good.key")
    good.write_bytes(KEK)
    bad = make_key(tmp_path / "bad.key")
    r = nvmgr("get", path, "uefi-vars", "--key-file", good, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == _vars()
    r = nvmgr("get", path, "uefi-vars", "--key-file", bad, "-o", tmp_path / "out2")
    assert r.returncode == ExitCode.WRONG_KEY, r.stderr
    r = nvmgr("get", path, "uefi-vars", "-o", tmp_path / "out3")
    assert r.returncode == ExitCode.KEY_REQUIRED, r.stderr
    with open(path, "r+b") as f:  # the LUKS header's key slot material
        f.seek(off + 8192)
        f.write(b"\xff" * 64)
    r = nvmgr("get", path, "uefi-vars", "--key-file", good, "-o", tmp_path / "out4")
    assert r.returncode == ExitCode.CORRUPT, r.stderr
    r = nvmgr("check", path, "--key-file", bad)
    assert r.returncode in (ExitCode.CORRUPT, ExitCode.WRONG_KEY)
    assert not (tmp_path / "out2").exists() or not (tmp_path / "out2").read_bytes()


def test_a_volume_replaced_under_a_valid_crc_is_corrupt_not_a_wrong_key(tmp_path: Path) -> None:
    """The KEK opened the key slots, so a volume that does not open with the
    passphrase derived from the data key is damaged or replaced (exit 4)."""
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", b"mine")
        s = img.section("uefi-vars")
        foreign = qemu.luks_volume(b"theirs", s.payload, b"f" * 64)
        img.container.write(s.offset, foreign)  # QEMU-side forgery: the crc resealed
        img.container.flush()
        img.reseal(["uefi-vars"])
        with pytest.raises(CorruptError, match="does not open with the image's key"):
            img.get("uefi-vars")
        report = img.check()
        assert not report.ok and "LUKS volume does not open" in report.errors[0]


def test_a_luks_section_forged_empty_is_refused_under_the_key(tmp_path: Path) -> None:
    """Its length is sealed by the directory MAC: nobody without the key makes
    nvmgr take it for empty (and refill it from the varstore template)."""
    from nvmgr.format import codec

    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", b"vars")
        d = img._copy_dir()
        mac = img.directory.mac
        area = d.header_area
    d.find("uefi-vars").length = 0  # type: ignore[union-attr]
    d.generation += 5
    blob = codec.encode_header(d, lambda _b: mac)  # type: ignore[arg-type, return-value]
    raw = bytearray(path.read_bytes())
    for off in (0, area):
        raw[off:off + area] = blob + bytes(area - len(blob))
    path.write_bytes(bytes(raw))
    with Image.open(str(path), kek=Kek(KEK)) as img, \
            pytest.raises(CorruptError, match="not authenticated"):
        img.get("uefi-vars")


def test_get_needs_the_key_and_wrong_key_is_wrong_key(tmp_path: Path) -> None:
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", b"x")
    with Image.open(str(path)) as img, pytest.raises(KeyRequiredError):
        img.get("uefi-vars")
    with Image.open(str(path), kek=Kek(bytes(32))) as img, pytest.raises(WrongKeyError):
        img.get("uefi-vars")


def test_convert_keeps_the_ciphertext_and_resize_is_refused(tmp_path: Path,
                                                           nvmgr: RunCli) -> None:
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", _vars())
    r = nvmgr("convert", path, tmp_path / "i.qcow2", "--format", "qcow2")
    assert r.returncode == 0, r.stderr
    with Image.open(str(tmp_path / "i.qcow2"), kek=Kek(KEK)) as img:
        assert img.get("uefi-vars") == _vars()
        assert img.check().ok
    with Image.open(str(path), writable=True, kek=Kek(KEK)) as img, \
            pytest.raises(Exception, match="cannot be resized"):
        img.resize_section("uefi-vars", PAYLOAD + LUKS_HEADER_SIZE + 4096)


# ----------------------------------------------------------------- the hook


def _hook_domain(tmp_path: Path) -> object:
    import hookdom

    key = make_key(tmp_path / "vm.key")
    return hookdom.wired_domain(tmp_path, "luks", key_file=key), key


def test_the_hook_stages_the_passphrase_for_qemu_and_started_removes_it(tmp_path: Path) -> None:
    d, key = _hook_domain(tmp_path)
    xml = d.xml  # type: ignore[attr-defined]
    args = parse_domain(xml).qemu_args
    # the QEMU command line names the key file, never a key
    assert f"secret,id=nvmgr-key,format=raw,file={qemuargs.key_path(d.uuid)}" in args  # type: ignore[attr-defined]
    assert any('"driver":"luks"' in a for a in args)
    assert f"pflash1={qemuargs.luks_node_name('uefi-vars')}" in args
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    keyfile = d.runtime_root / d.uuid / "image.key"  # type: ignore[attr-defined]
    st = keyfile.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    kek = Kek(key.read_bytes())
    with Image.open(str(d.image), kek=kek) as img:  # type: ignore[attr-defined]
        phrase = img.luks_passphrase()
        s = img.section("uefi-vars")
        assert s.luks and s.dirty  # in use: QEMU opens it now
        template = Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()
        assert img.get("uefi-vars") == template  # the first start put the template in
    assert keyfile.read_bytes() == phrase  # the passphrase, not the KEK
    secrets = (phrase.decode(), key.read_bytes().hex())
    assert not any(x in xml for x in secrets)
    log = (d.log.read_text() if d.log.exists() else "")  # type: ignore[attr-defined]
    assert not any(x in log for x in secrets)
    assert "BootOrder".encode("utf-16-le") not in Path(d.image).read_bytes()  # type: ignore[attr-defined]
    r = d.hook("started", "begin")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    assert not keyfile.exists()
    r = d.hook("release", "end")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    with Image.open(str(d.image), kek=kek) as img:  # type: ignore[attr-defined]
        assert img.check().ok and not img.section("uefi-vars").dirty


def test_no_key_file_is_written_onto_a_disk(tmp_path: Path) -> None:
    """A runtime root on a filesystem that reaches a disk (here /var/tmp): the
    start is refused with exit 11 naming the fix before anything is written;
    the same domain with its runtime root on tmpfs stages it."""
    import hookdom

    from nvmgr.provision import staging

    disk = Path(tempfile.mkdtemp(prefix="nvmgr-test-disk-run-", dir="/var/tmp"))
    try:
        if staging.filesystem_of(disk) in staging.VOLATILE_FILESYSTEMS:
            pytest.skip("/var/tmp is a tmpfs on this machine")
        assert staging.filesystem_of(hookdom.volatile_dir("probe")) == "tmpfs"
        d, _key = _hook_domain(tmp_path)
        d.runtime_root = disk  # type: ignore[attr-defined]
        r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
        assert r.returncode == ExitCode.INSTALLATION, r.stderr.decode()
        err = r.stderr.decode()
        assert f"refusing to write a key under {disk}" in err and "mount -t tmpfs" in err
        assert not list(disk.rglob("*")) and not d.image.exists()  # type: ignore[attr-defined]
        r = d.hook("release", "end")  # libvirtd's answer to the refused start
        assert r.returncode == 0, r.stderr.decode()
        d.runtime_root = hookdom.volatile_dir("run")  # type: ignore[attr-defined]
        r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
        assert r.returncode == 0, r.stderr.decode()
        assert (d.runtime_root / d.uuid / "image.key").exists()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def test_a_plaintext_live_section_under_a_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    """An image made before live sections were encrypted: its domain names a
    key now, and prepare refuses to run it in plaintext, naming nvmgr encrypt."""
    import hookdom

    key = make_key(tmp_path / "vm.key")
    d = hookdom.wired_domain(tmp_path, "old", key_file=key)
    meta = parse_domain(d.xml).nvmgr
    assert meta is not None and meta.uuid is not None
    with Image.create(str(d.image), [SectionSpec("uefi-vars", PAYLOAD, Binding.PFLASH)],
                      kek=Kek(key.read_bytes()), domain_uuid=uuid.UUID(d.uuid),
                      image_uuid=meta.uuid):
        pass
    r = d.hook("prepare", "begin")
    assert r.returncode == ExitCode.USAGE, r.stderr.decode()
    err = r.stderr.decode()
    assert "section uefi-vars" in err and "stored in plaintext" in err
    assert "nvmgr encrypt --domain" in err
    assert not (d.runtime_root / d.uuid / "image.key").exists()


def test_qemu_opens_the_luks_slice_and_sees_the_payload(tmp_path: Path) -> None:
    """QEMU's own block layer: a luks node on the raw slice of the image
    (through qemu-img's --image-opts, as QEMU's -blockdev does) is exactly
    the payload, and holds what nvmgr put."""
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", _vars())
        s = img.section("uefi-vars")
        phrase = img.luks_passphrase()
    keyf = tmp_path / "k"
    keyf.write_bytes(phrase)
    keyf.chmod(0o600)
    opts = (f"driver=luks,key-secret=k,file.driver=raw,file.offset={s.offset},"
            f"file.size={s.capacity},file.file.filename={path}")
    r = subprocess.run(["qemu-img", "info", "--output=json", "--object",
                        f"secret,id=k,file={keyf}", "--image-opts", opts],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert '"virtual-size": 540672' in r.stdout
    out = tmp_path / "plain"
    r = subprocess.run(["qemu-img", "convert", "--object", f"secret,id=k,file={keyf}",
                        "--image-opts", opts, "-O", "raw", str(out)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == _vars()


# ----------------------------------------------------------------- nvmgr encrypt

FAULTRUN = Path(__file__).resolve().parent / "faultrun.py"


def _plain_image(path: Path) -> dict[str, bytes]:
    data = {"uefi-vars": _vars(), "tpm": b"TPM state " * 100}
    with Image.create(str(path), [SectionSpec("uefi-vars", PAYLOAD, Binding.PFLASH),
                                  SectionSpec("tpm", 4096, Binding.TPM)]) as img:
        for name, payload in data.items():
            img.put(name, payload)
    return data


def _faultrun(n: int, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(FAULTRUN.parent.parent)}
    return subprocess.run([sys.executable, str(FAULTRUN), str(n), "--", *map(str, args)],
                          capture_output=True, env=env, check=False)


def test_encrypt_makes_every_section_encrypted_and_live_ones_luks(tmp_path: Path,
                                                                  nvmgr: RunCli) -> None:
    path = tmp_path / "p.nvram"
    data = _plain_image(path)
    key = make_key(tmp_path / "k.key")
    r = nvmgr("encrypt", path, "--key-file", key, "--output", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["encrypted"] == ["uefi-vars", "tpm"]
    with Image.open(str(path), kek=Kek(key.read_bytes())) as img:
        assert img.section("uefi-vars").luks and img.section("tpm").encrypted
        assert {n: img.get(n) for n in data} == data
        assert img.check().ok
    raw = path.read_bytes()
    assert BOOT not in raw and b"TPM state " not in raw
    assert not Path(f"{path}.nvmgr-encrypt").exists()
    r = nvmgr("encrypt", path, "--key-file", key)  # again: nothing to do
    assert r.returncode == 0 and b"nothing (already)" in r.stdout, r.stderr
    r = nvmgr("encrypt", path, "--key-file", make_key(tmp_path / "other.key"))
    assert r.returncode == ExitCode.WRONG_KEY, r.stderr
    r = nvmgr("encrypt", path)
    assert r.returncode == ExitCode.USAGE and b"give the key" in r.stderr


BOOT = "BootOrder".encode("utf-16-le")


def test_encrypt_is_crash_safe_at_every_io(tmp_path: Path, nvmgr: RunCli) -> None:
    """SIGKILL at each I/O of nvmgr encrypt (the copy's writes and flushes, the
    rename that commits it, the wipe of the original): the image is the
    original, byte for byte, or the whole encrypted one; run again, encrypt
    finishes, and every payload is what it was."""
    src = tmp_path / "orig.nvram"
    data = _plain_image(src)
    original = src.read_bytes()
    key = make_key(tmp_path / "k.key")
    dry = tmp_path / "dry.nvram"
    shutil.copy(src, dry)
    r = _faultrun(0, "encrypt", dry, "--key-file", key)
    assert r.returncode == 0, r.stderr.decode()
    last = r.stderr.decode().strip().splitlines()[-1]
    k = int(last.split("=")[1])
    assert k > 10
    kinds = r.stderr.decode()
    assert "rename" in kinds and "wipe" in kinds
    outcomes = []
    for n in range(1, k + 1):
        path = tmp_path / f"n{n}.nvram"
        shutil.copy(src, path)
        r = _faultrun(n, "encrypt", path, "--key-file", key)
        assert r.returncode == -9, (n, r.stderr.decode()[-500:])
        if path.read_bytes() == original:
            outcomes.append("old")
        else:
            with Image.open(str(path), kek=Kek(key.read_bytes())) as img:
                assert img.check().ok, n
                assert img.section("uefi-vars").luks
                assert {x: img.get(x) for x in data} == data, n
            outcomes.append("new")
        r = nvmgr("encrypt", path, "--key-file", key)  # finishes, or has nothing to do
        assert r.returncode == 0, (n, r.stderr)
        with Image.open(str(path), kek=Kek(key.read_bytes())) as img:
            assert img.check().ok and img.section("uefi-vars").luks, n
            assert {x: img.get(x) for x in data} == data, n
        assert BOOT not in path.read_bytes()
        path.unlink()
    # a crash never undoes the commit: old ... old, then new ... new (from the wipe on)
    assert outcomes == sorted(outcomes, key=lambda o: o == "new")
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes


def test_a_captured_volume_is_stored_as_it_is(tmp_path: Path) -> None:
    """What a backup does: the slice's bytes (the LUKS volume QEMU wrote) into
    a copy under the same data key, stored as they are, not encrypted again."""
    path = tmp_path / "i.nvram"
    with _image(path) as img:
        img.put("uefi-vars", _vars())
        s = img.section("uefi-vars")
        vol = img.container.read(s.offset, s.capacity)
        img.put("uefi-vars", b"other")
        img.put("uefi-vars", vol, volume=True)
        assert img.container.read(s.offset, s.capacity) == vol
        assert img.get("uefi-vars") == _vars() and img.check().ok
        with pytest.raises(Exception, match="are not its LUKS volume"):
            img.put("uefi-vars", vol[:-512], volume=True)
        with pytest.raises(Exception, match="are not its LUKS volume"):
            img.put("tpm", b"x", volume=True)


def test_a_first_start_with_a_key_killed_at_every_io_of_prepare(tmp_path: Path) -> None:
    """The hook's key handling under SIGKILL at each of its I/Os (the image's
    creation, the LUKS volume's put, the runtime key file's write, fsync and
    rename): the image always checks under the key, the start tried again
    stages the passphrase, ``started`` removes it, the vars are the template's."""
    import hookdom
    from test_hook_crash import ok, sweep

    key = make_key(tmp_path / "vm.key")
    d = hookdom.wired_domain(tmp_path, "kkill", key_file=key)
    kek = Kek(key.read_bytes())
    template = Path(hookdom.OVMF_VARS).read_bytes()

    def judge(c: hookdom.HookDomain, n: int) -> str:
        made = "none"
        if c.image.exists():
            if c.image.read_bytes().strip(b"\0"):
                with Image.open(str(c.image), kek=kek) as img:
                    assert img.check().ok
                made = "image"
            else:
                made = "zeros"
        keyfile = c.runtime_root / c.uuid / "image.key"
        r = c.hook("release", "end")  # libvirtd's answer to the failed start
        if made != "zeros":
            ok(r)
        assert not keyfile.exists()  # release removes the runtime directory
        ok(c.hook("prepare", "begin"))
        with Image.open(str(c.image), kek=kek) as img:
            assert keyfile.read_bytes() == img.luks_passphrase()
            assert img.get("uefi-vars") == template
        ok(c.hook("started", "begin"))
        assert not keyfile.exists()
        ok(c.hook("release", "end"))
        with Image.open(str(c.image), kek=kek) as img:
            assert img.check().ok and not any(s.dirty for s in img.directory.sections)
        return made

    outcomes = sweep(d, tmp_path, "prepare", "begin", judge)
    assert outcomes[-1] == "image"


def test_a_luks_section_added_later_gets_its_volume_at_once(tmp_path: Path) -> None:
    """add_sections (grow, attach): a new LUKS section holds a volume before
    the commit that adds it (of its contents, or zeros): QEMU opens nothing else."""
    path = tmp_path / "i.nvram"
    disk = SectionSpec("disk", (64 << 10) + LUKS_HEADER_SIZE, Binding.BLOCK, encrypted=True)
    empty = SectionSpec("disk2", (64 << 10) + LUKS_HEADER_SIZE, Binding.BLOCK, encrypted=True)
    with _image(path) as img:
        img.add_sections([disk, empty], {"disk": b"block data"})
        assert img.get("disk") == b"block data" + bytes((64 << 10) - 10)
        assert img.get("disk2") == bytes(64 << 10)
        assert img.section("disk").luks and img.check().ok
        with pytest.raises(NoSpaceError, match="capacity 65536"):
            img.add_sections([SectionSpec("disk3", (64 << 10) + LUKS_HEADER_SIZE,
                                          Binding.BLOCK, encrypted=True)],
                             {"disk3": bytes((64 << 10) + 1)})
    assert b"block data" not in path.read_bytes()


def test_rekey_of_an_image_with_luks_sections_killed_at_every_io(tmp_path: Path,
                                                                 nvmgr: RunCli) -> None:
    """``nvmgr rekey`` SIGKILLed at each of its I/Os on an image whose vars are
    a LUKS volume: exactly one of the two keys opens the image, the volume
    opens with it (its passphrase comes from the data key, which rekey never
    changes) and holds the same vars; the volume's bytes are never rewritten."""
    old_key, new_key = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key")
    src = tmp_path / "src.nvram"
    with _image(src, Kek(old_key.read_bytes())) as img:
        img.put("uefi-vars", _vars())
        img.put("tpm", b"TPM state " * 100)
        s = img.section("uefi-vars")
        volume = img.container.read(s.offset, s.capacity)
    dry = tmp_path / "dry.nvram"
    shutil.copy(src, dry)
    cmd = ["--key-file", old_key, "--new-key-file", new_key]
    r = _faultrun(0, "rekey", dry, *cmd)
    assert r.returncode == 0, r.stderr.decode()
    total = int(r.stderr.decode().strip().splitlines()[-1].split("=")[1])
    assert total >= 2
    outcomes = []
    for n in range(1, total + 2):
        path = tmp_path / f"k{n}.nvram"
        shutil.copy(src, path)
        r = _faultrun(n, "rekey", path, *cmd)
        assert r.returncode == (0 if n > total else -9), (n, r.stderr.decode()[-500:])
        opens = []
        for name, key in (("old", old_key), ("new", new_key)):
            g = nvmgr("get", path, "uefi-vars", "--key-file", key, "-o", tmp_path / f"v{n}{name}")
            assert g.returncode in (0, ExitCode.WRONG_KEY), (n, g.stderr)
            if g.returncode == 0:
                assert (tmp_path / f"v{n}{name}").read_bytes() == _vars()
                opens.append(name)
        assert len(opens) == 1, (n, opens)
        with Image.open(str(path), kek=Kek((old_key if opens == ["old"] else new_key)
                                           .read_bytes())) as img:
            assert img.check().ok and img.section("uefi-vars").luks
            assert img.get("tpm") == b"TPM state " * 100
            s = img.section("uefi-vars")
            assert img.container.read(s.offset, s.capacity) == volume
        outcomes.append(opens[0])
        path.unlink()
    assert outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes


def test_create_and_grow_with_a_key_make_live_sections_luks_volumes(tmp_path: Path,
                                                                     nvmgr: RunCli) -> None:
    """``nvmgr create --key-file`` (a stand-alone image, no domain) and ``nvmgr
    grow`` of an encrypted image: a pflash or block section is a LUKS volume
    whose payload is the size given (what the device sees); its plaintext is
    never in the file.  Without a key, create keeps them plaintext, and grow of
    an encrypted image refuses a live section without the key (exit 6)."""
    key = make_key(tmp_path / "k.key")
    path = tmp_path / "a.nvram"
    r = nvmgr("create", path, "-s", "vars:528K:pflash", "-s", "tpm:4K:tpm", "--key-file", key,
              "-O", "json")
    assert r.returncode == 0, r.stderr
    vars_file = tmp_path / "vars.fd"
    vars_file.write_bytes(_vars())
    assert nvmgr("put", path, "vars", vars_file, "--key-file", key).returncode == 0
    with Image.open(str(path), kek=Kek(key.read_bytes())) as img:
        s = img.section("vars")
        assert s.luks and s.payload == PAYLOAD and s.capacity == PAYLOAD + LUKS_HEADER_SIZE
        assert img.get("vars") == _vars() and img.section("tpm").encrypted
    assert "BootOrder".encode("utf-16-le") not in path.read_bytes()
    assert nvmgr("check", path).returncode == 0  # the crc32 over the ciphertext, no key

    r = nvmgr("grow", path, "-s", "disk:64K:block")
    assert r.returncode == ExitCode.KEY_REQUIRED and b"give the key" in r.stderr, r.stderr
    r = nvmgr("grow", path, "-s", "disk:64K:block", "--key-file", key)
    assert r.returncode == 0, r.stderr
    with Image.open(str(path), kek=Kek(key.read_bytes())) as img:
        assert img.section("disk").luks and img.section("disk").payload == 64 << 10
        assert img.get("disk") == bytes(64 << 10) and img.check().ok

    plain = tmp_path / "p.nvram"
    assert nvmgr("create", plain, "-s", "vars:528K:pflash").returncode == 0
    with Image.open(str(plain)) as img:
        assert not img.section("vars").encrypted and img.section("vars").capacity == PAYLOAD


def test_a_live_block_section_hot_plugged_on_a_keyed_domain_stacks_a_luks_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nvmgr attach --live`` of a ``block`` section on a running domain with a
    key: the section added is a LUKS volume, and the hot-plug (QMP, faked
    here: tests/e2e/test_luks.py does it on a real QEMU) adds the raw slice,
    the ``luks`` node on it with the ``nvmgr-key`` secret, and the device on
    the luks node, in that order."""
    from nvmgr.domain.plan import plan_domain
    from nvmgr.virt import hotplug

    key = make_key(tmp_path / "vm.key")
    xml = (f"<domain type='qemu'><name>vm</name><uuid>{uuid.uuid4()}</uuid><metadata>"
           f"<nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' "
           f"image='{tmp_path / 'vm.nvram'}' key-file='{key}'>"
           "<nvmgr:section name='state0' size='64K' binding='block' driver='virtio-blk-pci' "
           "device='nvmgr-state0'/>"
           "</nvmgr:nvram></metadata><memory>65536</memory>"
           "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>")
    plan = plan_domain(xml, encrypted=True)
    (ps,) = [s for s in plan.sections if s.name == "state0"]
    assert ps.luks and ps.payload == 64 << 10
    calls: list[tuple[str, dict[str, object]]] = []

    def qmp(_dom: object, cmd: str, args: dict[str, object] | None = None) -> object:
        calls.append((cmd, args or {}))
        if cmd == "query-named-block-nodes":
            return [{"node-name": hotplug.FILE_NODE, "image": {"virtual-size": 1 << 30}}]
        if cmd == "qom-list":
            return []
        return {}

    monkeypatch.setattr(hotplug, "qmp", qmp)
    ps = dataclasses.replace(ps, offset=1 << 20)
    added = hotplug.plug(object(), str(tmp_path / "vm.nvram"), ps)
    adds = [(c, a) for c, a in calls if c in ("blockdev-add", "device_add")]
    lnode = qemuargs.luks_node_name("state0")
    assert [a.get("node-name", a.get("id")) for _c, a in adds] == [
        qemuargs.node_name("state0"), lnode, "nvmgr-state0"]
    assert adds[1][1] == {"driver": "luks", "file": qemuargs.node_name("state0"),
                          "key-secret": qemuargs.KEY_SECRET_ID, "node-name": lnode}
    assert adds[2][1]["drive"] == lnode and adds[2][1]["driver"] == "virtio-blk-pci"
    # The slice's own file node (opened in the slice's blockdev-add), the slice,
    # the luks node; the device id is the slice's node name (device='nvmgr-state0'):
    # named once.
    assert added == [qemuargs.extra_file_node("state0"), qemuargs.node_name("state0"),
                     lnode] and lnode != "nvmgr-state0"


def test_a_later_start_with_a_key_killed_at_every_io_of_prepare(tmp_path: Path) -> None:
    """A domain with a key that ran before: its prepare (the key's check against
    the image, the in-use marks, the runtime key file's write, fsync and rename)
    SIGKILLed at each I/O.  The runtime key file is absent or the whole
    passphrase, never a part; the image checks under the key; the start tried
    again (after libvirtd's release, or not) stages it, ``started`` removes it."""
    import hookdom
    from test_hook_crash import ok, sweep

    key = make_key(tmp_path / "vm.key")
    d = hookdom.wired_domain(tmp_path, "klater", key_file=key)
    kek = Kek(key.read_bytes())
    template = Path(hookdom.OVMF_VARS).read_bytes()
    ok(d.hook("prepare", "begin"))  # the first start: image, volume, TPM section
    ok(d.hook("started", "begin"))
    ok(d.hook("release", "end"))
    with Image.open(str(d.image), kek=kek) as img:
        phrase = img.luks_passphrase()
        assert img.section("uefi-vars").luks and img.check().ok

    def judge(c: hookdom.HookDomain, n: int) -> str:
        keyfile = c.runtime_root / c.uuid / "image.key"
        left = keyfile.read_bytes() if keyfile.exists() else None
        assert left in (None, phrase), "a runtime key file that is not the whole passphrase"
        with Image.open(str(c.image), kek=kek) as img:
            assert img.check().ok and img.get("uefi-vars") == template
        if n % 2:
            ok(c.hook("release", "end"))  # libvirtd's answer to the failed start
            assert not keyfile.exists()
        ok(c.hook("prepare", "begin"))
        assert keyfile.read_bytes() == phrase
        ok(c.hook("started", "begin"))
        assert not keyfile.exists()
        ok(c.hook("release", "end"))
        with Image.open(str(c.image), kek=kek) as img:
            assert img.check().ok and not any(s.dirty for s in img.directory.sections)
            assert img.get("uefi-vars") == template
        return "key" if left else "-"

    outcomes = sweep(d, tmp_path, "prepare", "begin", judge)
    assert "key" in outcomes and outcomes[0] == "-", outcomes  # killed after the rename, and before
