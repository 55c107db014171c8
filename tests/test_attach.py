"""nvmgr attach / detach without a libvirtd: the flags, the allocator, the device XML,
the errors (and that a refusal writes nothing), with libvirt's domain object faked.

The real thing (libvirtd, QEMU, hot-plug over QMP) is ``tests/e2e/test_attach.py``;
crash safety of the growth is ``tests/test_crash.py`` (``grow-live*``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from nvmgr.domain.device import parse_device
from nvmgr.domain.elements import parse_domain
from nvmgr.errors import (
    BusyError,
    ExitCode,
    ExternalError,
    InvalidInputError,
    NotFoundError,
    NotHotpluggableError,
    UsageError,
)
from nvmgr.format.layout import SectionSpec, extend, holes, layout
from nvmgr.format.model import Binding
from nvmgr.image.image import Image
from nvmgr.provision.prepare import grow
from nvmgr.virt import attach as attach_mod
from nvmgr.virt import conn as virt_conn
from nvmgr.virt.attach import affect, attach, detach

NS = "https://nvmgr.dev/schemas/metadata/1"
KiB = 1024


# ---------------------------------------------------------------- the allocator

def _overlaps(extents: list[tuple[int, int, str]]) -> list[str]:
    ext = sorted(extents)
    return [f"{a[2]} and {b[2]}" for a, b in zip(ext, ext[1:], strict=False) if a[0] + a[1] > b[0]]


def test_first_fit_reuses_the_hole_a_removed_section_left(tmp_path: Path) -> None:
    p = str(tmp_path / "i.nvram")
    specs = [SectionSpec("vars", 64 * KiB, Binding.PFLASH), SectionSpec("a", 8 * KiB),
             SectionSpec("b", 8 * KiB), SectionSpec("c", 8 * KiB)]
    with Image.create(p, specs) as img:
        b = img.section("b")
        size = img.directory.image_size
        img.remove("b")
        assert (b.offset, 16 * KiB) in holes(img.directory)  # both its slots
        before = {s.name: (s.offset, s.spare) for s in img.directory.sections}
        grow(img, [SectionSpec("d", 4 * KiB)])
        d = img.section("d")
        assert {d.offset, d.spare} == {b.offset, b.offset + 4 * KiB}  # both slots in the hole
        assert img.directory.image_size == size  # nothing appended
        assert {s.name: (s.offset, s.spare) for s in img.directory.sections
                if s.name != "d"} == before  # nothing moved
        assert not _overlaps(img.directory.extents())
        assert img.check().ok


def test_a_section_larger_than_every_hole_goes_to_the_end(tmp_path: Path) -> None:
    d = layout([SectionSpec("a", 4 * KiB), SectionSpec("b", 4 * KiB)])
    d.sections = [s for s in d.sections if s.name != "a"]
    grown = extend(d, [SectionSpec("big", 64 * KiB)])
    big = grown.find("big")
    assert big is not None and big.offset >= d.image_size - 0
    assert not _overlaps(grown.extents())


def test_holes_never_include_live_slices_scratch_or_headers() -> None:
    d = layout([SectionSpec("vars", 16 * KiB, Binding.PFLASH),
                SectionSpec("disk", 8 * KiB, Binding.BLOCK), SectionSpec("x", 4 * KiB)])
    assert holes(d) == []
    d.sections = [s for s in d.sections if s.name != "x"]
    taken = [(o, n) for o, n, _ in d.extents()]
    for off, n in holes(d):
        assert off % 4096 == 0 and n > 0
        assert all(off + n <= o or o + m <= off for o, m in taken)


def test_a_moved_section_never_lands_on_its_own_old_slots(tmp_path: Path) -> None:
    p = str(tmp_path / "i.nvram")
    with Image.create(p, [SectionSpec("a", 4 * KiB), SectionSpec("last", 4 * KiB)]) as img:
        img.put("last", b"x" * 4000)
        old = img.section("last").extents()
        img.resize_section("last", 20 * KiB)
        new = img.section("last")
        assert all(new.offset + new.reserved <= o or o + n <= new.offset for o, n in old)
        assert img.get("last") == b"x" * 4000 and img.check().ok


def test_a_live_section_in_freed_space_reads_zeros_not_the_old_bytes(tmp_path: Path) -> None:
    p = str(tmp_path / "i.nvram")
    with Image.create(p, [SectionSpec("disk", 8 * KiB, Binding.BLOCK),
                          SectionSpec("secret", 8 * KiB)]) as img:
        img.put("secret", b"S" * 8192)
        img.put("secret", b"T" * 8192)  # both slots hold bytes
        img.remove("secret")
        grow(img, [SectionSpec("disk2", 8 * KiB, Binding.BLOCK)], contents={"disk2": b"new"})
        s = img.section("disk2")
        raw = img.container.read(s.offset, s.reserved)
        assert raw == b"new" + bytes(s.reserved - 3)
        assert img.get("disk2") == b"new" and img.check().ok


def test_grow_contents_land_with_the_section_and_are_encrypted(tmp_path: Path) -> None:
    from nvmgr.crypto.cipher import Kek

    key = Kek(hashlib.sha256(b"k").digest(), "k")
    p = str(tmp_path / "e.nvram")
    with Image.create(p, [SectionSpec("a", 4 * KiB)], kek=key) as img:
        grow(img, [SectionSpec("eeprom", 4 * KiB), SectionSpec("disk", 4 * KiB, Binding.BLOCK)],
             contents={"eeprom": b"E" * 100, "disk": b"D" * 10})
        assert img.section("eeprom").encrypted and not img.section("disk").encrypted
        assert img.container.read(img.section("eeprom").offset, 100) != b"E" * 100
    with Image.open(p, kek=key) as img:
        assert img.get("eeprom") == b"E" * 100 and img.get("disk") == b"D" * 10
        assert img.check().ok


def test_grow_refuses_contents_that_do_not_fit_or_name_no_new_section(tmp_path: Path) -> None:
    p = str(tmp_path / "i.nvram")
    with Image.create(p, [SectionSpec("a", 4 * KiB)]) as img:
        gen = img.directory.generation
        with pytest.raises(UsageError, match="not being added"):
            grow(img, [SectionSpec("b", 4 * KiB)], contents={"a": b"x"})
        with pytest.raises(Exception, match="do not fit section b") as e:
            grow(img, [SectionSpec("b", 4 * KiB)], contents={"b": bytes(5000)})
        assert e.value.exit_code == ExitCode.NO_SPACE  # type: ignore[attr-defined]
        assert img.directory.generation == gen and img.directory.find("b") is None


# ---------------------------------------------------------------- DEVICE.xml

def test_device_xml_stand_alone_section() -> None:
    dev = parse_device(f"<nvmgr:section xmlns:nvmgr='{NS}' name='state0' size='1M' "
                       "binding='block' driver='virtio-blk-pci'/>")
    assert dev.element is None and dev.tag is None
    (s,) = dev.sections
    assert (s.name, s.size, s.binding, s.driver) == ("state0", 1 << 20, Binding.BLOCK,
                                                     "virtio-blk-pci")


def test_device_xml_libvirt_element_carries_sections_and_loses_them() -> None:
    dev = parse_device(f"<interface type='network'><source network='default'/>"
                       f"<alias name='ua-net1'/><nvmgr:section xmlns:nvmgr='{NS}' "
                       "name='net1-eeprom' kind='nic-eeprom'/></interface>")
    assert dev.tag == "interface"
    assert [(s.name, s.kind, s.device) for s in dev.sections] == [
        ("net1-eeprom", "nic-eeprom", "ua-net1")]
    xml = dev.libvirt_xml()
    assert xml is not None and "nvmgr" not in xml and "ua-net1" in xml


@pytest.mark.parametrize("xml,message", [
    ("<bogus/>", "not a libvirt device element"),
    (f"<nvmgr:nvram xmlns:nvmgr='{NS}'/>", "give a libvirt device element"),
    (f"<nvmgr:section xmlns:nvmgr='{NS}' name='x' size='1K' binding='warp'/>",
     "unknown binding 'warp'"),
    (f"<nvmgr:section xmlns:nvmgr='{NS}' name='x' binding='fwcfg' size='1K'/>",
     "needs a fwcfg-name"),
    (f"<disk><nvmgr:section xmlns:nvmgr='{NS}' name='a' size='1K'/>"
     f"<nvmgr:section xmlns:nvmgr='{NS}' name='a' size='1K'/></disk>", "declared twice"),
    (f"<disk><target><nvmgr:section xmlns:nvmgr='{NS}' name='a' size='1K'/></target></disk>",
     "directly inside <disk>"),
    ("<disk", "device XML"),
])
def test_device_xml_errors_name_what_is_wrong(xml: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_device(xml)


def test_per_device_gives_each_nic_its_section() -> None:
    from nvmgr.domain.plan import plan_for

    dom = parse_domain(
        f"<domain type='qemu'><name>n</name><uuid>{uuid.uuid4()}</uuid><metadata>"
        f"<nvmgr:nvram xmlns:nvmgr='{NS}'><nvmgr:per-device kind='nic-eeprom'/></nvmgr:nvram>"
        "</metadata><devices><interface type='network'><mac address='52:54:00:AA:bb:01'/>"
        "</interface><interface type='network'/></devices></domain>")
    names = [s.name for s in plan_for(dom).sections]
    assert names == ["eeprom-525400aabb01"]  # the NIC without a MAC waits for libvirt's
    with pytest.raises(InvalidInputError, match="sections per device exist for nic-eeprom"):
        parse_domain(f"<domain><name>n</name><metadata><nvmgr:nvram xmlns:nvmgr='{NS}'>"
                     "<nvmgr:per-device kind='pci-vpd'/></nvmgr:nvram></metadata></domain>")


# ---------------------------------------------------------------- the flags

@pytest.mark.parametrize("active,flags,want", [
    (True, {}, (True, False)),  # virsh: no flag is the running VM
    (True, {"live": True}, (True, False)),
    (True, {"config": True}, (False, True)),
    (True, {"live": True, "config": True}, (True, True)),
    (True, {"persistent": True}, (True, True)),
    (False, {"persistent": True}, (False, True)),
    (True, {"current": True}, (True, False)),
    (False, {"current": True}, (False, True)),
    (False, {"config": True}, (False, True)),
])
def test_flags_read_as_virsh_reads_them(active: bool, flags: dict[str, bool],
                                        want: tuple[bool, bool]) -> None:
    args = {"live": False, "config": False, "current": False, "persistent": False, **flags}
    assert affect(active, True, **args) == want


@pytest.mark.parametrize("active,persistent_domain,flags,message", [
    (False, True, {}, "not running"),
    (False, True, {"live": True}, "--live needs a running VM"),
    (True, True, {"current": True, "live": True}, "--current excludes"),
    (True, True, {"current": True, "persistent": True}, "--current excludes"),
    (True, False, {"config": True}, "transient"),
])
def test_flags_that_cannot_be_served_are_usage_errors(
        active: bool, persistent_domain: bool, flags: dict[str, bool], message: str) -> None:
    args = {"live": False, "config": False, "current": False, "persistent": False, **flags}
    with pytest.raises(UsageError, match=message):
        affect(active, persistent_domain, **args)


# ---------------------------------------------------------------- attach/detach, libvirt faked

class FakeDomain:
    """The parts of a libvirt virDomain that nvmgr attach/detach use."""

    def __init__(self, xml: str, active: bool) -> None:
        self.xml, self.active = xml, active
        self.calls: list[tuple[str, object]] = []

    def isActive(self) -> bool:  # noqa: N802 - libvirt's name
        return self.active

    def isPersistent(self) -> bool:  # noqa: N802
        return True

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return self.xml

    def attachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802
        self.calls.append(("attach", xml))

    def detachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802
        self.calls.append(("detach", xml))

    def setMetadata(self, *args: object) -> None:  # noqa: N802
        self.calls.append(("metadata", args[1]))

    def metadata(self, _type: int, uri: str, _flags: int) -> str:
        """The element alone, as libvirt 9.0's virDomainGetMetadata gives it:
        without its namespace (seen in tests/e2e/test_attach.py)."""
        found = etree.fromstring(self.xml.encode()).find(f"metadata/{{{uri}}}nvram")
        if found is None:
            import libvirt

            raise libvirt.libvirtError("no metadata")
        for el in found.iter(etree.Element):
            el.tag = etree.QName(el).localname
        etree.cleanup_namespaces(found)
        return etree.tostring(found, encoding="unicode")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A defined nvmgr domain (BIOS, one opaque section) whose image exists; libvirt faked."""
    image = tmp_path / "vm.nvram"
    dom_uuid = uuid.uuid4()
    xml = (f"<domain type='qemu'><name>vm</name><uuid>{dom_uuid}</uuid><metadata>"
           f"<nvmgr:nvram xmlns:nvmgr='{NS}' image='{image}' format='raw'>"
           "<nvmgr:section name='fru0' size='4K'/></nvmgr:nvram></metadata>"
           "<memory>65536</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
           "<devices/></domain>")
    state: dict[str, Any] = {"defined": [], "plugged": []}

    @contextlib.contextmanager
    def connect(uri: str | None = None, *, readonly: bool = False) -> Iterator[object]:
        yield object()

    def define(xml: str, uri: str | None = None) -> str:
        state["defined"].append(xml)
        state["dom"].xml = xml
        return "vm"

    monkeypatch.setattr(virt_conn, "connect", connect)
    monkeypatch.setattr(virt_conn, "lookup", lambda _c, _n: state["dom"])
    monkeypatch.setattr(virt_conn, "define", define)
    monkeypatch.setattr(virt_conn, "exists", lambda *_a, **_k: True)
    monkeypatch.setattr(virt_conn, "is_active", lambda *_a, **_k: state["dom"].active)
    monkeypatch.setattr(virt_conn, "require_inactive", lambda *_a, **_k: None)
    monkeypatch.setattr(virt_conn, "uuid_exists", lambda *_a, **_k: True)
    monkeypatch.setattr(attach_mod.hotplug, "plug",
                        lambda _d, _p, s, **_kw: state["plugged"].append(s) or [f"nvmgr-{s.name}"])
    monkeypatch.setattr(attach_mod.hotplug, "unplug",
                        lambda _d, n, _dev: state["plugged"].append(n) or True)
    from nvmgr.virt.define import _define

    state["dom"] = FakeDomain(xml, active=False)
    _define(parse_domain(xml), xml, uri=None, kek=None)
    state["image"] = image
    yield state


