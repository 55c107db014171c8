"""Domain XML: the one seam to lxml.

Everything nvmgr reads from or writes into a libvirt domain goes through
here.  The rest of the package sees typed objects (:class:`Domain`,
:class:`OS`, :class:`Loader`, :class:`TPM`) and plain dataclasses
(:class:`NvmgrMetadata`, :class:`SectionDecl`), never an lxml element.

Parsing is hardened, because domain XML reaches nvmgr from hook stdin,
libvirt events and users' files:

- the input is capped at :data:`MAX_INPUT_BYTES` and must be UTF-8;
- any ``<!DOCTYPE`` or ``<!ENTITY`` is refused before lxml sees the text
  (billion laughs, external entities such as ``file:///etc/passwd``); the
  parser itself also resolves no entities, loads no DTD, uses no network and
  keeps libxml2's default (non-huge) limits, and the parsed document is
  checked again for a DTD and for entity references;
- element nesting is capped at :data:`MAX_DEPTH`.

Every problem is an :class:`nvmgr.errors.InvalidInputError` naming what was
wrong.

Elements are mapped by small descriptors in the style of virt-manager's
``XMLProperty``: ``persistent_state = YesNo("./backend/@persistent_state")``
reads and writes the live tree, so a class body is a declaration of the XML
it covers.

The nvmgr metadata (namespace :data:`NVMGR_NS`, schema
``schemas/nvmgr-metadata.rng``)::

    <metadata>
      <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1"
                   image="/var/lib/libvirt/nvmgr/NAME.nvram" format="raw"
                   uuid="..." key-file="..."|key-secret="UUID" luks="no">
        <nvmgr:section name="nic0-eeprom" size="256" binding="opaque"
                       device="net0"/>
        <nvmgr:section name="vpd0" kind="pci-vpd" binding="fwcfg"
                       fwcfg-name="opt/org.example/vpd"/>
        <nvmgr:libvirt-nvram path="..." template="..." format="raw"/>
      </nvmgr:nvram>
    </metadata>

``libvirt-nvram`` records the ``<nvram>`` element nvmgr replaced (and the
firmware autoselection it turned off), so planning a rewritten domain gives
the same sections and :func:`nvmgr.domain.qemuargs.strip_nvmgr` can put it back.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from lxml import etree

from nvmgr import resources
from nvmgr.errors import InvalidInputError, UsageError
from nvmgr.format.layout import MAX_SECTION_SIZE
from nvmgr.format.model import Binding, check_name
from nvmgr.units import parse_size

#: Largest domain XML accepted, in bytes (libvirt's own domains are a few KiB).
MAX_INPUT_BYTES = 1 << 20
#: Deepest element nesting accepted (libvirt's schema needs about 8 levels).
MAX_DEPTH = 64
#: Sum of all sizes declared in nvmgr metadata, a bound against absurd input.
MAX_METADATA_TOTAL = 64 << 30
#: Most ``<nvmgr:section>`` elements one domain may declare.
MAX_DECLARED_SECTIONS = 256

NVMGR_NS = "https://nvmgr.dev/schemas/metadata/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NSMAP = {"nvmgr": NVMGR_NS, "qemu": QEMU_NS}

FORMATS = ("raw", "qcow2")
#: QEMU's fw_cfg file names hold at most 55 characters (FW_CFG_MAX_FILE_PATH - 1).
MAX_FWCFG_NAME = 55
_FWCFG_RE = re.compile(r"opt/[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
#: libvirt device aliases, QEMU ids: a letter, then letters, digits, ``-._``.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_DRIVER_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

_FORBIDDEN_MARKUP = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_XML_DECL_ENCODING = re.compile(rb"""^<\?xml[^>]*\bencoding\s*=\s*["']([^"']*)["']""")

UUID = uuid.UUID
T = TypeVar("T")
X = TypeVar("X", bound="XMLObject")


def _clark(tag: str) -> str:
    """``nvmgr:section`` -> ``{https://nvmgr.dev/...}section``."""
    prefix, sep, local = tag.rpartition(":")
    if not sep:
        return local
    return f"{{{NSMAP[prefix]}}}{local}"


# --------------------------------------------------------------------------
# Hardened parsing


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=False,
        remove_pis=False,
        collect_ids=False,
    )


