"""QEMU arguments and the domain rewrite: golden files, idempotence, libvirt round trips."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Golden

from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.metadata import NvmgrMetadata
from nvmgr.domain.plan import Plan, plan_domain
from nvmgr.errors import InvalidInputError, UsageError
from nvmgr.format.model import LUKS_HEADER_SIZE

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(p.name[: -len("-in.xml")] for p in DATA.glob("*-in.xml"))
IMAGE_UUID = uuid.UUID("22222222-3333-4444-5555-666666666666")


pytestmark = pytest.mark.usefixtures("host_independent")


def rewrite(xml: str, **kw: object) -> tuple[str, Plan]:
    p = plan_domain(xml)
    return qemuargs.rewrite_domain(xml, p, p.image, p.format, IMAGE_UUID, **kw), p  # type: ignore[arg-type]


def pairs(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for opt, value in zip(args[::2], args[1::2], strict=False):
        out.setdefault(opt, []).append(value)
    return out


# -- golden files -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_rewrite_and_strip(case: str, golden: Golden) -> None:
    xml = (DATA / f"{case}-in.xml").read_text()
    out, _ = rewrite(xml)
    golden(DATA / f"{case}-out.xml", out)
    golden(DATA / f"{case}-stripped.xml", qemuargs.strip_nvmgr(out))


@pytest.mark.parametrize("case", CASES)
def test_rewrite_is_idempotent_and_the_plan_survives_it(case: str) -> None:
    xml = (DATA / f"{case}-in.xml").read_text()
    out, p = rewrite(xml)
    p2 = plan_domain(out)
    assert p2.sections == p.sections and p2.image_size == p.image_size
    again = qemuargs.rewrite_domain(out, p2, p.image, p.format, IMAGE_UUID)
    assert again == out


@pytest.mark.parametrize("case", ["uefi-tpm2", "bios-tpm12", "aavmf"])
def test_strip_gives_back_the_original_domain(case: str) -> None:
    xml = (DATA / f"{case}-in.xml").read_text()
    out, _ = rewrite(xml)
    assert qemuargs.strip_nvmgr(out) == parse_domain(xml).to_xml()


def test_strip_restores_firmware_autoselection() -> None:
    xml = (DATA / "firmware-efi-in.xml").read_text()
    out, _ = rewrite(xml)
    dom = parse_domain(out)
    assert dom.os is not None and dom.os.firmware is None and dom.os.firmware_features() == {}
    assert dom.os.loader is not None and dom.os.loader.path == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert qemuargs.strip_nvmgr(out) == parse_domain(xml).to_xml()


def test_strip_can_keep_declared_sections() -> None:
    out, _ = rewrite((DATA / "sections-in.xml").read_text())
    kept = parse_domain(qemuargs.strip_nvmgr(out, keep_sections=True)).nvmgr
    assert kept is not None and kept.image is None and kept.uuid is None
    assert [s.name for s in kept.sections] == ["nic0-eeprom", "vpd0", "blk0", "fru", "tpm-permall"]


# -- the arguments --------------------------------------------------------------


def test_uefi_arguments() -> None:
    out, p = rewrite((DATA / "uefi-tpm2-in.xml").read_text())
    dom = parse_domain(out)
    args = dom.qemu_args
    vars_ = p.find("uefi-vars")
    assert vars_ is not None
    assert args[:6] == [
        "-blockdev",
        json.dumps({"driver": "file", "filename": p.image, "node-name": "nvmgr-file",
                    "discard": "unmap"}, separators=(",", ":")),
        "-blockdev",
        json.dumps({"driver": "raw", "file": "nvmgr-file", "offset": vars_.offset,
                    "size": vars_.capacity, "node-name": "nvmgr-uefi-vars"}, separators=(",", ":")),
        "-machine", "pflash1=nvmgr-uefi-vars",
    ]
    # the user's own arguments follow, untouched, even one that looks like ours
    assert args[6:] == ["-machine", "pflash1=not-ours", "-no-reboot"]
    assert 'qemu:env name="SPICE_DEBUG_ALLOW_MC"' in out
    assert dom.os is not None and dom.os.nvram is None and dom.os.loader is not None
    loader = dom.os.loader
    assert (loader.readonly, loader.type, loader.stateless) == (True, "pflash", True)
    meta = dom.nvmgr
    assert meta is not None and (meta.image, meta.format, meta.uuid) == (p.image, "raw", IMAGE_UUID)
    assert meta.libvirt_nvram is not None
    assert meta.libvirt_nvram.template == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_block_fwcfg_and_key_arguments() -> None:
    """A domain with a key: each live section's raw slice carries a ``luks``
    node, the device and pflash use that node, and the passphrase comes from
    the runtime key file through one secret object (never in the arguments)."""
    xml = (DATA / "sections-in.xml").read_text()
    p = plan_domain(xml)
    assert p.encrypted  # sections-in.xml names a key secret
    args = qemuargs.qemu_args(p, "/srv/img.qcow2", "qcow2")
    by = pairs(args)
    dom_uuid = "5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c03"
    assert by["-object"] == [
        f"secret,id=nvmgr-key,format=raw,file=/run/nvmgr/{dom_uuid}/image.key"]
    assert qemuargs.key_path(dom_uuid) == f"/run/nvmgr/{dom_uuid}/image.key"
    assert json.loads(by["-blockdev"][1]) == {
        "driver": "qcow2", "file": "nvmgr-file", "node-name": "nvmgr-image"}
    nodes = [json.loads(v) for v in by["-blockdev"][2:]]
    slices = [n for n in nodes if n["driver"] == "raw"]
    assert all(s["file"] == "nvmgr-image" and s["size"] % 512 == 0 for s in slices)
    assert [s["node-name"] for s in slices] == ["nvmgr-uefi-vars", "nvmgr-blk0"]
    for sl in slices:  # the slice is the LUKS volume: header and payload
        ps = p.find(sl["node-name"].removeprefix("nvmgr-"))
        assert ps is not None and ps.luks
        assert sl["size"] == ps.capacity == ps.payload + LUKS_HEADER_SIZE
    luks = [n for n in nodes if n["driver"] == "luks"]
    assert luks == [
        {"driver": "luks", "file": "nvmgr-uefi-vars", "key-secret": "nvmgr-key",
         "node-name": qemuargs.luks_node_name("uefi-vars")},
        {"driver": "luks", "file": "nvmgr-blk0", "key-secret": "nvmgr-key",
         "node-name": qemuargs.luks_node_name("blk0")}]
    assert by["-machine"] == [f"pflash1={qemuargs.luks_node_name('uefi-vars')}"]
    assert [json.loads(v) for v in by["-device"]] == [
        {"driver": "virtio-blk-pci", "drive": qemuargs.luks_node_name("blk0"), "id": "nvblk0",
         "share-rw": True}]
    assert by["-fw_cfg"] == [f"name=opt/org.example/vpd0,file=/run/nvmgr/{dom_uuid}/vpd0"]
    assert qemuargs.staged_path(dom_uuid, "vpd0") == f"/run/nvmgr/{dom_uuid}/vpd0"
    assert qemuargs.user_args(args + ["-S"]) == ["-S"]
    # the offsets the hook checks are the raw slices', not the luks nodes'
    assert set(qemuargs.slice_offsets(args)) == {"nvmgr-uefi-vars", "nvmgr-blk0"}


def test_luks_nodes_are_rewritten_idempotently_and_stripped() -> None:
    xml = (DATA / "sections-in.xml").read_text()
    p = plan_domain(xml)
    out = qemuargs.rewrite_domain(xml, p, "/srv/i.qcow2", "qcow2", IMAGE_UUID)
    got = parse_domain(out).qemu_args
    assert any(a.startswith("secret,id=nvmgr-key,") for a in got)
    assert sum('"driver":"luks"' in a for a in got) == 2
    assert qemuargs.rewrite_domain(out, p, "/srv/i.qcow2", "qcow2", IMAGE_UUID) == out
    assert qemuargs.wiring_problems(parse_domain(out), p) == []
    stripped = qemuargs.strip_nvmgr(out)
    assert "nvmgr-key" not in stripped and "luks" not in stripped


def test_luks_node_names_are_short_and_distinct() -> None:
    names = ["uefi-vars", "x" * 64, "a+b", "a_b", "blk0"]
    nodes = [qemuargs.luks_node_name(n) for n in names]
    assert len(set(nodes)) == len(nodes)
    assert all(qemuargs._NODE_RE.fullmatch(n) for n in nodes)
    assert not set(nodes) & {qemuargs.node_name(n) for n in names}


def test_strip_keeps_an_explicit_loader_the_user_named() -> None:
    xml = ("<domain><name>t</name><uuid>5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c0a</uuid><os>"
           "<type arch='x86_64' machine='q35'>hvm</type>"
           "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>"
           "</domain>")
    out, _ = rewrite(xml)
    assert qemuargs.strip_nvmgr(out) == parse_domain(xml).to_xml()


def test_no_arguments_without_live_or_fwcfg_sections() -> None:
    out, p = rewrite((DATA / "bios-tpm12-in.xml").read_text())
    assert qemuargs.qemu_args(p, p.image, "raw") == []
    assert "qemu:commandline" not in out and "nvmgr:nvram" in out


@pytest.mark.parametrize(
    ("image", "fmt", "needle"),
    [
        ("relative.nvram", "raw", "absolute"),
        ("/i.vmdk", "vmdk", "not raw or qcow2"),
    ],
)
def test_bad_argument_requests(image: str, fmt: str, needle: str) -> None:
    p = plan_domain((DATA / "uefi-tpm2-in.xml").read_text())
    with pytest.raises(UsageError, match=needle):
        qemuargs.qemu_args(p, image, fmt)


def test_fwcfg_needs_a_domain_uuid() -> None:
    xml = (DATA / "sections-in.xml").read_text().replace(
        "<uuid>5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c03</uuid>", "")
    with pytest.raises(UsageError, match="no <uuid>"):
        qemuargs.qemu_args(plan_domain(xml), "/i.nvram", "raw")


@pytest.mark.parametrize("name", ["uefi-vars", "0abc", "a+b", "x" * 64, "a.b_c-d"])
def test_node_names_are_valid_for_qemu_and_unique(name: str) -> None:
    node = qemuargs.node_name(name)
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", node), node
    assert node != qemuargs.node_name(name + "x")


def test_rewrite_refuses_uefi_plan_for_a_domain_without_os() -> None:
    p = plan_domain((DATA / "uefi-tpm2-in.xml").read_text())
    with pytest.raises(InvalidInputError, match="no <os>"):
        qemuargs.rewrite_domain("<domain><name>x</name></domain>", p, "/i", "raw", IMAGE_UUID)


def test_rewrite_keeps_key_and_sections_from_existing_metadata() -> None:
    out, _ = rewrite((DATA / "sections-in.xml").read_text())
    meta = parse_domain(out).nvmgr
    assert meta is not None and meta.key_secret is not None and len(meta.sections) == 5
    assert "other:keep" in out


def test_slice_offsets_reads_back_what_qemu_args_wrote() -> None:
    p = plan_domain((DATA / "sections-in.xml").read_text())
    args = qemuargs.qemu_args(p, "/srv/img.qcow2", "qcow2")
    user = ["-blockdev", '{"driver":"raw","file":"x","offset":7,"node-name":"mine"}', "-S"]
    assert qemuargs.slice_offsets(user + args) == {
        qemuargs.node_name(s.name): s.offset for s in p.live_sections}


def test_apply_plan_edits_the_parsed_domain_in_place() -> None:
    xml = (DATA / "uefi-tpm2-in.xml").read_text()
    p = plan_domain(xml)
    dom = parse_domain(xml)
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID)
    assert dom.to_xml() == qemuargs.rewrite_domain(xml, p, p.image, p.format, IMAGE_UUID)
    qemuargs.strip(dom)
    assert dom.to_xml() == parse_domain(xml).to_xml()


def test_the_prepare_hook_checks_the_offsets_the_arguments_carry(tmp_path: Path) -> None:
    """prepare reads the slices' offsets through slice_offsets and refuses a mismatch."""
    from nvmgr.domain.plan import plan_for
    from nvmgr.errors import CorruptError
    from nvmgr.hook import lifecycle
    from nvmgr.provision import staging
    from nvmgr.provision.prepare import plan_with_offsets, prepare_image

    image = tmp_path / "vm.nvram"
    xml = (DATA / "sections-in.xml").read_text().replace(
        "key-secret='9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a'", f"image='{image}'")
    dom = parse_domain(xml)
    plan = plan_for(dom)
    img, _, _ = prepare_image(plan, kek=None, fmt="raw", path=str(image))
    with img:
        placed = plan_with_offsets(plan, img.directory)
        image_uuid = img.directory.image_uuid
    qemuargs.apply_plan(dom, placed, str(image), "raw", image_uuid)
    out = dom.to_xml()
    me = f"+{os.getuid()}", f"+{os.getgid()}"
    users = staging.Users(*me, *me)

    def prepare(text: str) -> str:
        ctx = lifecycle.HookContext.of("t", "prepare", "begin", text, parse_domain(text), users)
        assert ctx is not None
        ctx.swtpm_root, ctx.runtime_root = str(tmp_path / "swtpm"), str(tmp_path / "run")
        return lifecycle.prepare(ctx)

    assert "verified" in prepare(out)
    blk0 = placed.find("blk0")
    assert blk0 is not None
    moved = out.replace(f"&quot;offset&quot;:{blk0.offset},", f"&quot;offset&quot;:{blk0.offset + 4096},")
    assert moved != out
    with pytest.raises(CorruptError, match=f"section blk0 is at offset {blk0.offset}"):
        prepare(moved)


