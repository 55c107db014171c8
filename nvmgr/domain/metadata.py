"""nvmgr's domain metadata: plain data, and its one reading from and writing to XML.

The metadata (namespace :data:`~nvmgr.domain.namespaces.NVMGR_NS`, schema
``schemas/nvmgr-metadata.rng``, shipped as ``nvmgr/data/nvmgr-metadata.rng``)::

    <metadata>
      <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1"
                   image="/var/lib/libvirt/nvmgr/NAME.nvram" format="raw"
                   uuid="..." key-file="..."|key-secret="UUID" luks="no">
        <nvmgr:section name="nic0-eeprom" size="256" binding="opaque"
                       device="net0"/>
        <nvmgr:section name="vpd0" kind="pci-vpd" binding="fwcfg"
                       fwcfg-name="opt/org.example/vpd"/>
        <nvmgr:per-device kind="nic-eeprom"/>
        <nvmgr:libvirt-nvram path="..." template="..." format="raw"/>
      </nvmgr:nvram>
    </metadata>

``per-device`` gives every libvirt device of a kind's type its own section
(:func:`nvmgr.domain.profiles.per_device_profiles`): ``nic-eeprom``, one per
``<interface>``, named after its MAC address; a NIC another tool adds later
(``virsh attach-device --config``) gets its section when the watcher
reconciles the domain.  A ``<nvmgr:section>`` also stands alone, as the
device ``nvmgr attach`` takes (:func:`section_from_element`).

``libvirt-nvram`` records the ``<nvram>`` element nvmgr replaced (and the
firmware autoselection it turned off), so planning a rewritten domain gives
the same sections and :func:`nvmgr.domain.qemuargs.strip_nvmgr` can put it back.

The rest of nvmgr sees :class:`NvmgrMetadata`, :class:`SectionDecl` and
:class:`LibvirtNvram`: frozen dataclasses without lxml types.
:func:`from_element` checks an element once -- the RelaxNG schema says what
may appear (elements, attributes, value patterns, enumerations, key-file XOR
key-secret); :func:`_decode` then applies only the rules a schema cannot
say (sizes and their total, counts, duplicates, no ``..`` in names and paths,
which attributes go together).  A schema refusal is explained from
:data:`_RULES`, naming the attribute and its value.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from uuid import UUID

from lxml import etree

from nvmgr import resources
from nvmgr.domain import profiles
from nvmgr.domain.namespaces import NVMGR_NS, clark
from nvmgr.domain.xmlparse import parse_tree
from nvmgr.errors import InstallationError, InvalidInputError, UsageError
from nvmgr.format.layout import MAX_SECTION_SIZE
from nvmgr.format.model import MAX_IMAGE_SIZE, MAX_NAME, Binding
from nvmgr.storage.nbd import DEFAULT_PORT as NBD_PORT
from nvmgr.storage.nbd import NbdLocation, is_nbd
from nvmgr.storage.rbd import RbdLocation, is_rbd
from nvmgr.units import parse_size

#: The smallest ``max-image-size``: two 64 KiB header areas and room for sections.
MIN_MAX_IMAGE_SIZE = 1 << 20

#: Sum of all sizes declared in nvmgr metadata, a bound against absurd input.
MAX_METADATA_TOTAL = 64 << 30
#: Most ``<nvmgr:section>`` elements one domain may declare.
MAX_DECLARED_SECTIONS = 256
#: Image containers the metadata may name.
FORMATS = ("raw", "qcow2")
#: QEMU's fw_cfg file names hold at most 55 characters (FW_CFG_MAX_FILE_PATH - 1).
MAX_FWCFG_NAME = 55

#: ``<nvmgr:nvram>``, the metadata's root element.
NVRAM_TAG = clark("nvmgr:nvram")
SECTION_TAG = clark("nvmgr:section")
LIBVIRT_NVRAM_TAG = clark("nvmgr:libvirt-nvram")
FEATURE_TAG = clark("nvmgr:feature")
SOURCE_TAG = clark("nvmgr:source")
PER_DEVICE_TAG = clark("nvmgr:per-device")


# --------------------------------------------------------------------------
# The data


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
    per_device: tuple[str, ...] = ()
    #: The largest the image file may be (a storage pool's volume limit):
    #: growth past it puts new sections into member images instead.
    max_image_size: int | None = None
    #: The image was given as a ``<nvmgr:source protocol='rbd'>`` element (and
    #: is written back as one); ``image`` holds it as an ``rbd:`` location.
    image_element: bool = False

    @property
    def encrypted(self) -> bool:
        """A key was named: every section is encrypted (live ones as LUKS volumes)."""
        return self.key_file is not None or self.key_secret is not None


# --------------------------------------------------------------------------
# Reading: the schema, then what it cannot say


_RNG: etree.RelaxNG | None = None
_SOURCE_RNG: etree.RelaxNG | None = None


def _schema() -> etree.RelaxNG:
    """The compiled RelaxNG schema (read once per process).

    :raise InstallationError: the shipped schema is missing or broken.
    """
    global _RNG
    if _RNG is None:
        what = f"the shipped {resources.METADATA_SCHEMA}"
        text = resources.read_text(resources.METADATA_SCHEMA)
        try:
            _RNG = etree.RelaxNG(parse_tree(text, what=what))
        except (InvalidInputError, etree.RelaxNGParseError) as e:
            raise InstallationError(f"{what} cannot be used ({e}); reinstall nvmgr") from e
    return _RNG


def _source_schema() -> etree.RelaxNG:
    """The schema's ``rbdSource`` pattern alone: libxml2 says only "extra element in
    interleave" of a bad ``<nvmgr:source>`` inside ``<nvmgr:nvram>``; checked on
    its own, its refusal names the attribute (an NBD source gets its own message)."""
    global _SOURCE_RNG
    if _SOURCE_RNG is None:
        _schema()
        text = re.sub(r"<start>.*?</start>", '<start><ref name="rbdSource"/></start>',
                      resources.read_text(resources.METADATA_SCHEMA), count=1, flags=re.S)
        _SOURCE_RNG = etree.RelaxNG(parse_tree(text, what="the source pattern"))
    return _SOURCE_RNG


def preload() -> None:
    """Read and compile the schema now (the hook server, before it forks workers)."""
    _schema()
    _source_schema()


def meta_error(node: etree._Element, msg: str) -> InvalidInputError:
    """An :class:`InvalidInputError` about the metadata element *node* (with its line)."""
    line = f" (line {node.sourceline})" if node.sourceline else ""
    return InvalidInputError(f"nvmgr metadata{line}: {msg}")


_ABSOLUTE = "{attr}={v} must be an absolute path without '..'"
_UUID = "{attr}={v} is not a UUID"
_YESNO = "{attr}={v} is not 'yes' or 'no'"
_FWCFG = ("{attr}={v} must start with 'opt/', use A-Z a-z 0-9 . _ - and '/', hold no '..' "
          f"and be at most {MAX_FWCFG_NAME} characters")
_SECTION_NAME = (f"invalid section name {{v}}: 1-{MAX_NAME} characters from A-Z a-z 0-9 . _ + -, "
                 "starting with a letter or digit, no '..'")

#: What each value the schema checks must look like, for messages:
#: (element, attribute) -> template with ``{attr}`` and ``{v}`` (the value's repr).
_RULES: Mapping[tuple[str, str], str] = {
    ("nvram", "image"): _ABSOLUTE + ", an rbd:POOL/IMAGE[:conf=F][:id=U][:keyring=F] location "
                                    "or an NBD URI (nbd://HOST[:PORT]/EXPORT, "
                                    "nbd+unix:///EXPORT?socket=/PATH)",
    ("nvram", "format"): f"{{attr}}={{v}} is not one of {', '.join(FORMATS)}",
    ("nvram", "uuid"): _UUID,
    ("nvram", "key-file"): _ABSOLUTE,
    ("nvram", "key-secret"): _UUID,
    ("nvram", "luks"): _YESNO,
    ("nvram", "max-image-size"): "{attr}={v} is not a size: use a byte count with an "
                                 "optional K, M, G or T suffix",
    ("section", "name"): _SECTION_NAME,
    ("section", "size"): "invalid size {v}: use a byte count with an optional K, M, G or T suffix",
    ("section", "kind"): "{attr}={v} is not a device kind (see nvmgr plan's profiles)",
    ("section", "binding"): "unknown binding {v} (one of: "
                            + ", ".join(b.name.lower() for b in Binding) + ")",
    ("section", "device"): "{attr}={v} is not a device alias",
    ("section", "driver"): "{attr}={v} is not a QEMU device name",
    ("section", "fwcfg-name"): _FWCFG,
    ("libvirt-nvram", "path"): _ABSOLUTE,
    ("libvirt-nvram", "template"): _ABSOLUTE,
    ("libvirt-nvram", "firmware-template"): _ABSOLUTE,
    ("libvirt-nvram", "format"): f"{{attr}}={{v}} is not one of {', '.join(FORMATS)}",
    ("libvirt-nvram", "firmware"): "{attr}={v} is not 'efi' or 'bios'",
    ("source", "protocol"): "source {attr}={v} is not a network protocol nvmgr knows (rbd, nbd)",
    ("source", "name"): "source {attr}={v} is not POOL/IMAGE",
    ("host", "name"): "source host {attr}={v} is not a host name or address",
    ("host", "port"): "source host {attr}={v} is not a port number",
    ("snapshot", "name"): "source snapshot {attr}={v} is not an RBD snapshot name",
    ("config", "file"): "source config " + _ABSOLUTE,
    ("auth", "username"): "source auth {attr}={v} is not a Ceph user name",
    ("secret", "type"): "source auth secret {attr}={v} is not 'ceph'",
    ("secret", "uuid"): "source auth secret " + _UUID,
    ("secret", "usage"): "source auth secret {attr}={v} is not a libvirt secret usage name",
    ("keyring", "file"): "source auth keyring " + _ABSOLUTE,
    ("feature", "name"): "feature {attr}={v} is not a firmware feature name",
    ("per-device", "kind"): "per-device {attr}={v} is not a device kind (see nvmgr plan's "
                            "profiles)",
    ("feature", "enabled"): "feature {attr}={v} must be 'yes' or 'no'",
}
#: The attributes the schema requires, per element.
_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "section": ("name",), "feature": ("name", "enabled"), "per-device": ("kind",),
    "source": ("protocol", "name"),
    "host": ("name",), "snapshot": ("name",), "config": ("file",),
    "secret": ("type",), "keyring": ("file",)}

#: The values the schema allows for the ``<nvmgr:source>`` subtree's attributes, as
#: Python patterns: libxml2 reports only "failed to validate attributes" there, these
#: find which one (``tests/test_rbd_location.py`` holds them to the schema's).
_SOURCE_VALUES: Mapping[tuple[str, str], str] = {
    ("source", "protocol"): r"rbd",
    ("source", "name"): r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}/[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}",
    ("host", "name"): r"[A-Za-z0-9][A-Za-z0-9.\-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]",
    ("host", "port"): r"[0-9]{1,5}",
    ("snapshot", "name"): r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}",
    ("config", "file"): r"/.{0,4095}",
    ("auth", "username"): r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}",
    ("secret", "type"): r"ceph",
    ("secret", "uuid"): r"[a-fA-F0-9]{8}-?[a-fA-F0-9]{4}-?[a-fA-F0-9]{4}-?[a-fA-F0-9]{4}-?"
                        r"[a-fA-F0-9]{12}",
    ("secret", "usage"): r"[^:\\\n]{1,256}",
    ("keyring", "file"): r"/.{0,4095}",
}

_INVALID_ATTR = re.compile(r"Invalid attribute (\S+) for element (\S+)")
_ATTRS_FAILED = re.compile(r"Element (\S+) failed to validate attributes")


def _explain(el: etree._Element, attr: str, value: str) -> str | None:
    """Say what is wrong with *attr* of *el* from :data:`_RULES` (``None``: no rule)."""
    local = etree.QName(el).localname
    rule = _RULES.get((local, attr))
    if rule is None:
        return None
    if (local == "nvram" and attr in ("key-file", "key-secret")
            and el.get("key-file") is not None and el.get("key-secret") is not None):
        return "give key-file or key-secret, not both"  # the schema's <choice>
    text = rule.format(attr=attr, v=repr(value))
    name = el.get("name")
    if local == "section" and attr != "name" and name is not None:
        text = f"section {name}: {text}"
    return text


def _schema_error(node: etree._Element, log: etree._ListErrorLog) -> InvalidInputError:
    """The schema's refusal of *node*, naming the attribute and value where it can."""
    errors = list(log)
    tree = etree.ElementTree(node)
    prefixes = {k: v for k, v in node.nsmap.items() if k}

    def element_at(path: str | None) -> etree._Element | None:
        if not path:
            return None
        try:
            found = tree.xpath(path, namespaces=prefixes)
        except etree.XPathError:
            return None
        if isinstance(found, list) and found and isinstance(found[0], etree._Element):
            return found[0]
        return None

    for err in errors:
        m = _INVALID_ATTR.fullmatch(err.message)
        el = element_at(err.path) if m else None
        value = el.get(m.group(1)) if m and el is not None else None
        if m and el is not None and value is not None:  # else: a namespaced or unknown one
            why = _explain(el, m.group(1), value)
            if why is not None:
                return meta_error(el, why)
    for i, err in enumerate(errors):
        m = _ATTRS_FAILED.fullmatch(err.message)
        if not m:
            continue
        # libxml2 gives this one no path; the error after it names the element.
        candidates = [element_at(e.path) for e in errors[i:]]
        el = next((c for c in candidates
                   if c is not None and etree.QName(c).localname == m.group(1)), None)
        for attr in _REQUIRED.get(m.group(1), ()):
            if el is not None and el.get(attr) is None:
                why = _explain(el, attr, "")
                if why is not None:
                    return meta_error(el, why)
        bad = _bad_source_value(el) if el is not None else None
        if bad is not None:
            return bad
    for el in node.iter(SOURCE_TAG, *(clark(f"nvmgr:{t}") for t in
                                       ("host", "snapshot", "config", "auth", "secret",
                                        "keyring"))):
        bad = _bad_source_value(el)
        if bad is not None:
            return bad
    first = errors[0] if errors else None
    line = (first.line if first is not None and first.line else None) or node.sourceline
    where = f"line {line}" if line else "metadata"
    detail = first.message if first is not None else "does not validate"
    el = next((e for e in map(element_at, (err.path for err in errors)) if e is not None), None)
    if el is not None:
        detail += f" ({_start_tag(el)})"
    return InvalidInputError(
        f"nvmgr metadata ({where}) does not match schemas/nvmgr-metadata.rng: {detail}"
    )