def _as_utf8(data: str | bytes, what: str) -> bytes:
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise InvalidInputError(f"{what}: expected text or bytes, not {type(data).__name__}")
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"{what} is {len(raw):,} bytes, larger than the {MAX_INPUT_BYTES:,}-byte limit"
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"{what} is not UTF-8 (byte {e.start}); libvirt XML is always UTF-8"
        ) from None
    m = _XML_DECL_ENCODING.match(raw.lstrip())
    if m and m.group(1).lower() not in (b"utf-8", b"utf8", b"us-ascii", b"ascii"):
        raise InvalidInputError(
            f"{what} declares encoding {m.group(1).decode('ascii', 'replace')!r}; "
            "only UTF-8 is accepted"
        )
    return raw


def parse_tree(data: str | bytes, *, what: str = "domain XML") -> etree._Element:
    """Parse untrusted XML with every guard described in the module docstring.

    :param data: the document, as text or UTF-8 bytes.
    :param what: names the input in error messages.
    :raise InvalidInputError: oversized, not UTF-8, a DOCTYPE or entity
        declaration, not well-formed, or nested deeper than :data:`MAX_DEPTH`.
    """
    raw = _as_utf8(data, what)
    m = _FORBIDDEN_MARKUP.search(raw)
    if m:
        line = raw.count(b"\n", 0, m.start()) + 1
        raise InvalidInputError(
            f"{what}, line {line}: <!{m.group(1).decode().upper()}> is not allowed "
            "(document type and entity declarations can expand without bound or read "
            "local files)"
        )
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as e:
        if "Excessive depth" in str(e):  # libxml2's own cap (256), met before ours
            raise InvalidInputError(
                f"{what}: elements nest deeper than {MAX_DEPTH} levels (line {e.lineno})"
            ) from None
        raise InvalidInputError(f"{what} is not well-formed XML: {e}") from None
    tree = root.getroottree()
    if getattr(tree.docinfo, "doctype", "") or tree.docinfo.internalDTD is not None:
        raise InvalidInputError(f"{what}: a document type declaration is not allowed")
    depth = 0
    for event, node in etree.iterwalk(root, events=("start", "end")):
        if event == "end":
            depth -= 1
            continue
        depth += 1
        if depth > MAX_DEPTH:
            raise InvalidInputError(
                f"{what}: elements nest deeper than {MAX_DEPTH} levels (at line {node.sourceline})"
            )
    entity = next(root.iter(etree.Entity), None)  # unreachable without a DTD; kept as a guard
    if entity is not None:
        raise InvalidInputError(f"{what}: entity reference {entity.text} is not allowed")
    return root


# --------------------------------------------------------------------------
# Descriptors


class XMLObject:
    """One element of a document, read and written through descriptors.

    Subclasses declare their XML as class attributes (:class:`Text`,
    :class:`YesNo`, :class:`UUIDProp`, :class:`Child`, :class:`Children`);
    each reads the live tree on access and writes it on assignment.
    """

    def __init__(self, node: etree._Element) -> None:
        self._node = node

    def _where(self) -> str:
        tag = etree.QName(self._node).localname
        line = self._node.sourceline
        return f"<{tag}> (line {line})" if line else f"<{tag}>"


def _walk(node: etree._Element, steps: list[str], create: bool) -> etree._Element | None:
    for step in steps:
        child = node.find(_clark(step))
        if child is None:
            if not create:
                return None
            child = etree.SubElement(node, _clark(step))
        node = child
    return node