def _section_xml(**attrs: str) -> str:
    return f"<nvmgr:section xmlns:nvmgr='{NS}' " + " ".join(
        f"{k.replace('_', '-')}='{v}'" for k, v in attrs.items()) + "/>"


def test_config_attach_grows_offline_and_redefines(fake: dict[str, Any]) -> None:
    image: Path = fake["image"]
    with Image.open(str(image)) as img:
        old = {s.name: s.offset for s in img.directory.sections}
    r = attach("vm", _section_xml(name="vpd0", kind="pci-vpd", binding="fwcfg",
                                  fwcfg_name="opt/org.nvmgr/vpd"),
               config=True, contents={"vpd0": b"VPD"})
    assert r.added == ["vpd0"] and not r.plugged and r.config and not r.live
    with Image.open(str(image)) as img:
        assert {s.name: s.offset for s in img.directory.sections if s.name in old} == old
        assert img.get("vpd0") == b"VPD" and img.check().ok
    xml = fake["defined"][-1]
    assert "name=opt/org.nvmgr/vpd" in xml and "name=\"vpd0\"" in xml


@pytest.mark.parametrize("device,message", [
    (_section_xml(name="vpd0", kind="pci-vpd", binding="fwcfg", fwcfg_name="opt/x/vpd"),
     "binding fwcfg"),
    ("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
     "a <tpm> cannot be hot-plugged"),
])
def test_live_attach_of_what_qemu_cannot_hotplug_is_refused_and_writes_nothing(
        fake: dict[str, Any], device: str, message: str) -> None:
    fake["dom"].active = True
    before = fake["image"].read_bytes()
    with pytest.raises(NotHotpluggableError, match=message) as e:
        attach("vm", device, live=True, config=True)
    assert e.value.exit_code == ExitCode.NOT_HOTPLUGGABLE == 13
    assert fake["image"].read_bytes() == before
    assert len(fake["defined"]) == 1  # only the fixture's own define
    assert fake["dom"].calls == []


