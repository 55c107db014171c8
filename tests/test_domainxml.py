"""Domain XML: hostile input is refused with a clear message; accessors read and write the tree."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from nvmgr.domain import metadata, xmlparse
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.metadata import LibvirtNvram, NvmgrMetadata, SectionDecl
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.errors import InvalidInputError
from nvmgr.format.model import Binding

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent

MINIMAL = "<domain type='qemu'><name>t</name></domain>"


def meta_domain(nvram_attrs: str = "", sections: str = "") -> str:
    return (
        "<domain type='qemu'><name>t</name><metadata>"
        f"<nvmgr:nvram xmlns:nvmgr='{NVMGR_NS}' {nvram_attrs}>{sections}"
        "</nvmgr:nvram></metadata></domain>"
    )


def section(attrs: str) -> str:
    return meta_domain(sections=f"<nvmgr:section {attrs}/>")


def refused(xml: str | bytes, *needles: str) -> str:
    with pytest.raises(InvalidInputError) as exc:
        dom = parse_domain(xml)
        _ = dom.nvmgr
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


# -- hostile documents ------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<domain type='qemu'><name>&lol9;</name></domain>"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='qemu'><name>&xxe;</name></domain>"""


def test_billion_laughs_is_refused_before_expansion() -> None:
    refused(BILLION_LAUGHS, "line 2", "<!DOCTYPE> is not allowed")


def test_external_entity_is_refused_and_the_file_is_not_read() -> None:
    msg = refused(EXTERNAL_ENTITY, "<!DOCTYPE> is not allowed")
    assert "root:" not in msg


def test_any_doctype_is_refused() -> None:
    refused("<!DOCTYPE domain>\n<domain><name>t</name></domain>", "<!DOCTYPE>")
    refused("<!doctype domain><domain/>", "<!DOCTYPE>")


def test_entity_declaration_alone_is_refused() -> None:
    refused("<domain><name>t</name></domain><!ENTITY x 'y'>", "<!ENTITY>")


def test_undeclared_entity_reference_is_not_well_formed() -> None:
    refused("<domain><name>&xxe;</name></domain>", "not well-formed", "xxe")


def test_xinclude_is_inert() -> None:
    xml = (
        "<domain xmlns:xi='http://www.w3.org/2001/XInclude'><name>t</name>"
        "<xi:include href='file:///etc/passwd' parse='text'/></domain>"
    )
    out = parse_domain(xml).to_xml()
    assert "root:" not in out and "xi:include" in out


def test_50_mb_input_is_refused_by_size() -> None:
    big = "<domain><name>t</name><description>" + "x" * (50 << 20) + "</description></domain>"
    refused(big, "52,428,", "1,048,576-byte limit")
    refused(big.encode(), "1,048,576-byte limit")


def test_input_just_under_the_cap_parses() -> None:
    pad = xmlparse.MAX_INPUT_BYTES - 200
    dom = parse_domain(f"<domain><name>t</name><description>{'x' * pad}</description></domain>")
    assert dom.name == "t"