def test_rewrite_refuses_hostile_xml() -> None:
    p = plan_domain((DATA / "uefi-tpm2-in.xml").read_text())
    with pytest.raises(InvalidInputError, match="DOCTYPE"):
        qemuargs.rewrite_domain("<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>", p, "/i", "raw",
                                IMAGE_UUID)


# -- libvirt round trips -----------------------------------------------------------

libvirt = pytest.importorskip("libvirt")


def test_test_driver_keeps_the_metadata() -> None:
    """libvirt's test:///default driver stores the nvmgr metadata unchanged.

    It has no qemu namespace, so it drops <qemu:commandline> (libvirt 9.0,
    measured); the qemu driver round trip is below.
    """
    out, p = rewrite((DATA / "sections-in.xml").read_text())
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(out)
        try:
            back = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        finally:
            dom.undefine()
    finally:
        conn.close()
    assert parse_domain(back).nvmgr == parse_domain(out).nvmgr
    assert plan_domain(back).sections == p.sections


@pytest.fixture(scope="module")
def embed_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real qemu driver without a daemon (``qemu:///embed``): it parses qemu:commandline."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("needs qemu-system-x86_64")
    libvirt.virEventRegisterDefaultImpl()
    root = tmp_path_factory.mktemp("embed")
    try:
        conn = libvirt.open(f"qemu:///embed?root={root}")
    except libvirt.libvirtError as e:
        pytest.skip(f"qemu:///embed unavailable: {e}")
    yield conn
    conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["uefi-tpm2", "sections", "firmware-efi"])
