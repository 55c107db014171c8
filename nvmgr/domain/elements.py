"""The libvirt domain as nvmgr sees it: ``<domain>``, ``<os>``, ``<loader>``, ``<nvram>``, ``<tpm>``.

Each class declares the XML it covers with the descriptors of
:mod:`nvmgr.domain.xmlbind`; edits change the live tree and
:meth:`Domain.to_xml` writes it once at the end.  A :class:`Domain` also
carries the nvmgr metadata (:mod:`nvmgr.domain.metadata`), read and checked
once per document and kept up to date by :meth:`Domain.set_nvmgr`, and the
``<qemu:commandline>`` arguments (:attr:`Domain.qemu_args`).

:func:`parse_domain` is the way in: the hardened parse
(:mod:`nvmgr.domain.xmlparse`), then the name, UUID and metadata checked.
"""

from __future__ import annotations

import copy

from lxml import etree

from nvmgr.domain import metadata
from nvmgr.domain.metadata import NvmgrMetadata
from nvmgr.domain.namespaces import QEMU_NS, clark
from nvmgr.domain.xmlbind import (
    Child,
    Children,
    OnOff,
    Text,
    UUIDProp,
    XMLObject,
    YesNo,
    parse_yesno,
    remove_element,
)
from nvmgr.domain.xmlparse import parse_tree
from nvmgr.errors import InvalidInputError

_QEMU_COMMANDLINE = clark("qemu:commandline")
_QEMU_ARG = clark("qemu:arg")
_QEMU_ENV = clark("qemu:env")


class Loader(XMLObject):
    """``<os><loader>``: the firmware code image."""

    path = Text(".")
    readonly = YesNo("./@readonly")
    type = Text("./@type")
    secure = YesNo("./@secure")
    stateless = YesNo("./@stateless")
    format = Text("./@format")

    @property
    def is_empty(self) -> bool:
        """No path and no attributes: the element says nothing."""
        return not (self._node.text or "").strip() and not self._node.attrib


class Nvram(XMLObject):
    """``<os><nvram>``: the per-VM UEFI vars file libvirt copies from a template."""

    path = Text(".")
    template = Text("./@template")
    format = Text("./@format")


class OS(XMLObject):
    """``<os>``."""

    firmware = Text("./@firmware")
    arch = Text("./type/@arch")
    machine = Text("./type/@machine")
    loader = Child(Loader, "./loader")
    nvram = Child(Nvram, "./nvram")

    def firmware_features(self) -> dict[str, bool]:
        """``<firmware><feature enabled='yes' name='secure-boot'/>`` as a dict."""
        out: dict[str, bool] = {}
        for f in self._node.findall("firmware/feature"):
            name = f.get("name")
            enabled = f.get("enabled")
            if name and enabled:
                try:
                    out[name] = parse_yesno(enabled)
                except ValueError as e:
                    raise InvalidInputError(
                        f"<os><firmware><feature name={name!r}>: enabled={enabled!r} is not "
                        "'yes' or 'no'"
                    ) from e
        return out

    def set_firmware_features(self, features: dict[str, bool]) -> None:
        """Replace ``<firmware><feature>`` (an empty dict removes ``<firmware>``)."""
        fw = self._node.find("firmware")
        if fw is not None:
            self._node.remove(fw)
        if not features:
            return
        fw = etree.Element("firmware")
        for name, enabled in features.items():
            etree.SubElement(fw, "feature", enabled="yes" if enabled else "no", name=name)
        anchor = self._node.find("type")
        if anchor is not None:
            anchor.addnext(fw)
        else:
            self._node.insert(0, fw)

    def ensure_loader(self) -> Loader:
        """``<loader>``, created after ``<type>`` when absent."""
        loader = self.loader
        if loader is not None:
            return loader
        node = etree.Element("loader")
        anchor = self._node.find("type")
        if anchor is not None:
            anchor.addnext(node)
        else:
            self._node.insert(0, node)
        return Loader(node)

    def remove_loader(self) -> None:
        OS.loader.remove(self)

    def remove_nvram(self) -> None:
        OS.nvram.remove(self)

    def add_nvram(self, path: str | None, template: str | None, fmt: str | None) -> Nvram:
        """A new ``<nvram>`` right after ``<loader>`` (replacing any existing one)."""
        self.remove_nvram()
        node = etree.Element("nvram")
        loader = self._node.find("loader")
        if loader is not None:
            loader.addnext(node)
        else:
            self._node.append(node)
        nv = Nvram(node)
        nv.path, nv.template, nv.format = path, template, fmt
        return nv


class TPM(XMLObject):
    """``<devices><tpm>``: a vTPM; ``emulator`` backends are libvirt-managed swtpm."""

    model = Text("./@model")
    backend_type = Text("./backend/@type")
    version = Text("./backend/@version")
    persistent_state = YesNo("./backend/@persistent_state")
    encryption_secret = UUIDProp("./backend/encryption/@secret")
    alias = Text("./alias/@name")

    def remove_encryption(self) -> None:
        """Drop ``<backend><encryption>``, leaving ``<backend/>`` as it was written before."""
        backend = self._node.find("backend")
        if backend is None:
            return
        for enc in backend.findall("encryption"):
            backend.remove(enc)
        if not len(backend):
            backend.text = None