def _split(path: str) -> tuple[list[str], str | None]:
    """``./backend/@version`` -> (["backend"], "version"); ``./name`` -> (["name"], None)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if parts and parts[-1].startswith("@"):
        return parts[:-1], parts[-1][1:]
    return parts, None


def _prune(node: etree._Element, stop: etree._Element) -> None:
    """Remove *node* and empty ancestors up to (not including) *stop*."""
    while node is not stop and not len(node) and not node.attrib and not (node.text or "").strip():
        parent = node.getparent()
        if parent is None:
            return
        parent.remove(node)
        node = parent


class XMLProperty(Generic[T]):
    """A typed value at ``path`` (``./a/b`` for text, ``./a/@attr`` for an attribute).

    :param parse: turns the XML text into the value; ``ValueError`` becomes
        an :class:`InvalidInputError` naming the element and the text.
    :param unparse: turns a value back into XML text.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[str], T],
        unparse: Callable[[T], str],
        what: str,
    ) -> None:
        self.path = path
        self.steps, self.attr = _split(path)
        self.parse = parse
        self.unparse = unparse
        self.what = what

    def raw(self, obj: XMLObject) -> str | None:
        node = _walk(obj._node, self.steps, False)
        if node is None:
            return None
        if self.attr is not None:
            return node.get(_clark(self.attr))
        return node.text

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> XMLProperty[T]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> T | None: ...

    def __get__(
        self, obj: XMLObject | None, objtype: type[Any] | None = None
    ) -> T | None | XMLProperty[T]:
        if obj is None:
            return self
        text = self.raw(obj)
        if text is None:
            return None
        try:
            return self.parse(text)
        except ValueError as e:
            raise InvalidInputError(
                f"{obj._where()}: {self.path} = {text[:80]!r} is not {self.what} ({e})"
            ) from None

    def __set__(self, obj: XMLObject, value: T | None) -> None:
        if value is None:
            node = _walk(obj._node, self.steps, False)
            if node is None:
                return
            if self.attr is not None:
                if _clark(self.attr) in node.attrib:
                    del node.attrib[_clark(self.attr)]
            else:
                node.text = None
            _prune(node, obj._node)
            return
        node = _walk(obj._node, self.steps, True)
        assert node is not None
        text = self.unparse(value)
        if self.attr is not None:
            node.set(_clark(self.attr), text)
        else:
            node.text = text


def _yesno(text: str) -> bool:
    v = text.strip()
    if v in ("yes", "on"):
        return True
    if v in ("no", "off"):
        return False
    raise ValueError("expected 'yes' or 'no'")


def _uuid(text: str) -> uuid.UUID:
    return uuid.UUID(text.strip())


def Text(path: str) -> XMLProperty[str]:  # noqa: N802 - reads as a declaration
    """A string value: ``name = Text("./name")``."""
    return XMLProperty(path, str, str, "text")


def YesNo(path: str) -> XMLProperty[bool]:  # noqa: N802
    """A libvirt ``yes``/``no`` value."""
    return XMLProperty(path, _yesno, lambda b: "yes" if b else "no", "'yes' or 'no'")


def OnOff(path: str) -> XMLProperty[bool]:  # noqa: N802
    """A libvirt ``on``/``off`` value (``<smm state='on'/>``)."""
    return XMLProperty(path, _yesno, lambda b: "on" if b else "off", "'on' or 'off'")


def UUIDProp(path: str) -> XMLProperty[uuid.UUID]:  # noqa: N802
    """A UUID, written in libvirt's lower-case dashed form."""
    return XMLProperty(path, _uuid, str, "a UUID")