def test_qemu_driver_keeps_commandline_and_metadata(embed_conn: object, case: str) -> None:
    out, p = rewrite((DATA / f"{case}-in.xml").read_text())
    dom = embed_conn.defineXML(out)  # type: ignore[attr-defined]
    try:
        back = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefine()
    mine, theirs = parse_domain(out), parse_domain(back)
    assert theirs.qemu_args == mine.qemu_args
    assert theirs.nvmgr == mine.nvmgr
    assert theirs.os is not None and theirs.os.nvram is None
    assert theirs.os.loader is not None and theirs.os.loader.stateless is True
    # libvirt's own additions (machine type expansion, defaults) do not disturb nvmgr
    assert plan_domain(back).sections == p.sections
    again = parse_domain(qemuargs.rewrite_domain(back, p, p.image, p.format, IMAGE_UUID))
    assert again.qemu_args == theirs.qemu_args and again.nvmgr == theirs.nvmgr


# -- end to end: OVMF boots with its vars in a slice of the image ----------------------


def _libvirtd_up() -> bool:
    return (os.geteuid() == 0 and os.path.exists("/run/libvirt/libvirt-sock")
            and shutil.which("virsh") is not None)


def virsh(args: list[str], *, check: bool = True) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                       check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not _libvirtd_up(), reason="needs root and a running libvirtd")
@pytest.mark.skipif(not os.path.exists("/usr/share/OVMF/OVMF_VARS_4M.fd"), reason="needs OVMF")
def test_ovmf_boots_with_vars_in_a_raw_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewritten domain starts under the real libvirtd; OVMF finds and writes its vars."""
    from nvmgr.format.layout import SectionSpec
    from nvmgr.image.image import Image

    monkeypatch.undo()  # real firmware files
    name = f"nvmgr-test-{uuid.uuid4().hex[:8]}"
    xml = (ROOT / "examples" / "uefi-tpm.xml").read_text()
    xml = xml.replace("nvmgr-example-uefi-tpm", name).replace(
        "6f1c2a9e-4f0e-4d7b-9a51-3c2d8e7b1a01", str(uuid.uuid4()))
    image = f"/var/lib/libvirt/nvmgr/{name}.nvram"
    serial = Path(f"/var/log/libvirt/qemu/{name}-serial.log")
    p = plan_domain(xml)
    vars_ = p.find("uefi-vars")
    assert vars_ is not None
    template = Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()
    os.makedirs(os.path.dirname(image), exist_ok=True)
    specs = [SectionSpec(s.name, s.capacity, s.binding, s.encrypted, s.device) for s in p.sections]
    with Image.create(image, specs, domain_uuid=p.domain_uuid) as img:
        assert img.section("uefi-vars").offset == vars_.offset  # the plan is the layout
        img.put("uefi-vars", template)
        image_uuid = img.directory.image_uuid
    out = qemuargs.rewrite_domain(xml, p, image, "raw", image_uuid)
    shutil.chown(image, "libvirt-qemu", "kvm")  # libvirt does not chown qemu:commandline files
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(out)
    # virsh, not libvirt-python: this process may hold an embedded qemu driver
    virsh(["define", str(xml_file)])
    try:
        virsh(["start", name])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if serial.exists() and b"Shell>" in serial.read_bytes():
                break
            time.sleep(0.5)
        log = Path(f"/var/log/libvirt/qemu/{name}.log").read_text()
        assert "-machine pflash1=nvmgr-uefi-vars" in log
        assert f'"offset":{vars_.offset},"size":{vars_.capacity}' in log
        assert b"Shell>" in serial.read_bytes(), "OVMF did not reach its shell"
        with open(image, "rb") as f:
            f.seek(vars_.offset)
            written = f.read(vars_.capacity)
    finally:
        virsh(["destroy", name], check=False)
        virsh(["undefine", name])  # no --nvram needed: the loader is stateless
        serial.unlink(missing_ok=True)
        os.unlink(image)
    assert written != template  # OVMF wrote its variables into the slice
    if shutil.which("virt-fw-vars"):
        vars_file = tmp_path / "vars.fd"
        vars_file.write_bytes(written)
        r = subprocess.run(["virt-fw-vars", "-i", str(vars_file), "--print"],
                           capture_output=True, text=True, check=False)
        assert "BootOrder" in r.stdout, r.stderr


def test_define_parses_the_domain_xml_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No UUID, declared sections: define edits one tree and writes it out once."""
    from nvmgr.domain import elements
    from nvmgr.virt.define import define

    parses: list[object] = []
    real = elements.parse_tree

    def counting(data: str | bytes, **kw: str) -> object:
        parses.append(data)
        return real(data, **kw)

    monkeypatch.setattr(elements, "parse_tree", counting)
    image = tmp_path / "vm.nvram"
    xml = (DATA / "sections-in.xml").read_text().replace(
        "<uuid>5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c03</uuid>", "").replace(
        "key-secret='9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a'", f"image='{image}'")
    res = define(xml, uri="test:///default")
    assert len(parses) == 1
    assert res.created and image.exists()
    out = parse_domain(res.xml)
    assert out.uuid is not None and out.nvmgr is not None and out.nvmgr.image == str(image)
    assert qemuargs.slice_offsets(out.qemu_args)