def _bad_source_value(el: etree._Element) -> InvalidInputError | None:
    """The first attribute of *el* (in the ``<nvmgr:source>`` subtree) whose value
    the schema refuses, explained; ``None`` when they all fit."""
    local = etree.QName(el).localname
    for key in el.keys():
        attr, value = str(key), str(el.get(key, ""))
        pattern = _SOURCE_VALUES.get((local, attr))
        if pattern is not None and not re.fullmatch(pattern, value):
            why = _explain(el, attr, value)
            if why is not None:
                return meta_error(el, why)
    return None


def _start_tag(el: etree._Element) -> str:
    """``<nvmgr:feature name='x' enabled='maybe'>``, for messages (values cut at 80)."""
    q = etree.QName(el)
    tag = f"{el.prefix}:{q.localname}" if el.prefix else q.localname
    prefixes = {uri: p for p, uri in el.nsmap.items() if p}

    def name(key: str | bytes) -> str:
        k = etree.QName(key)
        p = prefixes.get(k.namespace or "")
        return f"{p}:{k.localname}" if p else k.localname

    attrs = "".join(f" {name(k)}={v[:80]!r}" for k, v in el.items())
    return f"<{tag}{attrs}>"


def from_element(node: etree._Element) -> NvmgrMetadata:
    """Check one ``<nvmgr:nvram>`` element (in place) and return it as data.

    :raise InvalidInputError: the schema refuses it, or a rule it cannot
        express does; the message names the element's line, the section, the
        attribute and its value.
    :raise InstallationError: the shipped schema is missing.
    """
    rng = _schema()
    # Validated where it stands (lxml gives the subtree a temporary root):
    # error lines are the domain document's own.
    try:
        valid = rng.validate(etree.ElementTree(node))
    except etree.LxmlError as e:  # never escapes as lxml's own error
        raise meta_error(node, f"nvmgr metadata cannot be validated: {e}") from e
    if not valid:
        log = rng.error_log
        for src in node.findall(SOURCE_TAG):
            sub = _source_schema()
            if not sub.validate(etree.ElementTree(src)):
                if src.get("protocol") == "nbd":  # the value rules below are RBD's
                    raise meta_error(src, "source protocol='nbd' takes name='EXPORT' (optional) "
                                     "and one <nvmgr:host name='HOST' [port='PORT']/> or "
                                     "<nvmgr:host transport='unix' socket='/PATH'/>")
                raise _schema_error(src, sub.error_log)
        raise _schema_error(node, log)
    return _decode(node)