class Child(Generic[X]):
    """The first element at ``path`` wrapped in ``cls``, or ``None``."""

    def __init__(self, cls: type[X], path: str) -> None:
        self.cls = cls
        self.steps, _ = _split(path)

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Child[X]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> X | None: ...

    def __get__(self, obj: XMLObject | None, objtype: type[Any] | None = None) -> X | None | Child[X]:
        if obj is None:
            return self
        node = _walk(obj._node, self.steps, False)
        return None if node is None else self.cls(node)

    def create(self, obj: XMLObject) -> X:
        """The child, created (with any missing parents) when absent."""
        node = _walk(obj._node, self.steps, True)
        assert node is not None
        return self.cls(node)

    def remove(self, obj: XMLObject) -> None:
        node = _walk(obj._node, self.steps, False)
        if node is not None:
            parent = node.getparent()
            assert parent is not None
            parent.remove(node)


class Children(Generic[X]):
    """Every element at ``path`` (the last step repeats), each wrapped in ``cls``."""

    def __init__(self, cls: type[X], path: str) -> None:
        self.cls = cls
        steps, _ = _split(path)
        self.parents, self.tag = steps[:-1], steps[-1]

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Children[X]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> list[X]: ...

    def __get__(
        self, obj: XMLObject | None, objtype: type[Any] | None = None
    ) -> list[X] | Children[X]:
        if obj is None:
            return self
        parent = _walk(obj._node, self.parents, False)
        if parent is None:
            return []
        return [self.cls(n) for n in parent.findall(_clark(self.tag))]


# --------------------------------------------------------------------------
# Domain elements


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
                    out[name] = _yesno(enabled)
                except ValueError:
                    raise InvalidInputError(
                        f"<os><firmware><feature name={name!r}>: enabled={enabled!r} is not "
                        "'yes' or 'no'"
                    ) from None
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


# --------------------------------------------------------------------------
# nvmgr metadata: plain data, validated as a whole


@dataclasses.dataclass(frozen=True)
class SectionDecl:
    """One ``<nvmgr:section>``: a section the domain asks for, or an override.

    ``size`` or ``kind`` (a profile in :mod:`nvmgr.domain.profiles`) gives the
    worst-case size; naming a section the profiles derive (``uefi-vars``,
    ``tpm-permall``...) overrides its size.
    """

    name: str
    size: int | None = None
    binding: Binding | None = None
    kind: str | None = None
    device: str | None = None
    driver: str | None = None
    fwcfg_name: str | None = None


@dataclasses.dataclass(frozen=True)
class LibvirtNvram:
    """The ``<nvram>`` (and firmware autoselection) nvmgr replaced in a domain.

    ``path``, ``template`` and ``format`` are the ``<nvram>`` element as it
    was (all ``None`` when there was none); ``firmware`` and ``features`` the
    autoselection; ``firmware_template`` the varstore template of the
    firmware autoselection picked, which fills the ``uefi-vars`` section.
    """

    path: str | None = None
    template: str | None = None
    format: str | None = None
    firmware: str | None = None
    features: tuple[tuple[str, bool], ...] = ()
    firmware_template: str | None = None

    @property
    def vars_template(self) -> str | None:
        """The template the UEFI vars section starts from."""
        return self.template or self.firmware_template


@dataclasses.dataclass(frozen=True)
class NvmgrMetadata:
    """``<metadata><nvmgr:nvram>``: where the VM's image is, and extra sections."""

    image: str | None = None
    format: str | None = None
    uuid: UUID | None = None
    key_file: str | None = None
    key_secret: UUID | None = None
    luks: bool = False
    sections: tuple[SectionDecl, ...] = ()
    libvirt_nvram: LibvirtNvram | None = None

    @property
    def encrypted(self) -> bool:
        """A key was named: nvmgr encrypts the image's non-live sections."""
        return self.key_file is not None or self.key_secret is not None


_RNG: etree.RelaxNG | None = None


def _schema() -> etree.RelaxNG:
    global _RNG
    if _RNG is None:
        path = resources.data_path(resources.METADATA_SCHEMA)
        _RNG = etree.RelaxNG(etree.parse(str(path), _parser()))
    return _RNG