# -- wiring: a domain that asks for nvmgr and does not have its arguments ------


def _ours(case: str) -> tuple[str, Plan]:
    out, _ = rewrite((DATA / f"{case}-in.xml").read_text())
    return out, plan_domain(out)


@pytest.mark.parametrize("case", CASES)
def test_a_rewritten_domain_is_wired(case: str) -> None:
    out, p = _ours(case)
    assert qemuargs.wiring_problems(parse_domain(out), p) == []


@pytest.mark.parametrize("case", CASES)
def test_a_domain_that_only_asks_for_nvmgr_is_not_wired(case: str) -> None:
    """``virsh define`` of XML with ``<nvmgr:nvram/>`` and nothing else of nvmgr's."""
    out, _ = _ours(case)
    dom = parse_domain(qemuargs.strip_nvmgr(out))
    assert dom.nvmgr is None
    assert qemuargs.wiring_problems(dom, plan_domain(out)) == [
        "it has no <nvmgr:nvram> metadata"]
    dom.set_nvmgr(NvmgrMetadata())
    assert qemuargs.wiring_problems(dom, plan_domain(out)) == [
        "its <nvmgr:nvram> metadata names no image yet"]


def test_dropped_commandline_is_named() -> None:
    out, p = _ours("uefi-tpm2")
    dom = parse_domain(out)
    dom.qemu_args = []
    problems = qemuargs.wiring_problems(dom, p)
    assert len(problems) == 1 and problems[0].startswith("<qemu:commandline> lacks")
    assert "pflash1=nvmgr-uefi-vars" in problems[0]


