"""Planning: the sections a domain needs, their worst-case sizes and where layout() puts them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import Golden

from nvmgr.domain import plan as planmod
from nvmgr.domain import profiles
from nvmgr.domain.plan import Plan, plan_domain, plan_to_json, render_text
from nvmgr.errors import InvalidInputError, NotFoundError
from nvmgr.format.model import LUKS_HEADER_SIZE, Binding

DATA = Path(__file__).resolve().parent / "data"
CASES = sorted(p.name[: -len("-in.xml")] for p in DATA.glob("*-in.xml"))
KiB, MiB = 1 << 10, 1 << 20


pytestmark = pytest.mark.usefixtures("host_independent")


def dom(body: str, os_: str = "", meta: str = "") -> str:
    md = (f"<metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'>{meta}"
          "</nvmgr:nvram></metadata>") if meta else ""
    return (f"<domain type='qemu'><name>t</name><uuid>5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7cff</uuid>"
            f"{md}<os><type arch='x86_64' machine='q35'>hvm</type>{os_}</os>"
            f"<devices>{body}</devices></domain>")


OVMF4M = ("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
          "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>")
TPM2 = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


# -- the layout rules, computed independently of nvmgr.format.layout ---------------


def expected_image_size(capacities: list[tuple[int, bool, bool]]) -> tuple[int, int]:
    """(header area, image size) for sections given as (capacity, live, encrypted).

    The rules (layout.py docstring, DESIGN.md "The image"): two header areas,
    each the smallest power of two from 64 KiB that holds 1024 + 2 x 192 bytes
    per section; every section reserved at its capacity (+16 bytes of cipher
    padding when encrypted and not live: an encrypted live section is a LUKS
    volume whose header its capacity counts) rounded up to 4 KiB; live
    sections once, plus a scratch area as large as the largest live one;
    other sections twice.
    """
    n = len(capacities)
    header = 64 * KiB
    while header < 1024 + 2 * 192 * max(n, 1):
        header *= 2

    def slot(cap: int, enc: bool) -> int:
        return -(-(cap + (16 if enc else 0)) // 4096) * 4096

    live = [slot(c, False) for c, is_live, _e in capacities if is_live]
    other = [slot(c, e) for c, is_live, e in capacities if not is_live]
    return header, 2 * header + sum(live) + max(live, default=0) + 2 * sum(other)


def check_layout_rules(p: Plan) -> None:
    header, size = expected_image_size([(s.capacity, s.live, s.encrypted) for s in p.sections])
    assert p.header_area == header
    assert p.image_size == size
    extents = [(0, header), (header, header)]
    if p.scratch_length:
        extents.append((p.scratch_offset, p.scratch_length))
    for s in p.sections:
        extents.append((s.offset, s.reserved))
        if s.spare is not None:
            extents.append((s.spare, s.reserved))
        assert (s.spare is None) == s.live, s.name
    extents.sort()
    if len(extents) > 2:
        assert extents[2][0] == 2 * header  # data starts right after header B
    for (a, alen), (b, _) in zip(extents, extents[1:], strict=False):
        assert a % 4096 == 0 and a + alen == b, (a, alen, b)  # aligned, packed, no overlap
    assert extents[-1][0] + extents[-1][1] == p.image_size
    live = [s for s in p.sections if s.live]
    assert [s.offset for s in live] == sorted(s.offset for s in live)
    assert all(s.offset < p.scratch_offset for s in live)
    assert all(s.offset > p.scratch_offset for s in p.sections if not s.live)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("encrypted", [False, True])
def test_totals_follow_the_layout_rules(case: str, encrypted: bool) -> None:
    p = plan_domain((DATA / f"{case}-in.xml").read_text(), encrypted=encrypted)
    check_layout_rules(p)
    assert all(s.encrypted == p.encrypted for s in p.sections)
    for s in p.live_sections:  # with a key, a LUKS volume: its header in the slot
        assert s.luks == p.encrypted
        assert s.capacity - s.payload == (LUKS_HEADER_SIZE if p.encrypted else 0)


@pytest.mark.parametrize("case", CASES)
def test_golden_plans(case: str, golden: Golden) -> None:
    p = plan_domain((DATA / f"{case}-in.xml").read_bytes())
    golden(DATA / f"{case}-plan.json", json.dumps(plan_to_json(p), indent=2) + "\n")
    golden(DATA / f"{case}-plan.txt", render_text(p))


# -- where the sections come from --------------------------------------------


def test_uefi_tpm2_example_sizes() -> None:
    p = plan_domain(dom(TPM2, OVMF4M))
    sizes = {s.name: (s.binding, s.capacity) for s in p.sections}
    assert sizes == {
        "uefi-vars": (Binding.PFLASH, 540_672),
        "tpm-permall": (Binding.TPM, 256 * KiB),
        "tpm-volatilestate": (Binding.TPM, 68 * KiB),
    }
    assert p.find("uefi-vars").template == "/usr/share/OVMF/OVMF_VARS_4M.fd"  # type: ignore[union-attr]
    assert p.image == "/var/lib/libvirt/nvmgr/t.nvram" and p.format == "raw"


def test_tpm_profiles_cover_the_measured_maxima() -> None:
    """notes/measurements.md: NV filled until TPM_RC_NV_SPACE, all 4 PCR banks,
    after TPM2_Shutdown(STATE): permall 150,814 bytes; volatile state is a
    UINT16-sized libtpms blob; TPM 1.2 maxima from TPMLIB_GetTPMProperty."""
    t2 = {s.suffix: s.size for s in profiles.PROFILES["tpm-2.0"].sections}
    t12 = {s.suffix: s.size for s in profiles.PROFILES["tpm-1.2"].sections}
    assert t2["-permall"] >= 176_832 + 32 * KiB + 100 > 150_814
    assert t2["-volatilestate"] >= 65_535 + 100
    assert t12["-permall"] >= 40_960 + 100
    assert t12["-savestate"] >= 21_088 + 100
    assert t12["-volatilestate"] >= 21_319 + 100


@pytest.mark.parametrize(
    ("tpm", "names"),
    [
        ("<tpm model='tpm-crb'><backend type='emulator'/></tpm>",
         ["tpm-permall", "tpm-volatilestate"]),
        ("<tpm model='tpm-tis'><backend type='emulator'/></tpm>",
         ["tpm-permall", "tpm-savestate", "tpm-volatilestate"]),
        ("<tpm><backend type='emulator'/></tpm>",
         ["tpm-permall", "tpm-savestate", "tpm-volatilestate"]),
        ("<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>",
         ["tpm-permall", "tpm-volatilestate"]),
        ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
         []),
        ("<tpm model='tpm-crb'><backend type='external'><source type='unix' path='/s'/></backend></tpm>",
         []),
    ],
)
def test_tpm_sections_follow_libvirts_default_versions(tpm: str, names: list[str]) -> None:
    assert [s.name for s in plan_domain(dom(tpm)).sections] == names


def test_a_second_tpm_gets_its_own_prefix() -> None:
    p = plan_domain(dom(TPM2 + TPM2))
    assert [s.name for s in p.sections] == [
        "tpm-permall", "tpm-volatilestate", "tpm1-permall", "tpm1-volatilestate"]
    assert [s.device for s in p.sections] == ["tpm0", "tpm0", "tpm1", "tpm1"]


def test_unknown_tpm_version_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown device kind 'tpm-3.0'"):
        plan_domain(dom("<tpm model='tpm-crb'><backend type='emulator' version='3.0'/></tpm>"))


@pytest.mark.parametrize(
    "os_",
    [
        "",
        "<loader readonly='yes' type='rom'>/usr/share/seabios/bios.bin</loader>",
        "<loader readonly='yes'>/usr/share/OVMF/OVMF_CODE.fd</loader>",
        "<loader readonly='yes' type='pflash' stateless='yes'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>",
    ],
)
def test_no_uefi_vars_without_a_persistent_pflash_loader(os_: str) -> None:
    assert plan_domain(dom("", os_)).sections == ()


def test_an_empty_domain_plans_an_image_with_headers_only() -> None:
    p = plan_domain(dom(""))
    assert p.image_size == 2 * 64 * KiB and p.scratch_length == 0
    check_layout_rules(p)


@pytest.mark.parametrize(
    ("os_", "size", "source"),
    [
        ("<loader type='pflash'>/x/OVMF_CODE.fd</loader>", 128 * KiB, "loader name OVMF_CODE.fd"),
        ("<loader type='pflash'>/x/OVMF_CODE_4M.fd</loader><nvram template='/x/OVMF_VARS.fd'/>",
         128 * KiB, "template name OVMF_VARS.fd"),
        ("<loader type='pflash'>/x/AAVMF_CODE.fd</loader>", 64 * MiB, "loader name AAVMF_CODE.fd"),
        ("<loader type='pflash'>/x/edk2-x86_64-code.fd</loader>", 528 * KiB, "loader name"),
    ],
)
def test_uefi_vars_size_lookups(os_: str, size: int, source: str) -> None:
    [s] = plan_domain(dom("", os_)).sections
    assert (s.capacity, s.binding) == (size, Binding.PFLASH)
    assert source in s.source


def test_unknown_firmware_asks_for_a_size() -> None:
    with pytest.raises(InvalidInputError, match="<nvmgr:section name='uefi-vars' size="):
        plan_domain(dom("", "<loader type='pflash'>/x/MY_CODE.fd</loader>"))
    p = plan_domain(dom("", "<loader type='pflash'>/x/MY_CODE.fd</loader>",
                        "<nvmgr:section name='uefi-vars' size='256K'/>"))
    assert p.sections[0].capacity == 256 * KiB


@pytest.mark.parametrize("meta", ["", "<nvmgr:section name='uefi-vars' size='256K'/>"])
def test_a_pflash_loader_without_a_path_is_refused_not_asserted(meta: str) -> None:
    # This used to trip an assert: gone under python -O, a traceback otherwise.
    with pytest.raises(InvalidInputError, match="names no firmware file"):
        plan_domain(dom("", "<loader readonly='yes' type='pflash'/>", meta))


def test_uefi_vars_size_from_the_template_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # read real files here
    raw = tmp_path / "MY_VARS.fd"
    raw.write_bytes(bytes(768 * KiB))
    assert profiles.uefi_vars_size(str(raw), None).size == 768 * KiB
    qcow = tmp_path / "MY_VARS.qcow2"  # a qcow2 header: the virtual size counts, not the file's
    qcow.write_bytes(b"QFI\xfb" + struct.pack(">I", 3) + bytes(16) + struct.pack(">Q", 528 * KiB)
                     + bytes(4096))
    assert profiles.uefi_vars_size(str(qcow), None).size == 528 * KiB
    code = tmp_path / "MY_CODE.fd"
    code.write_bytes(bytes(3_653_632))
    assert profiles.uefi_vars_size(None, str(code)).size == 540_672


def test_firmware_autoselection_follows_descriptors_and_features() -> None:
    efi = "<features><smm state='{}'/></features>"
    base = ("<domain><name>t</name><os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>"
            "{}</os>{}</domain>")
    want_sb = "<firmware><feature enabled='yes' name='secure-boot'/></firmware>"
    [s] = plan_domain(base.format(want_sb, efi.format("on"))).sections
    assert s.capacity == 528 * KiB
    with pytest.raises(NotFoundError, match="no UEFI firmware descriptor"):
        plan_domain(base.format(want_sb, efi.format("off")))
    fw = profiles.select_firmware("x86_64", "q35", {"secure-boot": False})
    assert fw.loader == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert profiles.select_firmware("x86_64", "q35", {}).loader.endswith("secboot.fd")
    assert profiles.select_firmware("x86_64", "q35", {}, smm=False).loader.endswith("CODE_4M.fd")
    with pytest.raises(NotFoundError):
        profiles.select_firmware("aarch64", "virt", {})


# -- metadata declarations ----------------------------------------------------


def test_declared_sections_and_kinds() -> None:
    p = plan_domain((DATA / "sections-in.xml").read_text())
    by = {s.name: s for s in p.sections}
    assert by["nic0-eeprom"].capacity == profiles.PROFILES["nic-eeprom"].sections[0].size
    assert by["vpd0"].binding is Binding.FWCFG and by["vpd0"].fwcfg_name == "opt/org.example/vpd0"
    assert by["blk0"].binding is Binding.BLOCK and by["blk0"].driver == "virtio-blk-pci"
    assert by["fru"].capacity == 1536 and by["fru"].binding is Binding.OPAQUE
    assert by["tpm-permall"].capacity == 512 * KiB and "override" in by["tpm-permall"].source
    assert p.encrypted  # the metadata names a key secret: live sections are LUKS volumes
    assert by["uefi-vars"].payload == 128 * KiB
    assert by["uefi-vars"].capacity == 128 * KiB + LUKS_HEADER_SIZE


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ("<nvmgr:section name='x'/>", "section x needs a size or a kind"),
        ("<nvmgr:section name='x' kind='floppy'/>", "unknown device kind 'floppy'"),
        ("<nvmgr:section name='x' kind='tpm-2.0'/>", "comes from the domain's devices"),
        ("<nvmgr:section name='x' size='1K' binding='pflash'/>", "declared sections are opaque"),
        ("<nvmgr:section name='x' size='1K' binding='tpm'/>", "declared sections are opaque"),
        ("<nvmgr:section name='x' size='1000' binding='block'/>", "multiple of 512"),
        ("<nvmgr:section name='tpm-permall' size='1M' binding='opaque'/>", "bound tpm by the domain"),
        ("<nvmgr:section name='tpm-permall' kind='nic-eeprom'/>", "may only change its size"),
        ("<nvmgr:section name='uefi-vars' size='1000'/>", "multiple of 512"),
    ],
)
def test_bad_declarations(meta: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        plan_domain(dom(TPM2, OVMF4M, meta))


def test_spapr_nvram_kind_brings_its_device() -> None:
    p = plan_domain(dom("", "", "<nvmgr:section name='nvram' kind='spapr-nvram'/>"))
    [s] = p.sections
    assert (s.binding, s.capacity, s.driver) == (Binding.BLOCK, 64 * KiB, "spapr-nvram")


def test_encryption_pads_non_live_sections_and_makes_live_ones_luks_volumes() -> None:
    meta = "<nvmgr:section name='blob' size='4K'/><nvmgr:section name='disk' size='1M' " \
           "binding='block'/>"
    plain = plan_domain(dom("", OVMF4M, meta))
    enc = plan_domain(dom("", OVMF4M, meta), encrypted=True)
    assert plain.find("blob").reserved == 4 * KiB  # type: ignore[union-attr]
    assert enc.find("blob").reserved == 8 * KiB  # type: ignore[union-attr]
    for name, payload in (("uefi-vars", 540672), ("disk", 1 << 20)):
        p, e = plain.find(name), enc.find(name)
        assert p is not None and e is not None
        assert (p.luks, p.capacity, p.payload) == (False, payload, payload)
        # the slot (QEMU's raw slice) holds the LUKS header and the payload;
        # the device (on the luks node) sees exactly the payload
        assert (e.luks, e.encrypted, e.payload) == (True, True, payload)
        assert e.capacity == payload + LUKS_HEADER_SIZE == payload + 2_068_480
        assert e.reserved == -(-e.capacity // 4096) * 4096
    check_layout_rules(enc)


def test_metadata_image_uuid_is_kept() -> None:
    xml = dom("", "", "").replace(
        "<os>", "<metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' "
        "uuid='11111111-2222-3333-4444-555555555555' image='/srv/t.qcow2' format='qcow2'/>"
        "</metadata><os>")
    p = plan_domain(xml)
    assert str(p.image_uuid) == "11111111-2222-3333-4444-555555555555"
    assert str(p.directory.image_uuid) == str(p.image_uuid)
    assert (p.image, p.format) == ("/srv/t.qcow2", "qcow2")


def test_many_sections_grow_the_header_area() -> None:
    meta = "".join(f"<nvmgr:section name='s{i}' size='512'/>" for i in range(200))
    p = plan_domain(dom("", "", meta))
    assert p.header_area == 128 * KiB  # 1024 + 2 x 192 x 200 > 64 KiB
    check_layout_rules(p)


def test_hostile_xml_is_refused_by_plan_too() -> None:
    with pytest.raises(InvalidInputError, match="DOCTYPE"):
        plan_domain("<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><domain/>")


def test_render_text_lists_every_extent() -> None:
    p = plan_domain((DATA / "sections-in.xml").read_text())
    text = render_text(p)
    for s in p.sections:
        assert f"{s.offset:#x}" in text and s.name in text
        if s.spare is not None:
            assert f"{s.spare:#x}" in text
    assert "scratch" in text and "header B" in text


def test_plan_to_json_is_json() -> None:
    p = plan_domain((DATA / "uefi-tpm2-in.xml").read_text())
    data = json.loads(json.dumps(plan_to_json(p)))
    assert data["image"]["size"] == p.image_size
    assert [s["name"] for s in data["sections"]] == [s.name for s in p.sections]


def test_default_image_path_refuses_unusable_names() -> None:
    assert planmod.default_image_path("vm1") == "/var/lib/libvirt/nvmgr/vm1.nvram"
    with pytest.raises(InvalidInputError):
        planmod.default_image_path("../etc")


@pytest.mark.parametrize("example", sorted((DATA.parent.parent / "examples").glob("*.xml")),
                         ids=lambda p: p.name)
def test_examples_plan(example: Path) -> None:
    p = plan_domain(example.read_text())
    assert p.find("uefi-vars") is not None and p.find("tpm-permall") is not None
    check_layout_rules(p)