def _meta_error(node: etree._Element, msg: str) -> InvalidInputError:
    line = f" (line {node.sourceline})" if node.sourceline else ""
    return InvalidInputError(f"nvmgr metadata{line}: {msg}")


def _absolute_path(node: etree._Element, attr: str) -> str | None:
    value = node.get(attr)
    if value is None:
        return None
    if not value.startswith("/") or "\x00" in value or "/../" in value + "/":
        raise _meta_error(node, f"{attr}={value!r} must be an absolute path without '..'")
    return value


def _decl_size(node: etree._Element, name: str) -> int | None:
    text = node.get("size")
    if text is None:
        return None
    try:
        size = parse_size(text, what=f"size of section {name}")
    except UsageError as e:
        raise _meta_error(node, e.message) from None
    if size <= 0:
        raise _meta_error(node, f"section {name}: size {text!r} must be at least 1 byte")
    if size > MAX_SECTION_SIZE:
        raise _meta_error(
            node,
            f"section {name}: size {text!r} ({size:,} bytes) is larger than the 1 TiB "
            "limit for one section",
        )
    return size


def _section_decl(node: etree._Element) -> SectionDecl:
    name = node.get("name", "")
    try:
        check_name(name)
    except UsageError as e:
        raise _meta_error(node, e.message) from None
    binding_text = node.get("binding")
    try:
        binding = Binding.parse(binding_text) if binding_text is not None else None
    except UsageError as e:
        raise _meta_error(node, f"section {name}: {e.message}") from None
    device, driver, fwcfg = node.get("device"), node.get("driver"), node.get("fwcfg-name")
    if device is not None and not _ID_RE.fullmatch(device):
        raise _meta_error(node, f"section {name}: device={device!r} is not a device alias")
    if driver is not None and not _DRIVER_RE.fullmatch(driver):
        raise _meta_error(node, f"section {name}: driver={driver!r} is not a QEMU device name")
    if fwcfg is not None and (
        not _FWCFG_RE.fullmatch(fwcfg) or len(fwcfg) > MAX_FWCFG_NAME or ".." in fwcfg
    ):
        raise _meta_error(
            node,
            f"section {name}: fwcfg-name={fwcfg!r} must start with 'opt/', use "
            f"A-Z a-z 0-9 . _ - and '/', hold no '..' and be at most {MAX_FWCFG_NAME} characters",
        )
    if binding is Binding.FWCFG and fwcfg is None:
        raise _meta_error(node, f"section {name}: binding fwcfg needs a fwcfg-name")
    if fwcfg is not None and binding is not Binding.FWCFG:
        raise _meta_error(node, f"section {name}: fwcfg-name needs binding='fwcfg'")
    if driver is not None and binding is not Binding.BLOCK:
        raise _meta_error(node, f"section {name}: driver needs binding='block'")
    return SectionDecl(
        name=name,
        size=_decl_size(node, name),
        binding=binding,
        kind=node.get("kind"),
        device=device,
        driver=driver,
        fwcfg_name=fwcfg,
    )