def _path(node: etree._Element, attr: str) -> str | None:
    """An absolute path attribute (the schema checked the leading '/'): no '..' step;
    an image may also be an ``rbd:`` location or an NBD URI (checked whole)."""
    value = node.get(attr)
    if value is not None and attr == "image" and (is_rbd(value) or is_nbd(value)):
        try:
            (RbdLocation if is_rbd(value) else NbdLocation).parse(value)
        except UsageError as e:
            raise meta_error(node, e.message) from e
        return value
    if value is not None and "/../" in value + "/":
        raise meta_error(node, _ABSOLUTE.format(attr=attr, v=repr(value)))
    return value


def _uuid(node: etree._Element, attr: str) -> UUID | None:
    text = node.get(attr)
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError as e:  # the schema's pattern admits only what UUID() reads
        raise meta_error(node, _UUID.format(attr=attr, v=repr(text))) from e


def _size(node: etree._Element, name: str) -> int | None:
    text = node.get("size")
    if text is None:
        return None
    try:
        size = parse_size(text, what=f"size of section {name}")  # e.g. a fraction of a byte
    except UsageError as e:
        raise meta_error(node, e.message) from e
    if size <= 0:
        raise meta_error(node, f"section {name}: size {text!r} must be at least 1 byte")
    if size > MAX_SECTION_SIZE:
        raise meta_error(
            node,
            f"section {name}: size {text!r} ({size:,} bytes) is larger than the 1 TiB "
            "limit for one section",
        )
    return size