def test_a_stateful_loader_again_is_named() -> None:
    out, p = _ours("uefi-tpm2")
    dom = parse_domain(out)
    assert dom.os is not None and dom.os.loader is not None
    dom.os.loader.stateless = None
    dom.os.add_nvram("/var/lib/libvirt/qemu/nvram/x_VARS.fd", None, None)
    problems = qemuargs.wiring_problems(dom, p)
    assert problems == ["its UEFI <loader> is not stateless='yes'",
                        "it has an <nvram> element (libvirt's own vars file)"]


def test_arguments_for_another_image_are_named() -> None:
    out, p = _ours("uefi-tpm2")
    moved = out.replace(p.image, "/elsewhere/other.nvram", 1)  # the -blockdev's filename only
    assert moved != out
    problems = qemuargs.wiring_problems(parse_domain(moved), p)
    assert any("other.nvram" in x for x in problems)


def test_slice_offsets_are_left_to_the_image_check() -> None:
    out, p = _ours("uefi-tpm2")
    shifted = re.sub(r"&quot;offset&quot;:(\d+)",
                     lambda m: f"&quot;offset&quot;:{int(m.group(1)) + 4096}", out)
    assert shifted != out
    assert qemuargs.wiring_problems(parse_domain(shifted), p) == []


# -- PCI Express root ports for boot-time block devices (q35) -----------------