def test_live_block_attach_grows_beside_qemu_plugs_and_marks_in_use(
        fake: dict[str, Any]) -> None:
    fake["dom"].active = True
    r = attach("vm", _section_xml(name="state0", size="64K", binding="block",
                                  driver="virtio-blk-pci"),
               live=True, config=True, contents={"state0": b"S" * 1000})
    assert r.added == ["state0"] and r.plugged == ["nvmgr-state0"]
    (ps,) = fake["plugged"]
    with Image.open(str(fake["image"])) as img:
        s = img.section("state0")
        assert s.dirty and ps.offset == s.offset and ps.capacity == 64 * KiB
        assert img.get("state0") == b"S" * 1000
    # The running VM's metadata: what it had (read as the element alone) and the new section.
    (text,) = [c[1] for c in fake["dom"].calls if c[0] == "metadata"]
    assert "name=\"fru0\"" in str(text) and "name=\"state0\"" in str(text), text
    assert "&quot;drive&quot;:&quot;nvmgr-state0&quot;" in fake["defined"][-1]
    with pytest.raises(UsageError, match="attached already"):
        attach("vm", _section_xml(name="state0", size="64K", binding="block"), live=True)


def test_detach_keeps_the_bytes_and_a_later_attach_reuses_them(fake: dict[str, Any]) -> None:
    dev = _section_xml(name="eeprom9", size="4K", binding="opaque")
    attach("vm", dev, config=True, contents={"eeprom9": b"E" * 99})
    r = detach("vm", dev, config=True)
    assert r.kept == ["eeprom9"] and r.removed == []
    assert "eeprom9" not in fake["defined"][-1]
    again = attach("vm", dev, config=True)
    assert again.kept == ["eeprom9"] and again.added == []
    with Image.open(str(fake["image"])) as img:
        assert img.get("eeprom9") == b"E" * 99
    with pytest.raises(UsageError, match="used as it is"):
        detach("vm", dev, config=True)
        attach("vm", dev, config=True, contents={"eeprom9": b"new"})