def _section(node: etree._Element) -> SectionDecl:
    name = node.get("name", "")
    if ".." in name:
        raise meta_error(node, _SECTION_NAME.format(v=repr(name)))
    binding_text = node.get("binding")
    try:
        binding = Binding.parse(binding_text) if binding_text is not None else None
    except UsageError as e:  # the schema lists exactly Binding's names
        raise meta_error(node, f"section {name}: {e.message}") from e
    driver, fwcfg = node.get("driver"), node.get("fwcfg-name")
    if fwcfg is not None and ".." in fwcfg:
        raise meta_error(node, f"section {name}: "
                          + _FWCFG.format(attr="fwcfg-name", v=repr(fwcfg)))
    if binding is Binding.FWCFG and fwcfg is None:
        raise meta_error(node, f"section {name}: binding fwcfg needs a fwcfg-name")
    if fwcfg is not None and binding is not Binding.FWCFG:
        raise meta_error(node, f"section {name}: fwcfg-name needs binding='fwcfg'")
    if driver is not None and binding is not Binding.BLOCK:
        raise meta_error(node, f"section {name}: driver needs binding='block'")
    return SectionDecl(
        name=name,
        size=_size(node, name),
        binding=binding,
        kind=node.get("kind"),
        device=node.get("device"),
        driver=driver,
        fwcfg_name=fwcfg,
    )


