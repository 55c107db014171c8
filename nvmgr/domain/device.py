"""DEVICE.xml for ``nvmgr attach`` and ``nvmgr detach``: a device and the sections it needs.

Two shapes, both checked by the metadata schema (``schemas/nvmgr-metadata.rng``):

- a stand-alone ``<nvmgr:section>``: a section nvmgr wires itself (a
  ``block`` device-state disk with its ``driver``, an ``fwcfg`` blob, an
  ``opaque`` EEPROM/FRU image)::

      <nvmgr:section xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1"
                     name="state0" size="1M" binding="block" driver="virtio-blk-pci"/>

- a libvirt device element (what ``virsh attach-device`` takes), optionally
  carrying ``<nvmgr:section>`` children for the blobs that go with it; the
  children are taken out before libvirt sees the element, and a section
  without ``device=`` records the element's ``<alias name=...>``::

      <interface type='network'>
        <source network='default'/><alias name='ua-net1'/>
        <nvmgr:section xmlns:nvmgr="..." name="net1-eeprom" kind="nic-eeprom"/>
      </interface>

  Sections a libvirt device brings by itself (a ``<tpm>``'s state, a NIC's
  EEPROM under ``<nvmgr:per-device>``) come from the domain's plan once the
  element is in the domain.
"""

from __future__ import annotations

import dataclasses

from lxml import etree

from nvmgr.domain.metadata import SECTION_TAG, SectionDecl, section_from_element
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.domain.xmlparse import parse_tree
from nvmgr.errors import InvalidInputError

#: The children of libvirt's ``<devices>`` (libvirt 9.0 domain schema).
LIBVIRT_DEVICES = frozenset({
    "disk", "controller", "lease", "filesystem", "interface", "input", "sound", "hostdev",
    "graphics", "video", "console", "serial", "parallel", "channel", "smartcard", "hub",
    "redirdev", "redirfilter", "rng", "tpm", "memballoon", "watchdog", "memory", "iommu",
    "vsock", "shmem", "panic", "nvram", "audio", "crypto",
})


@dataclasses.dataclass(frozen=True)
class Device:
    """A parsed DEVICE.xml.

    :param element: the libvirt device element without nvmgr's children
        (``None`` for a stand-alone section).
    :param sections: the sections it declares (in the domain's metadata once
        attached).
    """

    element: etree._Element | None
    sections: tuple[SectionDecl, ...]

    @property
    def tag(self) -> str | None:
        return str(self.element.tag) if self.element is not None else None

    def libvirt_xml(self) -> str | None:
        """The element as libvirt takes it (``attachDeviceFlags``)."""
        if self.element is None:
            return None
        return etree.tostring(self.element, encoding="unicode")

    def describe(self) -> str:
        if self.element is None:
            return f"section {self.sections[0].name}"
        alias = self.element.find("alias")
        return f"<{self.tag}>" + (f" {alias.get('name')}" if alias is not None else "")


def parse_device(text: str | bytes) -> Device:
    """Parse and check DEVICE.xml (see the module's description).

    :raise InvalidInputError: hostile or malformed XML, an element that is
        no libvirt device, or a section the schema or its rules refuse.
    """
    root = parse_tree(text, what="device XML")
    if root.tag == SECTION_TAG:
        return Device(None, (section_from_element(root),))
    tag = root.tag if isinstance(root.tag, str) else "?"
    if tag.startswith("{"):
        raise InvalidInputError(
            f"the device XML's root element is {tag}: give a libvirt device element "
            f"(<disk>, <interface>, <tpm>...) or a <nvmgr:section> (namespace {NVMGR_NS})")
    if tag not in LIBVIRT_DEVICES:
        raise InvalidInputError(
            f"<{tag}> is not a libvirt device element (one of: "
            f"{', '.join(sorted(LIBVIRT_DEVICES))}) nor a <nvmgr:section>")
    alias = root.find("alias")
    decls = []
    for child in root.findall(SECTION_TAG):
        decl = section_from_element(child)
        if decl.device is None and alias is not None and alias.get("name"):
            decl = dataclasses.replace(decl, device=alias.get("name"))
        decls.append(decl)
        root.remove(child)
    stray = [el for el in root.iter() if isinstance(el.tag, str)
             and el.tag.startswith(f"{{{NVMGR_NS}}}")]
    if stray:
        raise InvalidInputError(
            f"nvmgr element {stray[0].tag.split('}')[1]!r} (line {stray[0].sourceline}) may "
            f"only be a <nvmgr:section> directly inside <{tag}>")
    names = [d.name for d in decls]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidInputError(f"section {dup} is declared twice in the device XML")
    etree.cleanup_namespaces(root)
    return Device(root, tuple(decls))