@pytest.mark.parametrize("depth", [xmlparse.MAX_DEPTH + 1, 300, 100_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    xml = "<domain>" + "<a>" * depth + "</a>" * depth + "</domain>"
    refused(xml, f"nest deeper than {xmlparse.MAX_DEPTH} levels")


def test_nesting_at_the_cap_parses() -> None:
    n = xmlparse.MAX_DEPTH - 1
    assert parse_domain("<domain>" + "<a>" * n + "</a>" * n + "</domain>").name is None


def test_not_utf8_is_refused() -> None:
    refused("<domain><name>caf\xe9</name></domain>".encode("latin-1"), "not UTF-8")


def test_declared_non_utf8_encoding_is_refused() -> None:
    refused(b"<?xml version='1.0' encoding='ISO-8859-1'?><domain/>", "ISO-8859-1")


def test_text_with_utf8_declaration_and_bom_parses() -> None:
    assert parse_domain("<?xml version='1.0' encoding='UTF-8'?><domain><name>t</name></domain>")
    assert parse_domain(b"\xef\xbb\xbf<domain><name>t</name></domain>").name == "t"


def test_not_well_formed() -> None:
    refused("<domain><name>t</domain>", "not well-formed", "line 1")


def test_root_must_be_domain() -> None:
    refused("<network><name>t</name></network>", "<network>, not <domain>")


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x\x01"])
def test_unusable_domain_names(name: str) -> None:
    if name == "x\x01":
        refused(f"<domain><name>{name}</name></domain>", "not well-formed")
    else:
        refused(f"<domain><name>{name}</name></domain>", "domain name")


def test_malformed_uuid_names_the_element() -> None:
    refused("<domain><name>t</name><uuid>not-a-uuid</uuid></domain>", "<domain>", "a UUID")


def test_yesno_values_are_checked() -> None:
    dom = parse_domain(
        "<domain><os><loader readonly='maybe'>/x</loader></os></domain>"
    )
    assert dom.os is not None and dom.os.loader is not None
    with pytest.raises(InvalidInputError, match="'yes' or 'no'"):
        _ = dom.os.loader.readonly


# -- metadata ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "needle"),
    [
        ("10T", "larger than the 1 TiB limit"),
        ("2T", "larger than the 1 TiB limit"),
        ("-1", "invalid size"),
        ("1e9999", "invalid size"),
        ("0", "at least 1 byte"),
        ("", "invalid size"),
        ("99999999999999999999999", "invalid size"),
        ("12 bananas", "invalid size"),
        ("0x100", "invalid size"),
    ],
)
def test_bad_sizes(size: str, needle: str) -> None:
    refused(section(f"name='s' size='{size}'"), "section s", needle)


def test_one_tib_section_passes_the_section_limit_but_not_the_total() -> None:
    refused(section("name='s' size='1T'"), "total", "64 GiB limit")


def test_sizes_add_up_against_the_total_cap() -> None:
    secs = "".join(f"<nvmgr:section name='s{i}' size='40G'/>" for i in range(2))
    refused(meta_domain(sections=secs), "total 85,899,345,920 bytes")


@pytest.mark.parametrize(
    ("size", "value"),
    [("256", 256), ("4K", 4096), ("64k", 65536), ("1.5K", 1536), ("2M", 2 << 20), ("1G", 1 << 30),
     ("8KiB", 8192)],
)
def test_good_sizes(size: str, value: int) -> None:
    meta = parse_domain(section(f"name='s' size='{size}'")).nvmgr
    assert meta is not None and meta.sections[0].size == value


@pytest.mark.parametrize(
    "name", ["a/b", "../x", "..", "a..b", ".hidden", "-x", "x" * 65, "", "a b", "a,b", "é"]
)
def test_bad_section_names(name: str) -> None:
    refused(section(f"name='{name}' size='1K'"), "invalid section name")


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ("name='s' size='1K' binding='flash'", "unknown binding"),
        ("name='s' size='1K' binding='fwcfg'", "needs a fwcfg-name"),
        ("name='s' size='1K' fwcfg-name='opt/x'", "fwcfg-name needs binding='fwcfg'"),
        ("name='s' size='1K' binding='fwcfg' fwcfg-name='etc/x'", "must start with 'opt/'"),
        ("name='s' size='1K' binding='fwcfg' fwcfg-name='opt/../x'", "'..'"),
        ("name='s' size='1K' binding='fwcfg' fwcfg-name='opt/" + "x" * 60 + "'", "55 characters"),
        ("name='s' size='1K' driver='virtio-blk-pci'", "driver needs binding='block'"),
        ("name='s' size='1K' binding='block' driver='Bad Driver'", "not a QEMU device"),
        ("name='s' size='1K' device='0net'", "not a device alias"),
        ("name='s' size='1K' colour='red'", "nvmgr-metadata.rng"),
        ("size='1K'", "invalid section name"),
    ],
)
def test_bad_section_attributes(attrs: str, needle: str) -> None:
    refused(section(attrs), needle)


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ("format='vmdk'", "format='vmdk'"),
        ("uuid='nope'", "uuid='nope' is not a UUID"),
        ("key-secret='nope'", "not a UUID"),
        ("image='relative/path.nvram'", "absolute path"),
        ("image='/var/lib/../../etc/shadow'", "without '..'"),
        ("key-file='key'", "absolute path"),
        ("key-file='/k' key-secret='0a3b5c7d-1e2f-4a6b-8c9d-0e1f2a3b4c5d'", "not both"),
        ("luks='perhaps'", "luks="),
        ("owner='me'", "nvmgr-metadata.rng"),
    ],
)
def test_bad_nvram_attributes(attrs: str, needle: str) -> None:
    refused(meta_domain(attrs), needle)