def test_detach_remove_section_frees_its_space_for_the_next_grow(fake: dict[str, Any]) -> None:
    dev = _section_xml(name="blob", size="16K")
    attach("vm", dev, config=True)
    with Image.open(str(fake["image"])) as img:
        where = img.section("blob").offset
    r = detach("vm", None, section="blob", config=True, remove_section=True)
    assert r.removed == ["blob"]
    attach("vm", _section_xml(name="blob2", size="8K"), config=True)
    with Image.open(str(fake["image"])) as img:
        assert img.section("blob2").offset == where and img.check().ok


def test_remove_section_of_a_live_slice_the_running_vm_reads_is_refused(
        fake: dict[str, Any]) -> None:
    fake["dom"].active = True
    attach("vm", _section_xml(name="disk", size="8K", binding="block"), live=True, config=True)
    before = fake["image"].read_bytes()
    with pytest.raises(BusyError, match="live and the running VM reads it"):
        detach("vm", None, section="disk", config=True, remove_section=True)
    assert fake["image"].read_bytes() == before
    r = detach("vm", None, section="disk", live=True, config=True, remove_section=True)
    assert r.unplugged == ["disk"] and r.removed == ["disk"]


def test_detach_of_nothing_is_not_found(fake: dict[str, Any]) -> None:
    with pytest.raises(NotFoundError, match="no section nope"):
        detach("vm", None, section="nope", config=True)
    with pytest.raises(UsageError, match="one of them"):
        detach("vm", None, config=True)