Q35_BLOCK = """<domain type='kvm'>
  <name>ports</name>
  <uuid>5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c09</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' image='/srv/ports.nvram'>
      <nvmgr:section name='state0' size='64K' binding='block' driver='virtio-blk-pci'
                     device='nvmgr-state0'/>
      <nvmgr:section name='state1' size='64K' binding='block' driver='scsi-hd'/>
    </nvmgr:nvram>
  </metadata>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='MACHINE'>hvm</type></os>
  <devices>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <controller type='pci' index='3' model='pcie-root-port'/>
  </devices>
</domain>
"""


def _device(args: list[str], drive: str) -> dict[str, object]:
    return next(d for v in pairs(args).get("-device", [])
                if (d := json.loads(v)).get("drive") == drive)


def test_a_q35_pci_block_device_gets_a_root_port_of_its_own() -> None:
    xml = Q35_BLOCK.replace("MACHINE", "pc-q35-7.2")
    p = plan_domain(xml)
    dom = parse_domain(xml)
    assert qemuargs.missing_ports(dom, p) == [qemuargs.port_alias("state0")]
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID)
    alias = qemuargs.port_alias("state0")
    assert alias.startswith(qemuargs.PORT_PREFIX) and alias != qemuargs.port_alias("state1")
    # After every PCI controller the domain has (libvirt numbers its own below).
    assert dom.root_ports(qemuargs.PORT_PREFIX) == {alias: 4}
    assert _device(dom.qemu_args, "nvmgr-state0")["bus"] == alias
    assert "bus" not in _device(dom.qemu_args, "nvmgr-state1")  # not a PCI device
    assert qemuargs.wiring_problems(dom, p) == [] and qemuargs.missing_ports(dom, p) == []
    out = dom.to_xml()
    assert f"<alias name=\"{alias}\"/>" in out and out.count("pcie-root-port") == 3
    # Idempotent: the same port, no second one.
    again = qemuargs.rewrite_domain(out, plan_domain(out), p.image, p.format, IMAGE_UUID)
    assert again == out
    # strip takes the port with the arguments; the user's controllers stay.
    stripped = qemuargs.strip_nvmgr(out)
    assert alias not in stripped and stripped.count("pcie-root-port") == 2
    assert stripped == qemuargs.strip_nvmgr(qemuargs.rewrite_domain(
        xml, p, p.image, p.format, IMAGE_UUID, ))