def _metadata_from(node: etree._Element) -> NvmgrMetadata:
    fmt = node.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise _meta_error(node, f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    uuids: dict[str, uuid.UUID | None] = {}
    for attr in ("uuid", "key-secret"):
        text = node.get(attr)
        try:
            uuids[attr] = uuid.UUID(text) if text is not None else None
        except ValueError:
            raise _meta_error(node, f"{attr}={text!r} is not a UUID") from None
    if node.get("key-file") is not None and node.get("key-secret") is not None:
        raise _meta_error(node, "give key-file or key-secret, not both")
    luks_text = node.get("luks")
    try:
        luks = _yesno(luks_text) if luks_text is not None else False
    except ValueError:
        raise _meta_error(node, f"luks={luks_text!r} is not 'yes' or 'no'") from None
    section_nodes = node.findall(_clark("nvmgr:section"))
    if len(section_nodes) > MAX_DECLARED_SECTIONS:
        raise _meta_error(
            node, f"{len(section_nodes)} sections declared; at most {MAX_DECLARED_SECTIONS}"
        )
    sections = tuple(_section_decl(s) for s in section_nodes)
    names = [s.name for s in sections]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _meta_error(node, f"section {dup[0]} is declared twice")
    total = sum(s.size or 0 for s in sections)
    if total > MAX_METADATA_TOTAL:
        raise _meta_error(
            node,
            f"declared sections total {total:,} bytes, more than the "
            f"{MAX_METADATA_TOTAL >> 30} GiB limit for one image",
        )
    lv = node.find(_clark("nvmgr:libvirt-nvram"))
    libvirt_nvram = None
    if lv is not None:
        features = []
        for f in lv.findall(_clark("nvmgr:feature")):
            try:
                features.append((f.get("name", ""), _yesno(f.get("enabled", ""))))
            except ValueError:
                raise _meta_error(f, "feature enabled= must be 'yes' or 'no'") from None
        libvirt_nvram = LibvirtNvram(
            path=_absolute_path(lv, "path"),
            template=_absolute_path(lv, "template"),
            format=lv.get("format"),
            firmware=lv.get("firmware"),
            features=tuple(features),
            firmware_template=_absolute_path(lv, "firmware-template"),
        )
    return NvmgrMetadata(
        image=_absolute_path(node, "image"),
        format=fmt,
        uuid=uuids["uuid"],
        key_file=_absolute_path(node, "key-file"),
        key_secret=uuids["key-secret"],
        luks=luks,
        sections=sections,
        libvirt_nvram=libvirt_nvram,
    )


def parse_metadata(node: etree._Element) -> NvmgrMetadata:
    """Check one ``<nvmgr:nvram>`` element and return it as data.

    Attribute checks come first (their messages name the section and the
    value); the RelaxNG schema then rejects anything it does not describe.
    """
    meta = _metadata_from(node)
    rng = _schema()
    if not rng.validate(etree.ElementTree(_detached(node))):
        err = rng.error_log.last_error
        where = f"line {node.sourceline}" if node.sourceline else "metadata"
        detail = err.message if err is not None else "does not validate"
        raise InvalidInputError(
            f"nvmgr metadata ({where}) does not match schemas/nvmgr-metadata.rng: {detail}"
        )
    return meta


def _detached(node: etree._Element) -> etree._Element:
    """A copy of *node* as the root of its own document (for RelaxNG)."""
    return etree.fromstring(etree.tostring(node), _parser())


def _metadata_element(meta: NvmgrMetadata) -> etree._Element:
    el = etree.Element(_clark("nvmgr:nvram"), nsmap={"nvmgr": NVMGR_NS})
    for attr, value in (
        ("image", meta.image),
        ("format", meta.format),
        ("uuid", str(meta.uuid) if meta.uuid else None),
        ("key-file", meta.key_file),
        ("key-secret", str(meta.key_secret) if meta.key_secret else None),
        ("luks", "yes" if meta.luks else None),
    ):
        if value is not None:
            el.set(attr, value)
    for s in meta.sections:
        se = etree.SubElement(el, _clark("nvmgr:section"))
        for attr, value in (
            ("name", s.name),
            ("size", str(s.size) if s.size is not None else None),
            ("kind", s.kind),
            ("binding", s.binding.name.lower() if s.binding is not None else None),
            ("device", s.device),
            ("driver", s.driver),
            ("fwcfg-name", s.fwcfg_name),
        ):
            if value is not None:
                se.set(attr, value)
    rec = meta.libvirt_nvram
    if rec is not None:
        lv = etree.SubElement(el, _clark("nvmgr:libvirt-nvram"))
        for attr, value in (
            ("path", rec.path),
            ("template", rec.template),
            ("format", rec.format),
            ("firmware", rec.firmware),
            ("firmware-template", rec.firmware_template),
        ):
            if value is not None:
                lv.set(attr, value)
        for name, enabled in rec.features:
            etree.SubElement(
                lv, _clark("nvmgr:feature"), name=name, enabled="yes" if enabled else "no"
            )
    return el


def _keep_written_sections(old: etree._Element, new: etree._Element) -> None:
    """Reuse *old*'s ``<nvmgr:section>`` elements where they say the same thing.

    A user's ``size='1M'`` stays ``1M`` when nvmgr rewrites the metadata.
    """
    tag = _clark("nvmgr:section")
    written = {}
    for el in old.findall(tag):
        try:
            written[_section_decl(el)] = el
        except InvalidInputError:
            continue
    for el in new.findall(tag):
        same = written.get(_section_decl(el))
        if same is not None:
            keep = etree.fromstring(etree.tostring(same, with_tail=False), _parser())
            new.replace(el, keep)


# --------------------------------------------------------------------------
# The domain


class Domain(XMLObject):
    """A parsed ``<domain>``; edits change the tree, :meth:`to_xml` writes it."""

    type = Text("./@type")
    name = Text("./name")
    uuid = UUIDProp("./uuid")
    smm = OnOff("./features/smm/@state")
    os = Child(OS, "./os")
    tpms = Children(TPM, "./devices/tpm")

    # -- nvmgr metadata

    def _metadata_nodes(self) -> list[etree._Element]:
        md = self._node.find("metadata")
        return [] if md is None else md.findall(_clark("nvmgr:nvram"))

    @property
    def nvmgr(self) -> NvmgrMetadata | None:
        """The validated ``<nvmgr:nvram>`` metadata, or ``None``."""
        nodes = self._metadata_nodes()
        if len(nodes) > 1:
            raise _meta_error(nodes[1], "more than one <nvmgr:nvram> element")
        return parse_metadata(nodes[0]) if nodes else None

    def set_nvmgr(self, meta: NvmgrMetadata | None) -> None:
        """Write (or with ``None`` remove) the nvmgr metadata, keeping its place."""
        nodes = self._metadata_nodes()
        md = self._node.find("metadata")
        if meta is None:
            for n in nodes:
                parent = n.getparent()
                assert parent is not None
                parent.remove(n)
            if md is not None and not len(md) and not (md.text or "").strip():
                self._node.remove(md)
            return
        new = _metadata_element(meta)
        if nodes:
            _keep_written_sections(nodes[0], new)
            nodes[0].getparent().replace(nodes[0], new)  # type: ignore[union-attr]
            for n in nodes[1:]:
                n.getparent().remove(n)  # type: ignore[union-attr]
            return
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

    # -- <qemu:commandline>

    def _commandline(self, create: bool) -> etree._Element | None:
        node = self._node.find(_clark("qemu:commandline"))
        if node is None and create:
            node = etree.SubElement(
                self._node, _clark("qemu:commandline"), nsmap={"qemu": QEMU_NS}
            )
        return node

    @property
    def qemu_args(self) -> list[str]:
        """The ``<qemu:arg value=...>`` values, in order."""
        cl = self._commandline(False)
        if cl is None:
            return []
        out = []
        for a in cl.findall(_clark("qemu:arg")):
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
        for a in cl.findall(_clark("qemu:arg")):
            cl.remove(a)
        anchor = cl.find(_clark("qemu:env"))
        for value in args:
            el = etree.Element(_clark("qemu:arg"))
            el.set("value", value)
            if anchor is not None:
                anchor.addprevious(el)
            else:
                cl.append(el)
        if not len(cl):
            self._node.remove(cl)

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

    The nvmgr metadata is validated here too, so a domain that parses has
    metadata nvmgr can use.

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


def serialize_domain(dom: Domain) -> str:
    """The domain as XML text (see :meth:`Domain.to_xml`)."""
    return dom.to_xml()