def test_attach_contents_for_a_section_the_device_does_not_bring(fake: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="brings no such section"):
        attach("vm", _section_xml(name="x", size="4K"), config=True, contents={"y": b"1"})


def test_the_watcher_grows_a_running_domain_for_a_device_another_tool_added(
        fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``virsh attach-device --persistent`` of a NIC to a running VM whose metadata
    gives each NIC an EEPROM: the define event's reconcile grows the image beside
    the running QEMU and keeps the definition wired; the live slices do not move."""
    from nvmgr.virt.define import reconcile

    dom = parse_domain(fake["dom"].xml)
    meta = dom.nvmgr
    assert meta is not None
    dom.set_nvmgr(dataclasses.replace(meta, per_device=("nic-eeprom",)))
    devices = dom._node.find("devices")
    assert devices is not None
    nic = etree.SubElement(devices, "interface", type="user")
    etree.SubElement(nic, "mac", address="52:54:00:00:00:09")
    fake["dom"].xml = dom.to_xml()
    fake["dom"].active = True
    with Image.open(str(fake["image"])) as img:
        before = {s.name: s.offset for s in img.directory.sections}
    monkeypatch.setattr(virt_conn, "domain_xml", lambda *_a, **_k: fake["dom"].xml)
    r = reconcile("vm")
    assert (r.status, r.added) == ("grown", ["eeprom-525400000009"])
    with Image.open(str(fake["image"])) as img:
        assert {s.name: s.offset for s in img.directory.sections if s.name in before} == before
        assert img.section("eeprom-525400000009").capacity == 32 * KiB and img.check().ok


def test_define_keeps_the_per_device_rule() -> None:
    from nvmgr.domain.plan import plan_for
    from nvmgr.domain.qemuargs import apply_plan, strip

    dom = parse_domain(
        f"<domain type='qemu'><name>n</name><uuid>{uuid.uuid4()}</uuid><metadata>"
        f"<nvmgr:nvram xmlns:nvmgr='{NS}'><nvmgr:per-device kind='nic-eeprom'/></nvmgr:nvram>"
        "</metadata><devices/></domain>")
    apply_plan(dom, plan_for(dom), "/var/lib/libvirt/nvmgr/n.nvram", "raw", uuid.uuid4())
    meta = dom.nvmgr
    assert meta is not None and meta.per_device == ("nic-eeprom",)
    again = parse_domain(dom.to_xml()).nvmgr
    assert again is not None and again.per_device == ("nic-eeprom",)
    strip(dom, keep_sections=True)
    assert dom.nvmgr is not None and dom.nvmgr.per_device == ("nic-eeprom",)


def test_attach_past_max_image_size_places_the_section_in_a_member(
        fake: dict[str, Any]) -> None:
    """The domain's max-image-size holds for attach too (issue 7, section 2's
    automatic split through the one grow): the live block section goes into a
    member image, and QEMU gets its slice over that member's file."""
    dom = parse_domain(fake["dom"].xml)
    meta = dom.nvmgr
    assert meta is not None
    dom.set_nvmgr(dataclasses.replace(meta, max_image_size=1 << 20))  # the smallest allowed
    fake["dom"].xml = dom.to_xml()
    fake["dom"].active = True
    with Image.open(str(fake["image"])) as img:
        size = img.directory.image_size
    r = attach("vm", _section_xml(name="big", size="448K", binding="block",
                                  driver="virtio-blk-pci"),
               live=True, config=True, contents={"big": b"B" * 512})
    assert r.added == ["big"]
    (ps,) = fake["plugged"]
    assert ps.member_path is not None and ps.member_path != str(fake["image"])
    with Image.open(str(fake["image"])) as img:
        assert img.directory.image_size == size  # the main image did not grow
        assert img.section("big").member is not None
        assert img.get("big") == b"B" * 512 and img.check().ok
    assert ps.member_path in fake["defined"][-1]  # the next boot opens the member too