def test_unknown_child_element_is_refused_by_the_schema() -> None:
    refused(meta_domain(sections="<nvmgr:extra/>"), "nvmgr-metadata.rng")


def test_duplicate_sections_are_refused() -> None:
    secs = "<nvmgr:section name='a' size='1K'/><nvmgr:section name='a' size='2K'/>"
    refused(meta_domain(sections=secs), "section a is declared twice")


def test_too_many_sections_are_refused() -> None:
    secs = "".join(
        f"<nvmgr:section name='s{i}' size='1'/>" for i in range(metadata.MAX_DECLARED_SECTIONS + 1)
    )
    refused(meta_domain(sections=secs), "at most 256")


def test_two_metadata_elements_are_refused() -> None:
    el = f"<nvmgr:nvram xmlns:nvmgr='{NVMGR_NS}'/>"
    refused(f"<domain><name>t</name><metadata>{el}{el}</metadata></domain>", "more than one")


def test_other_applications_metadata_is_not_validated() -> None:
    xml = "<domain><name>t</name><metadata><x:y xmlns:x='urn:x' anything='goes'/></metadata></domain>"
    assert parse_domain(xml).nvmgr is None


def test_metadata_is_read_into_data() -> None:
    dom = parse_domain((DATA / "sections-in.xml").read_text())
    meta = dom.nvmgr
    assert meta is not None
    assert meta.key_secret == uuid.UUID("9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a")
    assert meta.encrypted and meta.image is None and meta.format is None
    assert meta.sections == (
        SectionDecl("nic0-eeprom", kind="nic-eeprom", device="net0"),
        SectionDecl("vpd0", kind="pci-vpd", binding=Binding.FWCFG, fwcfg_name="opt/org.example/vpd0"),
        SectionDecl("blk0", 1 << 20, Binding.BLOCK, driver="virtio-blk-pci", device="nvblk0"),
        SectionDecl("fru", 1536),
        SectionDecl("tpm-permall", 512 << 10),
    )


def test_metadata_round_trips_through_the_tree() -> None:
    meta = NvmgrMetadata(
        image="/var/lib/libvirt/nvmgr/t.nvram",
        format="qcow2",
        uuid=uuid.UUID("11111111-2222-3333-4444-555555555555"),
        key_file="/etc/nvmgr/t.key",
        luks=True,
        sections=(
            SectionDecl("a", 4096, Binding.OPAQUE, device="net0"),
            SectionDecl("b", None, Binding.FWCFG, kind="pci-vpd", fwcfg_name="opt/b"),
            SectionDecl("c", 8192, Binding.BLOCK, driver="virtio-blk-pci"),
        ),
        libvirt_nvram=LibvirtNvram("/var/x_VARS.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd", "raw",
                                   "efi", (("secure-boot", False), ("enrolled-keys", True))),
    )
    dom = parse_domain(MINIMAL)
    dom.set_nvmgr(meta)
    text = dom.to_xml()
    again = parse_domain(text)
    assert again.nvmgr == meta
    assert again.to_xml() == text
    again.set_nvmgr(None)
    assert "metadata" not in again.to_xml()