class Interface(XMLObject):
    """``<devices><interface>``: a NIC (its MAC names its per-device section)."""

    mac = Text("./mac/@address")
    alias = Text("./alias/@name")


class Domain(XMLObject):
    """A parsed ``<domain>``; edits change the tree, :meth:`to_xml` writes it."""

    type = Text("./@type")
    name = Text("./name")
    uuid = UUIDProp("./uuid")
    smm = OnOff("./features/smm/@state")
    os = Child(OS, "./os")
    tpms = Children(TPM, "./devices/tpm")
    interfaces = Children(Interface, "./devices/interface")

    def __init__(self, node: etree._Element) -> None:
        super().__init__(node)
        self._meta: NvmgrMetadata | None = None
        self._meta_read = False

    # -- nvmgr metadata

    def _metadata_nodes(self) -> list[etree._Element]:
        md = self._node.find("metadata")
        return [] if md is None else md.findall(metadata.NVRAM_TAG)

    @property
    def nvmgr(self) -> NvmgrMetadata | None:
        """The checked ``<nvmgr:nvram>`` metadata, or ``None`` (read once, then kept).

        :raise InvalidInputError: more than one ``<nvmgr:nvram>``, or one
            that is not valid (see :func:`nvmgr.domain.metadata.from_element`).
        """
        if not self._meta_read:
            nodes = self._metadata_nodes()
            if len(nodes) > 1:
                raise metadata.meta_error(nodes[1], "more than one <nvmgr:nvram> element")
            self._meta = metadata.from_element(nodes[0]) if nodes else None
            self._meta_read = True
        return self._meta

    def set_nvmgr(self, meta: NvmgrMetadata | None) -> None:
        """Write (or with ``None`` remove) the nvmgr metadata, keeping its place.

        The new element is checked like one read from a file (a key file and
        a secret together, a path with ``..``, say).

        :raise InvalidInputError: *meta* is not valid metadata; the domain
            is left as it was.
        """
        old = self.nvmgr
        nodes = self._metadata_nodes()
        md = self._node.find("metadata")
        if meta is None:
            for n in nodes:
                remove_element(n)
            if md is not None and not len(md) and not (md.text or "").strip():
                self._node.remove(md)
            self._meta = None
            return
        keep = metadata.written_sections(nodes[0], old) if nodes and old is not None else {}
        new = metadata.to_element(meta, keep)
        checked = metadata.from_element(new)
        if nodes:
            nodes[0].addprevious(new)
            for n in nodes:
                remove_element(n)
        else:
            if md is None:
                md = etree.Element("metadata")
                after = self._node.find("description")
                if after is None:
                    after = self._node.find("title")
                if after is None:
                    after = self._node.find("uuid")
                if after is None:
                    after = self._node.find("name")
                if after is not None:
                    after.addnext(md)
                else:
                    self._node.insert(0, md)
            md.append(new)
        self._meta = checked

    # -- <qemu:commandline>

    def _commandline(self, create: bool) -> etree._Element | None:
        node = self._node.find(_QEMU_COMMANDLINE)
        if node is None and create:
            node = etree.SubElement(self._node, _QEMU_COMMANDLINE, nsmap={"qemu": QEMU_NS})
        return node

    @property
    def qemu_args(self) -> list[str]:
        """The ``<qemu:arg value=...>`` values, in order."""
        cl = self._commandline(False)
        if cl is None:
            return []
        out = []
        for a in cl.findall(_QEMU_ARG):
            value = a.get("value")
            if value is None:
                raise InvalidInputError(f"<qemu:arg> at line {a.sourceline} has no value")
            out.append(value)
        return out

    @qemu_args.setter
    def qemu_args(self, args: list[str]) -> None:
        """Replace the ``<qemu:arg>`` list; ``<qemu:env>`` and others are kept."""
        cl = self._commandline(bool(args))
        if cl is None:
            return
        for a in cl.findall(_QEMU_ARG):
            cl.remove(a)
        anchor = cl.find(_QEMU_ENV)
        for value in args:
            el = etree.Element(_QEMU_ARG)
            el.set("value", value)
            if anchor is not None:
                anchor.addprevious(el)
            else:
                cl.append(el)
        if not len(cl):
            self._node.remove(cl)

    # -- devices (nvmgr attach and detach)

    def add_device(self, device: etree._Element) -> None:
        """Append a copy of the libvirt device element *device* to ``<devices>``."""
        devices = self._node.find("devices")
        if devices is None:
            devices = etree.SubElement(self._node, "devices")
        devices.append(copy.deepcopy(device))

    def matching_devices(self, device: etree._Element) -> list[etree._Element]:
        """The ``<devices>`` children *device* names, as ``virsh detach-device`` would:
        the same element; its ``<alias>``, ``<mac>``, ``<target dev>`` or
        ``<source>`` when it gives one, else every attribute it gives.
        """
        devices = self._node.find("devices")
        if devices is None:
            return []
        keys = [k for k in ("alias", "mac", "target", "source") if device.find(k) is not None]
        found = []
        for el in devices.findall(device.tag):
            if keys:
                same = all(_attrs_within(device.find(k), el.find(k)) for k in keys)
            else:
                same = _attrs_within(device, el)
            if same:
                found.append(el)
        return found

    # -- PCI controllers (the PCI Express root ports nvmgr's devices sit on)

    def pci_controller_indexes(self) -> list[int]:
        """The ``index`` of every ``<controller type='pci'>``.

        :raise InvalidInputError: an index that is not a whole number.
        """
        out = []
        for c in self._node.findall("./devices/controller[@type='pci']"):
            raw = c.get("index")
            if raw is None:
                continue
            try:
                out.append(int(raw, 10))
            except ValueError as e:
                raise InvalidInputError(
                    f"<controller type='pci'> at line {c.sourceline} has index {raw!r}, "
                    "not a whole number") from e
        return out

    def root_ports(self, prefix: str) -> dict[str, int]:
        """The ``pcie-root-port`` controllers whose ``<alias name>`` starts with
        *prefix*: alias -> index (-1: libvirt has not numbered it yet)."""
        out: dict[str, int] = {}
        for c in self._node.findall("./devices/controller[@type='pci']"):
            a = c.find("alias")
            alias = a.get("name") if a is not None else None
            if c.get("model") != "pcie-root-port" or not alias or not alias.startswith(prefix):
                continue
            raw = c.get("index") or ""
            out[alias] = int(raw) if raw.isdigit() else -1
        return out

    def add_root_port(self, alias: str) -> int:
        """Add ``<controller type='pci' model='pcie-root-port'>`` with the user
        alias *alias* (QEMU's id of the port) at the index after every PCI
        controller the domain has (libvirt fills gaps with ports of its own and
        gives its devices the lowest free ones); libvirt gives it its address.

        :return: the index.
        """
        devices = self._node.find("devices")
        if devices is None:
            devices = etree.SubElement(self._node, "devices")
        index = max([0, *self.pci_controller_indexes()]) + 1
        c = etree.SubElement(devices, "controller", type="pci", index=str(index),
                             model="pcie-root-port")
        etree.SubElement(c, "alias", name=alias)
        return index

    def remove_root_port(self, alias: str) -> None:
        """Remove the ``pcie-root-port`` controller with user alias *alias* (if any)."""
        for c in self._node.findall("./devices/controller[@type='pci']"):
            a = c.find("alias")
            if a is not None and a.get("name") == alias and c.get("model") == "pcie-root-port":
                remove_element(c)

    # -- output

    def to_xml(self) -> str:
        """The document as text, re-indented with two spaces (stable on repeat)."""
        root = self._node
        _strip_layout(root)
        etree.indent(root, space="  ")
        # Comments and PIs around <domain> are kept, one per line.
        before = reversed(list(root.itersiblings(preceding=True)))
        after = root.itersiblings()
        parts = [_tostring(n) for n in (*before, root, *after)]
        return "\n".join(parts) + "\n"