def test_without_ports_the_device_stays_on_the_root_bus_and_is_wired() -> None:
    """ports=False (define's first step) and a domain an older nvmgr wired: no
    port, no bus=; the prepare hook's check takes it, reconcile adds the port."""
    xml = Q35_BLOCK.replace("MACHINE", "q35")
    p = plan_domain(xml)
    dom = parse_domain(xml)
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID, ports=False)
    assert dom.root_ports(qemuargs.PORT_PREFIX) == {}
    assert "bus" not in _device(dom.qemu_args, "nvmgr-state0")
    assert qemuargs.wiring_problems(dom, p) == []
    assert qemuargs.missing_ports(dom, p) == [qemuargs.port_alias("state0")]
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID)
    assert _device(dom.qemu_args, "nvmgr-state0")["bus"] == qemuargs.port_alias("state0")
    assert qemuargs.wiring_problems(dom, p) == []


def test_a_port_whose_device_is_gone_is_named_or_removed() -> None:
    xml = Q35_BLOCK.replace("MACHINE", "q35")
    p = plan_domain(xml)
    dom = parse_domain(xml)
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID)
    alias = qemuargs.port_alias("state0")
    # The port removed by hand (virsh edit), the bus= left: not wired, named.
    edited = parse_domain(dom.to_xml())
    edited.remove_root_port(alias)
    problems = qemuargs.wiring_problems(edited, p)
    assert problems and alias in " ".join(problems), problems
    # The section gone (detach --config): its port goes too.
    gone = re.sub(r"<nvmgr:section name='state0'[^>]*/>", "", xml)
    without = plan_domain(gone)
    assert all(s.name != "state0" for s in without.sections)
    qemuargs.apply_plan(dom, without, p.image, p.format, IMAGE_UUID)
    assert dom.root_ports(qemuargs.PORT_PREFIX) == {}
    assert not any("state0" in a for a in dom.qemu_args)


def test_no_port_on_a_machine_with_a_hot_plug_root_bus() -> None:
    xml = Q35_BLOCK.replace("MACHINE", "pc-i440fx-7.2")
    p = plan_domain(xml)
    dom = parse_domain(xml)
    qemuargs.apply_plan(dom, p, p.image, p.format, IMAGE_UUID)
    assert dom.root_ports(qemuargs.PORT_PREFIX) == {} and qemuargs.missing_ports(dom, p) == []
    assert "bus" not in _device(dom.qemu_args, "nvmgr-state0")


def test_a_pci_controller_index_that_is_no_number_is_refused() -> None:
    dom = parse_domain(Q35_BLOCK.replace("MACHINE", "q35").replace("index='3'", "index='x'"))
    with pytest.raises(InvalidInputError, match="index 'x'"):
        dom.add_root_port(qemuargs.port_alias("state0"))