# ---------------------------------------------------------------- hot-plug's QMP sequence

class FakeQemu:
    """QEMU's QMP answers for the commands hotplug.plug sends (as QEMU 7.2 gives
    them), recording each command: three root ports, pci.3 taken by a device
    query-pci shows (its bus numbered by the firmware), pci.2 taken but its bus
    not numbered (query-pci cannot tell), pci.1 free."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def __call__(self, _dom: object, cmd: str, args: Any = None) -> Any:
        self.sent.append((cmd, args))
        if cmd == "query-named-block-nodes":
            return [{"node-name": "nvmgr-file", "image": {"virtual-size": 1 << 20}}]
        if cmd == "qom-list" and args["path"] == "/machine/peripheral":
            return [{"name": f"pci.{i}", "type": "child<pcie-root-port>"} for i in (1, 2, 3)]
        if cmd == "qom-list":
            port = args["path"].rsplit("/", 1)[-1]
            return [{"name": "child[0]", "type": "child<virtio-blk-pci>"}] if port in (
                "pci.2", "pci.3") else [{"name": "type", "type": "string"}]
        if cmd == "query-pci":
            def port(i: int, secondary: int, devices: list[Any]) -> dict[str, Any]:
                return {"qdev_id": f"pci.{i}", "pci_bridge": {
                    "bus": {"number": 0, "secondary": secondary, "subordinate": secondary},
                    "devices": devices}}
            return [{"bus": 0, "devices": [port(1, 1, []), port(2, 0, []),
                                           port(3, 3, [{"qdev_id": "other"}])]}]
        return {}


def test_plug_finds_the_free_port_in_few_round_trips_and_opens_the_slice_in_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nvmgr.domain.plan import PlannedSection
    from nvmgr.virt import hotplug

    q = FakeQemu()
    monkeypatch.setattr(hotplug, "qmp", q)
    s = PlannedSection("state0", Binding.BLOCK, 64 * KiB, 64 * KiB, 2 << 20, None, False,
                       "declared", driver="virtio-blk-pci", device="nvmgr-state0")
    added = hotplug.plug(object(), "/img.nvram", s)
    cmds = [c for c, _ in q.sent]
    # pci.3 skipped on query-pci's word; pci.2 (unnumbered) asked of QOM: taken; pci.1 free.
    assert cmds == ["blockdev-add", "qom-list", "query-pci", "qom-list", "qom-list",
                    "device_add"], cmds
    assert [a["path"] for c, a in q.sent if c == "qom-list"][1:] == [
        "/machine/peripheral/pci.2/pci.2", "/machine/peripheral/pci.1/pci.1"]
    (add,) = [a for c, a in q.sent if c == "blockdev-add"]
    # Over a file node of its own (QEMU knows nvmgr-file's size from its start), inline.
    assert add["file"]["driver"] == "file" and add["file"]["filename"] == "/img.nvram"
    assert add["offset"] == 2 << 20 and add["node-name"] == "nvmgr-state0"
    (dev,) = [a for c, a in q.sent if c == "device_add"]
    assert dev["bus"] == "pci.1" and dev["drive"] == "nvmgr-state0"
    assert added[-1] == "nvmgr-state0" and add["file"]["node-name"] in added


def test_plug_of_a_section_in_a_lent_qcow2_image_sits_on_its_format_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A section placed in a hole of a qcow2 image written through QEMU: its
    slice goes on QEMU's ``nvmgr-image`` node (never raw over the qcow2 file);
    one placed in a raw member still gets a file node of that member."""
    from nvmgr.domain.plan import PlannedSection
    from nvmgr.virt import hotplug

    q = FakeQemu()
    monkeypatch.setattr(hotplug, "qmp", q)
    s = PlannedSection("state0", Binding.BLOCK, 64 * KiB, 64 * KiB, 2 << 20, None, False,
                       "declared")
    assert hotplug.plug(object(), "/img.qcow2", s, base="nvmgr-image") == ["nvmgr-state0"]
    (add,) = [a for c, a in q.sent if c == "blockdev-add"]
    assert add["file"] == "nvmgr-image" and add["offset"] == 2 << 20
    q.sent.clear()
    inm = dataclasses.replace(s, member_path="/img.m1.nvram", member_format="raw")
    added = hotplug.plug(object(), "/img.qcow2", inm, base="nvmgr-image")
    (add,) = [a for c, a in q.sent if c == "blockdev-add"]
    assert add["file"]["filename"] == "/img.m1.nvram" and add["file"]["node-name"] in added