def test_set_nvmgr_replaces_in_place_and_keeps_other_metadata() -> None:
    dom = parse_domain((DATA / "sections-in.xml").read_text())
    dom.set_nvmgr(NvmgrMetadata(image="/i.nvram"))
    text = dom.to_xml()
    assert "other:keep" in text and text.index("other:app") < text.index("nvmgr:nvram")
    dom.set_nvmgr(None)
    text = dom.to_xml()
    assert "other:keep" in text and "nvmgr:" not in text


def test_metadata_goes_after_name_uuid_and_description() -> None:
    dom = parse_domain("<domain><name>t</name><uuid>" + str(uuid.uuid4()) + "</uuid>"
                       "<description>d</description><memory>1</memory></domain>")
    dom.set_nvmgr(NvmgrMetadata(image="/i.nvram"))
    text = dom.to_xml()
    assert text.index("</description>") < text.index("<metadata>") < text.index("<memory>")


def test_schema_file_is_valid_relaxng() -> None:
    from lxml import etree

    etree.RelaxNG(etree.parse(str(ROOT / "schemas" / "nvmgr-metadata.rng")))


# -- accessors --------------------------------------------------------------


def test_accessors_read_every_field_of_the_example() -> None:
    dom = parse_domain((DATA / "uefi-tpm2-in.xml").read_text())
    assert (dom.name, dom.type) == ("uefi-tpm2", "qemu")
    assert dom.uuid == uuid.UUID("5c0f8a1e-2b7d-4c39-9e14-6a8b3d2f7c01")
    assert dom.smm is False
    os_ = dom.os
    assert os_ is not None and (os_.arch, os_.machine, os_.firmware) == ("x86_64", "q35", None)
    loader, nvram = os_.loader, os_.nvram
    assert loader is not None and nvram is not None
    assert (loader.path, loader.readonly, loader.type, loader.stateless, loader.secure) == (
        "/usr/share/OVMF/OVMF_CODE_4M.fd", True, "pflash", None, None)
    assert (nvram.path, nvram.template, nvram.format) == (
        "/var/lib/libvirt/qemu/nvram/uefi-tpm2_VARS.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd", None)
    [tpm] = dom.tpms
    assert (tpm.model, tpm.backend_type, tpm.version, tpm.persistent_state, tpm.alias) == (
        "tpm-crb", "emulator", "2.0", True, "tpm0")
    assert tpm.encryption_secret == uuid.UUID("0a3b5c7d-1e2f-4a6b-8c9d-0e1f2a3b4c5d")
    assert dom.qemu_args == ["-machine", "pflash1=not-ours", "-no-reboot"]
    assert dom.nvmgr is None


def test_setting_a_nested_property_creates_its_path_and_none_prunes_it() -> None:
    dom = parse_domain("<domain><name>t</name><devices><tpm model='tpm-crb'/></devices></domain>")
    [tpm] = dom.tpms
    tpm.encryption_secret = uuid.UUID(int=1)
    tpm.version = "2.0"
    assert "<backend version=\"2.0\"><encryption secret=\"00000000-0000-0000-0000-000000000001\"/>" \
        in dom.to_xml().replace("\n", "").replace("  ", "")
    tpm.encryption_secret = None
    tpm.version = None
    assert "<backend" not in dom.to_xml()


def test_loader_edits() -> None:
    dom = parse_domain((DATA / "uefi-tpm2-in.xml").read_text())
    assert dom.os is not None and dom.os.loader is not None
    dom.os.loader.stateless = True
    dom.os.remove_nvram()
    text = dom.to_xml()
    assert "stateless=\"yes\"" in text and "<nvram" not in text
    dom.os.add_nvram("/p", "/t", "raw")
    assert '<nvram template="/t" format="raw">/p</nvram>' in dom.to_xml()