def _libvirt_nvram(node: etree._Element) -> LibvirtNvram:
    return LibvirtNvram(
        path=_path(node, "path"),
        template=_path(node, "template"),
        format=node.get("format"),
        firmware=node.get("firmware"),
        features=tuple((f.get("name", ""), f.get("enabled") == "yes")
                       for f in node.findall(FEATURE_TAG)),
        firmware_template=_path(node, "firmware-template"),
    )


def _decode(node: etree._Element) -> NvmgrMetadata:
    """A schema-valid element as data, with the rules the schema cannot say."""
    section_nodes = node.findall(SECTION_TAG)
    if len(section_nodes) > MAX_DECLARED_SECTIONS:
        raise meta_error(
            node, f"{len(section_nodes)} sections declared; at most {MAX_DECLARED_SECTIONS}"
        )
    sections = tuple(_section(s) for s in section_nodes)
    seen: set[str] = set()
    for s in sections:
        if s.name in seen:
            raise meta_error(node, f"section {s.name} is declared twice")
        seen.add(s.name)
    total = sum(s.size or 0 for s in sections)
    if total > MAX_METADATA_TOTAL:
        raise meta_error(
            node,
            f"declared sections total {total:,} bytes, more than the "
            f"{MAX_METADATA_TOTAL >> 30} GiB limit for one image",
        )
    per_device: list[str] = []
    for pd in node.findall(PER_DEVICE_TAG):
        kind = pd.get("kind", "")
        if kind not in profiles.per_device_profiles():
            raise meta_error(pd, f"per-device kind={kind!r}: sections per device exist for "
                             + ", ".join(sorted(profiles.per_device_profiles())))
        if kind in per_device:
            raise meta_error(pd, f"per-device kind={kind!r} is given twice")
        per_device.append(kind)
    lv = node.find(LIBVIRT_NVRAM_TAG)
    source = node.find(SOURCE_TAG)
    if source is not None and node.get("image") is not None:
        raise meta_error(node, "give the image attribute or a <nvmgr:source> element, not both")
    return NvmgrMetadata(
        image=_path(node, "image") if source is None else _source(source),
        image_element=source is not None,
        format=node.get("format"),
        uuid=_uuid(node, "uuid"),
        key_file=_path(node, "key-file"),
        key_secret=_uuid(node, "key-secret"),
        luks=node.get("luks") == "yes",
        sections=sections,
        libvirt_nvram=_libvirt_nvram(lv) if lv is not None else None,
        per_device=tuple(per_device),
        max_image_size=_max_image_size(node),
    )