class FakeNbdQemu:
    """QMP answers for :func:`hotplug.exported` (QEMU 7.2's words), recording each command."""

    def __init__(self, *, running: bool = False, leftover: bool = False) -> None:
        self.sent: list[str] = []
        self.running, self.leftover = running, leftover

    def __call__(self, _dom: object, cmd: str, args: Any = None) -> Any:
        self.sent.append(cmd)
        if cmd == "block-export-del" and not self.leftover:
            self.leftover = True  # the next one (after the add) finds it
            raise ExternalError("QEMU refused block-export-del",
                                detail="Export 'nvmgr-image-export' is not found")
        if cmd == "nbd-server-start" and self.running:
            raise ExternalError("QEMU refused nbd-server-start",
                                detail="NBD server already running")
        return {}


def test_exported_serves_the_node_and_takes_export_and_server_away(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nvmgr.virt import hotplug

    q = FakeNbdQemu()
    monkeypatch.setattr(hotplug, "qmp", q)
    sock = str(tmp_path / "s.sock")
    with hotplug.exported(object(), "nvmgr-image", sock) as uri:
        assert uri == f"nbd+unix:///nvmgr-image-export?socket={sock}"
        assert q.sent == ["block-export-del", "nbd-server-start", "block-export-add"]
    assert q.sent[3:] == ["block-export-del", "nbd-server-stop"]
    # A failure inside: the same clean-up, the failure is what goes up.
    q = FakeNbdQemu()
    monkeypatch.setattr(hotplug, "qmp", q)
    with pytest.raises(ZeroDivisionError), hotplug.exported(object(), "nvmgr-image", sock):
        _ = 1 // 0
    assert q.sent[3:] == ["block-export-del", "nbd-server-stop"]


def test_exported_refuses_a_server_it_did_not_start_and_leaves_it_running(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nvmgr.virt import hotplug

    q = FakeNbdQemu(running=True)
    monkeypatch.setattr(hotplug, "qmp", q)
    with pytest.raises(BusyError, match="serves NBD already") as e, \
            hotplug.exported(object(), "nvmgr-image", str(tmp_path / "s.sock")):
        pass
    assert e.value.exit_code == ExitCode.BUSY
    assert q.sent == ["block-export-del", "nbd-server-start"]  # no export, no server stopped
    # A server listening on nvmgr's own socket is one an nvmgr killed midway
    # left: used, and stopped after.
    import socket

    path = str(tmp_path / "own.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        q = FakeNbdQemu(running=True, leftover=True)
        monkeypatch.setattr(hotplug, "qmp", q)
        with hotplug.exported(object(), "nvmgr-image", path):
            pass
    assert q.sent == ["block-export-del", "nbd-server-start", "block-export-add",
                      "block-export-del", "nbd-server-stop"]
