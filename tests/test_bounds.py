"""The bounds on everything a domain or an image can ask for (README, "Bounds").

One test (or one parametrized group) per row of the README's table: each
limit is checked against the file that holds the value, before anything is
allocated or created, and a value beyond it is refused with nvmgr's own
error and its documented exit code.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nvmgr.domain import profiles
from nvmgr.domain.plan import plan_domain
from nvmgr.errors import (
    CorruptError,
    DERError,
    ExitCode,
    InvalidInputError,
    MemberError,
    NvmgrError,
    UsageError,
)
from nvmgr.format import codec, writer
from nvmgr.format.layout import SectionSpec, layout
from nvmgr.format.model import (
    MAX_DEVICE,
    MAX_IMAGE_SIZE,
    MAX_SECTION_SIZE,
    Binding,
    Member,
)
from nvmgr.image.image import MAX_IN_MEMORY, Image
from tests.conftest import ROOT, RunCli
from tests.fuzz.harness import frame

UEFI = ROOT / "tests" / "data" / "uefi-tpm2-in.xml"


def _domain(template: str | None = None, *, loader: str | None = None,
            extra_meta: str = "", tpm_alias: str | None = None, tail: str = "") -> str:
    loader_el = ("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                 if loader is None else loader)
    nvram = f"<nvram template='{template}'/>" if template else ""
    alias = f"<alias name='{tpm_alias}'/>" if tpm_alias else ""
    return f"""<domain type='qemu'>
  <name>h1-bounds</name>
  <uuid>7a4c6a2e-52d5-4b1e-9b43-1c2d3e4f5a6b</uuid>
  <memory>131072</memory>
  <metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'
      image='/nonexistent/h1-bounds.nvram'>{extra_meta}</nvmgr:nvram>{tail}</metadata>
  <os><type arch='x86_64' machine='q35'>hvm</type>{loader_el}{nvram}</os>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/>{alias}</tpm></devices>