def _nbd_source(node: etree._Element) -> str:
    """``<nvmgr:source protocol='nbd' name='EXPORT'><nvmgr:host .../>`` as an NBD URI."""
    host = node.find(clark("nvmgr:host"))
    if host is None:  # the schema requires it
        raise meta_error(node, "source protocol='nbd' needs a <nvmgr:host>")
    if host.get("transport") == "unix":
        socket = host.get("socket", "")
        if "/../" in socket + "/":
            raise meta_error(host, _ABSOLUTE.format(attr="socket", v=repr(socket)))
        loc = NbdLocation(node.get("name", ""), socket=socket)
    else:
        port = int(host.get("port", str(NBD_PORT)))
        if not 0 < port < 65536:
            raise meta_error(host, f"source host port={port!r} is not a port number (1-65535)")
        loc = NbdLocation(node.get("name", ""), host=host.get("name", ""), port=port)
    try:
        return NbdLocation.parse(loc.uri()).uri()
    except UsageError as e:
        raise meta_error(node, e.message) from e


def _source(node: etree._Element) -> str:
    """``<nvmgr:source protocol='rbd' name='POOL/IMAGE'>`` as an ``rbd:`` location;
    ``protocol='nbd'`` as an NBD URI."""
    if node.get("protocol") == "nbd":
        return _nbd_source(node)
    pool, _, image = node.get("name", "").partition("/")
    hosts = []
    for h in node.findall(clark("nvmgr:host")):
        port = h.get("port")
        if port is not None and not 0 < int(port) < 65536:
            raise meta_error(h, f"source host port={port!r} is not a port number (1-65535)")
        hosts.append((h.get("name", ""), int(port) if port is not None else None))
    snap = node.find(clark("nvmgr:snapshot"))
    config = node.find(clark("nvmgr:config"))
    auth = node.find(clark("nvmgr:auth"))
    secret = auth.find(clark("nvmgr:secret")) if auth is not None else None
    keyring = auth.find(clark("nvmgr:keyring")) if auth is not None else None
    for el, attr in ((config, "file"), (keyring, "file")):
        if el is not None and "/../" in el.get(attr, "") + "/":
            raise meta_error(el, _ABSOLUTE.format(attr=attr, v=repr(el.get(attr))))
    loc = RbdLocation(
        pool=pool, image=image,
        snapshot=snap.get("name") if snap is not None else None,
        conf=config.get("file") if config is not None else None,
        user=auth.get("username") if auth is not None else None,
        keyring=keyring.get("file") if keyring is not None else None,
        hosts=tuple(hosts),
        secret=str(UUID(secret.get("uuid", ""))) if secret is not None
        and secret.get("uuid") else None,
        secret_usage=secret.get("usage") if secret is not None else None)
    try:  # what the location string itself must satisfy (checked once, in one place)
        return RbdLocation.parse(loc.spec()).spec()
    except UsageError as e:
        raise meta_error(node, e.message) from e