def _attrs_within(want: etree._Element | None, have: etree._Element | None) -> bool:
    """Every attribute *want* gives, *have* has with the same value."""
    if want is None or have is None:
        return want is None
    return all(have.get(k) == v for k, v in want.attrib.items())


def _tostring(node: etree._Element) -> str:
    saved, node.tail = node.tail, None
    try:
        return etree.tostring(node, encoding="unicode", with_tail=False)
    finally:
        node.tail = saved


def _strip_layout(root: etree._Element) -> None:
    """Drop whitespace-only text and tails so :func:`etree.indent` starts clean."""
    for el in root.iter():
        if len(el) and el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None


def parse_domain(data: str | bytes) -> Domain:
    """Parse a libvirt domain XML document (text or UTF-8 bytes).

    The nvmgr metadata is read and checked here too (and kept: later reads of
    :attr:`Domain.nvmgr` cost nothing), so a domain that parses has metadata
    nvmgr can use.

    :raise InvalidInputError: hostile or malformed XML, not a ``<domain>``,
        a bad name or UUID, or bad nvmgr metadata.
    """
    root = parse_tree(data)
    if not isinstance(root.tag, str) or root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise InvalidInputError(f"the root element is <{tag}>, not <domain>")
    dom = Domain(root)
    name = dom.name
    if name is not None:
        check_domain_name(name)
    _ = dom.uuid  # raises on a malformed UUID
    _ = dom.nvmgr  # raises on bad metadata
    return dom


def check_domain_name(name: str) -> str:
    """A domain name nvmgr can use in a file name (libvirt forbids '/' too)."""
    if not name or "/" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise InvalidInputError(
            f"domain name {name[:80]!r} cannot be used: it must be 1-255 characters, "
            "without '/' or NUL, and not '.' or '..'"
        )
    return name