</domain>"""


# ----------------------------------------------------------------- templates


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "vars.fifo"
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory", "sparse-64G", "qcow2-1G"])
def test_template_must_be_a_regular_file_within_64_mib(
        kind: str, tmp_path: Path, fifo: Path, nvmgr: RunCli) -> None:
    """Row "varstore template": a regular file of at most 64 MiB (AAVMF's);
    refused with exit 9 before anything is created, and a FIFO is never
    opened for reading (``plan``, and so the root hook, would block)."""
    if kind == "fifo":
        path = str(fifo)
    elif kind == "chardev":
        path = "/dev/zero"
    elif kind == "directory":
        path = str(tmp_path)
    elif kind == "sparse-64G":
        p = tmp_path / "big.fd"
        with open(p, "wb") as f:
            f.truncate(64 << 30)
        path = str(p)
    else:  # a small qcow2 file whose virtual size is 1 GiB
        p = tmp_path / "vars.qcow2"
        p.write_bytes(b"QFI\xfb" + bytes(20) + (1 << 30).to_bytes(8, "big") + bytes(100))
        path = str(p)
    xml = tmp_path / "dom.xml"
    xml.write_text(_domain(path))
    with pytest.raises(InvalidInputError, match="regular file|larger than the largest flash"):
        plan_domain(xml.read_bytes())
    res = subprocess.run([sys.executable, "-m", "nvmgr", "plan", str(xml)], capture_output=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert res.returncode == ExitCode.INVALID_INPUT, res.stderr
    assert path.encode() in res.stderr


def test_template_of_64_mib_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "AAVMF_VARS.fd"
    with open(p, "wb") as f:
        f.truncate(profiles.MAX_FLASH)
    plan = plan_domain(_domain(str(p)))
    assert plan.find(profiles.UEFI_SECTION).capacity == profiles.MAX_FLASH  # type: ignore[union-attr]


def test_template_size_override_still_checks_the_template(fifo: Path) -> None:
    """A size given in the metadata needs no template size, but the template
    is still what the first start copies: refused at plan time too."""
    xml = _domain(str(fifo), extra_meta="<nvmgr:section name='uefi-vars' size='528K'/>")
    with pytest.raises(InvalidInputError, match="regular file"):
        plan_domain(xml)


def test_varstore_import_is_bounded(tmp_path: Path, fifo: Path) -> None:
    """Row "varstore to import": the same rule where an existing vars file is read."""
    from nvmgr.provision.prepare import _read_firmware_file

    big = tmp_path / "vm_VARS.fd"
    with open(big, "wb") as f:
        f.truncate(profiles.MAX_FLASH + 1)
    with pytest.raises(InvalidInputError, match="larger than the largest flash"):
        _read_firmware_file(str(big), "raw")
    with pytest.raises(InvalidInputError, match="regular file"):
        _read_firmware_file(str(fifo), "raw")


# ----------------------------------------------------------------- domain XML


def test_pflash_loader_without_a_path_is_invalid_input() -> None:
    xml = _domain(loader="<loader readonly='yes' type='pflash'/>")
    with pytest.raises(InvalidInputError, match="names no firmware file"):
        plan_domain(xml)


@pytest.mark.parametrize("tail", ["text after the element", "<x:y xmlns:x='urn:x'/> tail",
                                  "&amp; text", "<!-- c --> text"])
def test_text_after_the_metadata_element_is_never_an_lxml_error(tail: str) -> None:
    """Row "domain XML": any input gives a plan or nvmgr's error, never lxml's."""
    try:
        plan_domain(_domain(tail=tail))
    except NvmgrError:
        pass


def test_lxml_errors_become_invalid_input() -> None:
    with pytest.raises(InvalidInputError):
        plan_domain(b"<domain>\x00</domain>")
    with pytest.raises(InvalidInputError):
        plan_domain("<domain><name>x</name></domain>\udcff")


@pytest.mark.parametrize("length", [MAX_DEVICE + 1, 1000])
def test_device_alias_longer_than_the_directory_allows_is_refused_at_plan(length: int) -> None:
    """Row "device alias": 1..128 characters, refused at plan (so at define,
    before anything is written), not written into an image that then no
    longer opens."""
    with pytest.raises(InvalidInputError, match="device alias"):
        plan_domain(_domain(tpm_alias="a" * length))
    with pytest.raises(UsageError, match="device alias"):
        SectionSpec("x", 4096, device="d" * length)


def test_device_alias_of_128_is_accepted(tmp_path: Path) -> None:
    plan = plan_domain(_domain(tpm_alias="a" * MAX_DEVICE))
    with Image.create(str(tmp_path / "i.nvram"), [
            SectionSpec(s.name, s.capacity, s.binding, device=s.device) for s in plan.sections]):
        pass
    with Image.open(str(tmp_path / "i.nvram")) as img:
        assert any(s.device == "a" * MAX_DEVICE for s in img.directory.sections)


# ----------------------------------------------------------------- directory integers


def _base() -> writer.Directory:  # type: ignore[name-defined]
    return layout([SectionSpec("uefi-vars", 8192, Binding.PFLASH), SectionSpec("tpm", 8192),
                   SectionSpec("blob", 4096)], image_uuid=uuid.UUID(int=1))


def _decode(d: object) -> None:
    codec.decode_header(frame(writer.encode_directory(d)), padded=False)  # type: ignore[arg-type]


HUGE = [10**5000, -(10**5000), 2**64, -1]


@pytest.mark.parametrize("value", HUGE, ids=["5000-digits", "-5000-digits", "2^64", "-1"])
@pytest.mark.parametrize("field", ["image_size", "scratch_offset", "scratch_length",
                                   "capacity", "reserved", "length", "offset", "spare", "home",
                                   "crc32", "generation"])
def test_directory_integers_out_of_range_are_corrupt(field: str, value: int) -> None:
    """Row "directory integers": 0..2^63-1 in the reader (nine octets at most),
    and the tighter bounds below; a field of thousands of digits (which
    Python cannot print) or a negative one is refused as corrupt (exit 4)
    in the reader, with a message that prints."""
    d = _base()
    target = d if field in ("image_size", "scratch_offset", "scratch_length",
                            "generation") else d.sections[1]
    setattr(target, field, value)
    with pytest.raises(DERError) as e:
        _decode(d)
    assert e.value.exit_code == ExitCode.CORRUPT
    assert len(str(e.value)) < 400 and str(e.value.to_json())


@pytest.mark.parametrize(("field", "value"), [
    ("image_size", MAX_IMAGE_SIZE + 4096), ("capacity", MAX_SECTION_SIZE + 1),
    ("offset", MAX_IMAGE_SIZE + 4096), ("spare", MAX_IMAGE_SIZE + 4096),
])
def test_directory_sizes_above_the_documented_limits_are_corrupt(field: str, value: int) -> None:
    """Rows "image size" (256 TiB) and "section size" (1 TiB): the same limits
    the writer and the planner keep."""
    d = _base()
    target = d if field == "image_size" else d.sections[1]
    setattr(target, field, value)
    with pytest.raises(DERError, match="outside"):
        _decode(d)


def test_layout_refuses_an_image_beyond_the_limit() -> None:
    specs = [SectionSpec(f"s{i}", MAX_SECTION_SIZE) for i in range(129)]
    with pytest.raises(NvmgrError, match="beyond the limit"):
        layout(specs)


# ----------------------------------------------------------------- members


def _with_member(d: writer.Directory, **section: int) -> writer.Directory:  # type: ignore[name-defined]
    d = dataclasses.replace(d, sections=[dataclasses.replace(s) for s in d.sections])
    d.members = [Member(1, "/var/lib/libvirt/nvmgr/h1.m1", uuid.UUID(int=2))]
    s = d.sections[2]
    s.member = 1
    for k, v in section.items():
        setattr(s, k, v)
    return d


@pytest.mark.parametrize(("field", "value"), [("offset", 4097), ("offset", MAX_IMAGE_SIZE),
                                              ("spare", 123)])
def test_member_sections_get_the_layout_checks(field: str, value: int) -> None:
    """Row "member sections": aligned, within the image limit, like any other."""
    with pytest.raises(DERError, match="member"):
        _decode(_with_member(_base(), **{field: value}))


def test_member_section_is_never_read_from_the_main_file(tmp_path: Path, nvmgr: RunCli) -> None:
    """A section whose member is missing is a clear error naming the member and
    the section (get: exit 4; check reports it), never bytes of the main file
    read in its place."""
    path = tmp_path / "m.nvram"
    with Image.create(str(path), [SectionSpec("uefi-vars", 8192, Binding.PFLASH),
                                  SectionSpec("tpm", 8192), SectionSpec("blob", 4096)]) as img:
        img.put("blob", b"secret of the main file")
        d = _with_member(img.directory, length=10, crc32=0)
        img._commit(d)
    with Image.open(str(path)) as img:
        with pytest.raises(MemberError, match="member image 1 .*blob.* is missing"):
            img.get("blob")
        report = img.check()
        assert not report.ok and "member image 1" in report.errors[0]
        assert "blob" in report.errors[0]
    res = nvmgr("get", path, "blob")
    assert res.returncode == ExitCode.CORRUPT and b"member image 1" in res.stderr
    assert b"secret" not in res.stdout


def test_a_tib_member_section_is_refused_against_the_members_file(tmp_path: Path,
                                                                   nvmgr: RunCli) -> None:
    """Row "sections stored in a member image": a crafted directory naming a
    1 TiB section in a small member is refused against the member's own end
    (exit 4, naming member and section), before anything is allocated."""
    from nvmgr.image.members import split
    path, member = tmp_path / "m.nvram", tmp_path / "other" / "m1.nvram"
    member.parent.mkdir()
    with Image.create(str(path), [SectionSpec("tpm", 8192), SectionSpec("blob", 4096)]) as img:
        img.put("blob", b"payload")
        split(img, ["blob"], str(member))
        d = img._copy_dir()
        stub = d.find("blob")
        assert stub is not None
        stub.capacity, stub.reserved = 1 << 40, 1 << 40
        img._commit(d)
    with Image.open(str(path)) as img:
        with pytest.raises(MemberError, match=r"section blob .*beyond the end of member image 1"):
            img.get("blob")
    res = nvmgr("get", path, "blob")
    assert res.returncode == ExitCode.CORRUPT
    assert b"member image 1" in res.stderr and b"blob" in res.stderr


# ----------------------------------------------------------------- get streams


def test_get_of_a_large_section_streams(tmp_path: Path) -> None:
    """Row "section read into memory": at most 256 MiB; ``get`` streams any
    section in 4 MiB chunks (a 1 TiB section is never read whole).  Here a
    section of 300 MiB, in a sparse file, read by ``nvmgr get`` under an
    address-space limit far below its size."""
    size = MAX_IN_MEMORY + (44 << 20)
    path = tmp_path / "big.nvram"
    with Image.create(str(path), [SectionSpec("disk", size, Binding.BLOCK)],
                      header_area=None) as img:
        img.set_in_use(["disk"], True)
        img.reseal(["disk"])  # length = capacity, crc over the (sparse) zeros
        assert img.section("disk").length == size
        with pytest.raises(UsageError, match="stream it"):
            img.get("disk")
    code = (
        "import resource, sys, runpy\n"
        "soft = resource.getrlimit(resource.RLIMIT_AS)\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({size // 2 + (400 << 20)}, soft[1]))\n"
        "sys.argv = ['nvmgr', 'get', sys.argv[1], 'disk']\n"
        "runpy.run_module('nvmgr', run_name='__main__')\n"
    )
    err = tmp_path / "stderr"
    with open(os.devnull, "wb") as out, open(err, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=out,
                                stderr=errf, env={**os.environ, "PYTHONPATH": str(ROOT)})
        # This child's own peak (RUSAGE_CHILDREN would be the largest of every child
        # the test process ever reaped, other tests' included).
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err.read_text()
    assert usage.ru_maxrss * 1024 < size


# ----------------------------------------------------------------- copy B


def test_copy_b_is_never_looked_for_inside_a_live_section(tmp_path: Path) -> None:
    """Row "header copy B": with copy A unreadable, copy B is looked for only
    where a header area can end; bytes a guest wrote into its live pflash
    section (a forged header with a higher generation) never stand in for
    it, even when copy B is damaged too."""
    path = tmp_path / "g.nvram"
    with Image.create(str(path), [SectionSpec("uefi-vars", 256 * 1024, Binding.PFLASH),
                                  SectionSpec("tpm", 4096)]) as img:
        img.put("tpm", b"good")
        area = img.directory.header_area
        live = img.section("uefi-vars").offset
        forged = dataclasses.replace(img.directory, generation=1000, header_area=2 * area)
    assert live == 2 * area  # the pflash slice starts where a 2x header area would put B
    forged.sections = [dataclasses.replace(s) for s in forged.sections]
    forged.image_size = img.directory.image_size
    blob = frame(writer.encode_directory(forged))
    raw = bytearray(path.read_bytes())
    raw[live : live + len(blob)] = blob  # what a hostile guest can write into its vars
    raw[0:256] = bytes(256)  # copy A unreadable
    raw[area : area + 16] = b"\xff" * 16  # copy B damaged
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptError, match="header cop"):
        Image.open(str(path))


# ----------------------------------------------------------------- the directory under the key


#: The TPM section as it was after its first write (see :func:`_keyed`).
_V1: dict[str, object] = {}


def _keyed(tmp_path: Path) -> tuple[Path, object]:
    from nvmgr.crypto.cipher import Kek

    k = Kek(bytes(range(32)))
    path = tmp_path / "k.nvram"
    with Image.create(str(path), [SectionSpec("uefi-vars", 8192, Binding.PFLASH),
                                  SectionSpec("tpm", 8192), SectionSpec("blob", 4096)],
                      kek=k) as img:
        img.put("tpm", b"state v1")
        _V1["tpm"] = dataclasses.replace(img.section("tpm"))
        img.put("tpm", b"state v2")
    return path, k


def _forge(path: Path, edit: object, *, mac: bytes | None | str = "keep") -> None:
    """Rewrite both header copies with a directory changed by *edit*, given a
    valid digest: what a compromised QEMU can do to an image it holds open."""
    with Image.open(str(path)) as img:
        d = img._copy_dir()
        old_mac = img.directory.mac
        area = d.header_area
    edit(d)  # type: ignore[operator]
    d.generation += 10
    tag = old_mac if mac == "keep" else mac
    blob = codec.encode_header(d, (lambda _b: tag) if tag is not None else None)  # type: ignore[arg-type, return-value]
    raw = bytearray(path.read_bytes())
    for off in (0, area):
        raw[off : off + area] = blob + bytes(area - len(blob))
    path.write_bytes(bytes(raw))


def _rollback(d: writer.Directory) -> None:  # type: ignore[name-defined]
    """The TPM section back to its first version: its ciphertext is still in
    the other slot, and its IV, MAC, crc and length are all genuine."""
    d.sections = [_V1["tpm"] if s.name == "tpm" else s for s in d.sections]


def test_a_forged_directory_of_an_encrypted_image_is_corrupt(tmp_path: Path,
                                                             nvmgr: RunCli) -> None:
    """Row "directory of an encrypted image": a forged directory (here a
    rollback of the TPM section to its previous version, whose ciphertext,
    IV and MAC are all genuine) is refused as corrupt (exit 4) by every
    reader with the key; without the key nothing can tell."""
    path, k = _keyed(tmp_path)
    _forge(path, _rollback)
    with Image.open(str(path), kek=k) as img:  # type: ignore[arg-type]
        # Without the directory's MAC this rollback would pass every other check:
        assert img.directory.find("tpm").crypto == _V1["tpm"].crypto  # type: ignore[union-attr, attr-defined]
    with Image.open(str(path), kek=k) as img, pytest.raises(CorruptError, match="not authen"):  # type: ignore[arg-type]
        img.get("tpm")
    key = tmp_path / "k.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    res = nvmgr("get", path, "tpm", "--key-file", key)
    assert res.returncode == ExitCode.CORRUPT and b"not authenticated" in res.stderr
    res = nvmgr("check", path, "--key-file", key)
    assert res.returncode == ExitCode.CORRUPT


def test_a_stripped_directory_mac_is_corrupt_and_sealing_is_explicit(tmp_path: Path,
                                                                    nvmgr: RunCli) -> None:
    """A directory without its MAC (forged, or written before nvmgr sealed
    directories) is corrupt with the key; ``nvmgr rekey --seal-directory``
    seals it after checking every section, and only with the key."""
    path, k = _keyed(tmp_path)
    _forge(path, lambda d: None, mac=None)
    with Image.open(str(path), kek=k) as img, pytest.raises(CorruptError, match="no MAC"):  # type: ignore[arg-type]
        img.get("tpm")
    key = tmp_path / "k.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    res = nvmgr("rekey", path, "--seal-directory")
    assert res.returncode == ExitCode.USAGE
    res = nvmgr("rekey", path, "--key-file", key, "--seal-directory")
    assert res.returncode == 0, res.stderr
    with Image.open(str(path), kek=k) as img:  # type: ignore[arg-type]
        assert img.get("tpm") == b"state v2"
        assert img.check().ok


def test_writers_without_the_key_keep_the_seal(tmp_path: Path, nvmgr: RunCli) -> None:
    """Release (reseal, in-use marks), grow and resize need no key and keep
    the directory authenticated; a change the MAC covers (removing a section
    that holds encrypted data) needs the key (exit 6)."""
    path, k = _keyed(tmp_path)
    with Image.open(str(path), writable=True) as img:
        img.set_in_use(["uefi-vars"], True)
        img.reseal(["uefi-vars"])
        img.add_sections([SectionSpec("more", 4096)])
        img.resize_section("tpm", 64 * 1024)
    res = nvmgr("remove", path, "tpm")
    assert res.returncode == ExitCode.KEY_REQUIRED, res.stderr
    with Image.open(str(path), kek=k) as img:  # type: ignore[arg-type]
        assert img.get("tpm") == b"state v2"
        assert img.check().ok
    key = tmp_path / "k.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    res = nvmgr("remove", path, "tpm", "--key-file", key)
    assert res.returncode == 0, res.stderr
    with Image.open(str(path), kek=k) as img:  # type: ignore[arg-type]
        assert img.check().ok and img.directory.find("tpm") is None


def test_the_directory_mac_is_in_the_header_copy_and_pyasn1_agrees(tmp_path: Path,
                                                                   nvmgr: RunCli) -> None:
    from nvmgr.format import asn1

    path, _k = _keyed(tmp_path)
    res = nvmgr("dump", path, "--der", tmp_path / "copy.der")
    assert res.returncode == 0, res.stderr
    der = (tmp_path / "copy.der").read_bytes()  # what openssl asn1parse reads: with its MAC
    assert codec.decode_header(der, padded=False).mac is not None
    with Image.open(str(path)) as img:
        area = img.directory.header_area
        mac = img.directory.mac
    assert mac is not None and len(mac) == 32
    for off in (0, area):  # both copies carry one, and both decoders read the same
        raw = path.read_bytes()[off : off + area]
        assert codec.decode_header(raw).mac is not None
        assert asn1.decode_header(raw).mac == codec.decode_header(raw).mac


# ----------------------------------------------------------------- the root hook


def _hook_domain(tmp_path: Path, key: Path | None) -> object:
    import hookdom

    d = hookdom.wired_domain(tmp_path, "bounds", key_file=key)
    if key is not None:  # the same domain, naming a key file in its metadata
        assert str(key) in d.xml
    return d


@pytest.mark.parametrize("forgery", ["5000-digit imageSize", "rollback under the key"])
def test_the_root_hook_survives_a_directory_written_by_qemu(tmp_path: Path, forgery: str) -> None:
    """Rows "integers of a directory" and "the directory of an encrypted
    image", through the real hook entry: what a compromised QEMU writes into
    the image (both header copies, valid digests) makes the next prepare
    refuse the start with exit 4 and a message that prints; never a crash."""
    key = None
    if forgery.startswith("rollback"):
        key = tmp_path / "vm.key"
        key.write_bytes(bytes(range(32)))
        key.chmod(0o600)
    d = _hook_domain(tmp_path, key)
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    # What swtpm leaves behind: release collects it (encrypted under the key).
    d.tpm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # type: ignore[attr-defined]
    (d.tpm_dir / "tpm2-00.permall").write_bytes(b"TPM state " * 100)  # type: ignore[attr-defined]
    r = d.hook("release", "end")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    image = d.image  # type: ignore[attr-defined]
    if key is not None:
        with Image.open(str(image)) as img:
            assert img.directory.encrypted and img.directory.mac is not None
            s = next(s for s in img.directory.sections
                     if s.encrypted and s.length and not s.live)

        def forge(dd: writer.Directory) -> None:  # type: ignore[name-defined]
            x = dd.find(s.name)
            x.length, x.crc32 = 0, 0  # the TPM's state dropped: a fresh TPM
            x.crypto = None

        _forge(image, forge)
    else:
        def huge(dd: writer.Directory) -> None:  # type: ignore[name-defined]
            dd.image_size = 10**5000

        with Image.open(str(image)) as img:
            dd = img._copy_dir()
            area = dd.header_area
        huge(dd)
        dd.generation += 10
        blob = frame(writer.encode_directory(dd))
        raw = bytearray(image.read_bytes())
        for off in (0, area):
            raw[off : off + area] = blob + bytes(area - len(blob))
        image.write_bytes(bytes(raw))
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == ExitCode.CORRUPT, r.stderr.decode()
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert ("not authenticated" in err) if key else ("outside" in err or "damaged" in err)