def source_element(location: str, parent: etree._Element) -> etree._Element:
    """An ``rbd:`` location as a ``<nvmgr:source protocol='rbd'>`` element, an NBD URI
    as ``<nvmgr:source protocol='nbd'>``, the first child of *parent*."""
    if is_nbd(location):
        nbd = NbdLocation.parse(location)
        el = etree.SubElement(parent, SOURCE_TAG, protocol="nbd")
        if nbd.export:
            el.set("name", nbd.export)
        if nbd.socket is not None:
            etree.SubElement(el, clark("nvmgr:host"), transport="unix", socket=nbd.socket)
        else:
            etree.SubElement(el, clark("nvmgr:host"), name=nbd.host or "", port=str(nbd.port))
        return el
    loc = RbdLocation.parse(location)
    el = etree.SubElement(parent, SOURCE_TAG, protocol="rbd", name=f"{loc.pool}/{loc.image}")
    for host, port in loc.hosts:
        h = etree.SubElement(el, clark("nvmgr:host"), name=host)
        if port is not None:
            h.set("port", str(port))
    if loc.snapshot:
        etree.SubElement(el, clark("nvmgr:snapshot"), name=loc.snapshot)
    if loc.conf:
        etree.SubElement(el, clark("nvmgr:config"), file=loc.conf)
    if loc.user or loc.has_key_source:
        auth = etree.SubElement(el, clark("nvmgr:auth"))
        if loc.user:
            auth.set("username", loc.user)
        if loc.keyring:
            etree.SubElement(auth, clark("nvmgr:keyring"), file=loc.keyring)
        elif loc.secret:
            etree.SubElement(auth, clark("nvmgr:secret"), type="ceph", uuid=loc.secret)
        elif loc.secret_usage:
            etree.SubElement(auth, clark("nvmgr:secret"), type="ceph", usage=loc.secret_usage)
    return el


def section_from_element(node: etree._Element) -> SectionDecl:
    """Check one stand-alone ``<nvmgr:section>`` (a device for ``nvmgr attach``) and
    return it as data, by the same schema and rules as one inside ``<nvmgr:nvram>``.

    :raise InvalidInputError: see :func:`from_element`.
    """
    rng = _schema()
    try:
        valid = rng.validate(etree.ElementTree(node))
    except etree.LxmlError as e:
        raise meta_error(node, f"nvmgr metadata cannot be validated: {e}") from e
    if not valid:
        raise _schema_error(node, rng.error_log)
    return _section(node)