def test_qemu_args_setter_keeps_env_and_removes_empty_commandline() -> None:
    dom = parse_domain((DATA / "uefi-tpm2-in.xml").read_text())
    dom.qemu_args = ["-a", "b"]
    assert dom.qemu_args == ["-a", "b"]
    text = dom.to_xml()
    assert text.index('value="b"') < text.index("qemu:env")
    dom2 = parse_domain(MINIMAL)
    dom2.qemu_args = ["-x"]
    dom2.qemu_args = []
    assert "commandline" not in dom2.to_xml()


def test_qemu_arg_without_value_is_refused() -> None:
    xml = ("<domain><name>t</name><qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/"
           "qemu/1.0'><qemu:arg/></qemu:commandline></domain>")
    with pytest.raises(InvalidInputError, match="has no value"):
        _ = parse_domain(xml).qemu_args


def test_serialization_is_stable_and_keeps_comments() -> None:
    text = parse_domain((DATA / "uefi-tpm2-in.xml").read_text()).to_xml()
    assert "a user comment inside devices is kept" in text
    assert parse_domain(text).to_xml() == text


def test_comments_around_the_root_are_kept() -> None:
    text = parse_domain("<!-- before --><domain><name>t</name></domain><!-- after -->").to_xml()
    assert text == "<!-- before -->\n<domain>\n  <name>t</name>\n</domain>\n<!-- after -->\n"


# -- one parse, one check -------------------------------------------------------


def test_metadata_is_checked_once_per_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = metadata.from_element

    def counting(node: object) -> NvmgrMetadata:
        calls.append(node)
        return real(node)  # type: ignore[arg-type]

    monkeypatch.setattr(metadata, "from_element", counting)
    dom = parse_domain((DATA / "sections-in.xml").read_text())
    for _ in range(5):
        assert dom.nvmgr is not None
    assert len(calls) == 1


def test_set_nvmgr_checks_what_it_writes_and_keeps_the_domain_on_refusal() -> None:
    dom = parse_domain((DATA / "sections-in.xml").read_text())
    before, meta = dom.to_xml(), dom.nvmgr
    assert meta is not None
    with pytest.raises(InvalidInputError, match="not both"):
        dom.set_nvmgr(NvmgrMetadata(key_file="/k", key_secret=uuid.UUID(int=1)))
    with pytest.raises(InvalidInputError, match="without '..'"):
        dom.set_nvmgr(NvmgrMetadata(image="/var/lib/../x"))
    assert dom.to_xml() == before and dom.nvmgr == meta


def test_set_nvmgr_keeps_how_the_user_wrote_unchanged_sections() -> None:
    dom = parse_domain(meta_domain(sections="<nvmgr:section name='a' size='1M'/>"
                                            "<nvmgr:section name='b' size='4K'/>"))
    meta = dom.nvmgr
    assert meta is not None
    b = dataclasses.replace(meta.sections[1], size=8192)
    dom.set_nvmgr(dataclasses.replace(meta, image="/i.nvram", sections=(meta.sections[0], b)))
    text = dom.to_xml()
    assert 'size="1M"' in text and 'size="8192"' in text
    assert parse_domain(text).nvmgr == dom.nvmgr


def test_schema_refusals_name_the_line_and_the_element() -> None:
    xml = ("<domain><name>t</name><metadata>\n"
           f"<n:nvram xmlns:n='{NVMGR_NS}'>\n<n:section name='a' size='1K'/>\n"
           "<n:section name='b' size='1K' device='9'/>\n"
           "<n:libvirt-nvram><n:feature name='x' enabled='maybe'/></n:libvirt-nvram>"
           "</n:nvram></metadata></domain>")
    refused(xml, "line 4", "section b: device='9' is not a device alias")
    refused(xml.replace(" device='9'", ""), "line 5", "<n:feature name='x' enabled='maybe'>")