def _max_image_size(node: etree._Element) -> int | None:
    """``max-image-size``: at least 1 MiB (two header areas and a section),
    at most the 256 TiB an image may span."""
    text = node.get("max-image-size")
    if text is None:
        return None
    try:
        size = parse_size(text, what="max-image-size")
    except UsageError as e:
        raise meta_error(node, e.message) from e
    if not MIN_MAX_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise meta_error(node, f"max-image-size={text!r} ({size:,} bytes) is outside "
                               f"{MIN_MAX_IMAGE_SIZE >> 20} MiB .. 256 TiB")
    return size


# --------------------------------------------------------------------------
# Writing


def from_text(text: str) -> NvmgrMetadata:
    """An ``<nvmgr:nvram>`` element as libvirt's ``virDomainGetMetadata`` gives
    it (the element alone, and libvirt 9.0 gives it without its namespace:
    elements in no namespace are taken as nvmgr's), checked as
    :func:`from_element` checks it.

    :raise InvalidInputError: not well-formed, not an ``<nvmgr:nvram>``, or
        metadata the schema or a rule refuses.
    """
    node = parse_tree(text, what="nvmgr metadata")
    for el in node.iter(etree.Element):
        if not str(el.tag).startswith("{"):
            el.tag = f"{{{NVMGR_NS}}}{el.tag}"
    if node.tag != clark("nvmgr:nvram"):
        raise InvalidInputError(f"nvmgr metadata: the element is <{node.tag}>, not <nvmgr:nvram>")
    return from_element(node)


def to_text(meta: NvmgrMetadata) -> str:
    """*meta* as the text of a ``<nvmgr:nvram>`` element for libvirt's ``setMetadata``.

    libvirt puts its own ``xmlns:nvmgr`` on the root it is given and fails
    ("failed to create a new XML namespace") when the root declares that
    prefix already: the text binds the namespace to another prefix (``nv``).
    """
    return etree.tostring(to_element(meta, prefix="nv"), encoding="unicode")


def written_sections(node: etree._Element, meta: NvmgrMetadata) -> dict[SectionDecl, etree._Element]:
    """*node*'s ``<nvmgr:section>`` elements by what they say (*meta*, read from *node*)."""
    return dict(zip(meta.sections, node.findall(SECTION_TAG), strict=True))


def to_element(meta: NvmgrMetadata,
               keep: Mapping[SectionDecl, etree._Element] | None = None, *,
               prefix: str = "nvmgr") -> etree._Element:
    """*meta* as a new ``<nvmgr:nvram>`` element.

    :param keep: elements already written for some sections; a section that
        says the same is copied from there, so a user's ``size='1M'`` stays
        ``1M`` when nvmgr rewrites the metadata.
    """
    el = etree.Element(NVRAM_TAG, nsmap={prefix: NVMGR_NS})
    as_element = meta.image_element and meta.image is not None and (is_rbd(meta.image)
                                                                     or is_nbd(meta.image))
    if as_element:
        source_element(str(meta.image), el)
    for attr, value in (
        ("image", None if as_element else meta.image),
        ("format", meta.format),
        ("uuid", str(meta.uuid) if meta.uuid else None),
        ("key-file", meta.key_file),
        ("key-secret", str(meta.key_secret) if meta.key_secret else None),
        ("luks", "yes" if meta.luks else None),
        ("max-image-size", str(meta.max_image_size) if meta.max_image_size else None),
    ):
        if value is not None:
            el.set(attr, value)
    for s in meta.sections:
        same = keep.get(s) if keep else None
        if same is not None:
            kept = copy.deepcopy(same)
            kept.tail = None
            el.append(kept)
            continue
        se = etree.SubElement(el, SECTION_TAG)
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
    for kind in meta.per_device:
        etree.SubElement(el, PER_DEVICE_TAG, kind=kind)
    rec = meta.libvirt_nvram
    if rec is not None:
        lv = etree.SubElement(el, LIBVIRT_NVRAM_TAG)
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
            etree.SubElement(lv, FEATURE_TAG, name=name, enabled="yes" if enabled else "no")
    return el
