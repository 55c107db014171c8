"""pyasn1 types for the nvmgr directory, and the pyasn1 reference codec.

The types mirror ``schemas/nvmgr.asn1`` (module NVMGR-Directory-2026) name
for name; that file is the specification.

This is the only module that imports pyasn1, and no product path imports it:
nvmgr reads and writes directories with its own :mod:`nvmgr.format.reader`
and :mod:`nvmgr.format.writer`.  The functions at the end are their
reference, used only by

- the tests, which hold the writer to :func:`encode_directory`'s bytes and
  the reader to :func:`decode_header`'s verdicts and models;
  :func:`decode_header` is the product's frame
  (:func:`nvmgr.format.codec.decode_header`: the strict DER walk, the digest,
  the model's rules) around pyasn1 as the schema layer (:func:`read_header`:
  decode against :class:`HeaderCopy`, re-encode, compare byte for byte);
- ``nvmgr dump --asn1`` (:func:`value_notation`), which imports this module
  when asked.

The version-1 rules that are not ASN.1 (flags, version, extensions, format
identifier) are applied through the same functions as the reader's
(:mod:`nvmgr.format.reader`), so each is written once.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, constraint, namedtype, namedval, tag, univ

from nvmgr.errors import DERError
from nvmgr.format import codec, der, model, reader

MAX = float("inf")

id_nvmgr_directory = univ.ObjectIdentifier("2.25.282081522808666108998162609141495310460.1")


def _ctx(n: int, constructed: bool = False) -> tag.Tag:
    fmt = tag.tagFormatConstructed if constructed else tag.tagFormatSimple
    return tag.Tag(tag.tagClassContext, fmt, n)


class UnsignedInteger(univ.Integer):
    subtypeSpec = constraint.ValueRangeConstraint(0, MAX)


class Version(univ.Integer):
    namedValues = namedval.NamedValues(("v1", 1))


class Extent(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("offset", UnsignedInteger()),
        namedtype.NamedType("length", UnsignedInteger()),
    )


class Extension(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("extnID", univ.ObjectIdentifier()),
        namedtype.DefaultedNamedType("critical", univ.Boolean(False)),
        namedtype.NamedType("extnValue", univ.OctetString()),
    )


class Extensions(univ.SequenceOf):
    componentType = Extension()
    subtypeSpec = constraint.ValueSizeConstraint(1, 16)


class SectionName(char.UTF8String):
    subtypeSpec = constraint.ValueSizeConstraint(1, 64)


class Binding(univ.Enumerated):
    namedValues = namedval.NamedValues(
        ("opaque", 0), ("pflash", 1), ("tpm", 2), ("block", 3), ("fwcfg", 4)
    )
    subtypeSpec = constraint.SingleValueConstraint(0, 1, 2, 3, 4)


class SectionFlags(univ.BitString):
    namedValues = namedval.NamedValues(("encrypted", 0), ("live", 1), ("dirty", 2))


class CipherScheme(univ.Enumerated):
    namedValues = namedval.NamedValues(("aes256CbcHmacSha256", 1))
    subtypeSpec = constraint.SingleValueConstraint(1)


class KeyWrap(univ.Enumerated):
    namedValues = namedval.NamedValues(("aes256KeyWrap", 1))
    subtypeSpec = constraint.SingleValueConstraint(1)


class SectionCrypto(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("scheme", CipherScheme()),
        namedtype.NamedType(
            "iv", univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(16, 16))
        ),
        namedtype.NamedType(
            "mac", univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(32, 32))
        ),
    )


class Section(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("name", SectionName()),
        namedtype.NamedType("binding", Binding()),
        namedtype.NamedType("flags", SectionFlags()),
        namedtype.NamedType("capacity", UnsignedInteger()),
        namedtype.NamedType("reserved", UnsignedInteger()),
        namedtype.NamedType("length", UnsignedInteger()),
        namedtype.NamedType(
            "crc32",
            univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(0, 0xFFFFFFFF)),
        ),
        namedtype.NamedType("offset", UnsignedInteger()),
        namedtype.OptionalNamedType("spare", UnsignedInteger().subtype(implicitTag=_ctx(0))),
        namedtype.OptionalNamedType("home", UnsignedInteger().subtype(implicitTag=_ctx(1))),
        namedtype.OptionalNamedType(
            "device",
            char.UTF8String().subtype(
                implicitTag=_ctx(2), subtypeSpec=constraint.ValueSizeConstraint(1, 128)
            ),
        ),
        namedtype.OptionalNamedType(
            "crypto", SectionCrypto().subtype(implicitTag=_ctx(3, constructed=True))
        ),
        namedtype.OptionalNamedType(
            "member",
            univ.Integer().subtype(
                implicitTag=_ctx(4), subtypeSpec=constraint.ValueRangeConstraint(1, 64)
            ),
        ),
        namedtype.OptionalNamedType(
            "extensions", Extensions().subtype(implicitTag=_ctx(15, constructed=True))
        ),
    )


class KeySlot(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType(
            "keyId", univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(8, 8))
        ),
        namedtype.NamedType("wrap", KeyWrap()),
        namedtype.NamedType(
            "wrappedKey",
            univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(40, 40)),
        ),
        namedtype.OptionalNamedType(
            "label",
            char.UTF8String().subtype(
                implicitTag=_ctx(0), subtypeSpec=constraint.ValueSizeConstraint(1, 128)
            ),
        ),
    )


class EncryptionInfo(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("scheme", CipherScheme()),
        namedtype.NamedType(
            "keySlots",
            univ.SequenceOf(componentType=KeySlot()).subtype(
                subtypeSpec=constraint.ValueSizeConstraint(1, 8)
            ),
        ),
    )


class Runner(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType(
            "run", univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(16, 16))
        ),
        namedtype.NamedType(
            "host", char.UTF8String().subtype(subtypeSpec=constraint.ValueSizeConstraint(1, 255))
        ),
    )


class Orphaned(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType(
            "since",
            univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(0, 2**63 - 1)),
        ),
        namedtype.OptionalNamedType(
            "domainName",
            char.UTF8String().subtype(subtypeSpec=constraint.ValueSizeConstraint(1, 255)),
        ),
    )


class ContainerFormat(univ.Enumerated):
    namedValues = namedval.NamedValues(("raw", 0), ("qcow2", 1))
    subtypeSpec = constraint.SingleValueConstraint(0, 1)


class Member(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType(
            "index", univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(1, 64))
        ),
        namedtype.NamedType(
            "path",
            char.UTF8String().subtype(subtypeSpec=constraint.ValueSizeConstraint(1, 4096)),
        ),
        namedtype.NamedType(
            "imageUUID",
            univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(16, 16)),
        ),
        namedtype.OptionalNamedType(
            "format", ContainerFormat().subtype(implicitTag=_ctx(0))
        ),
        namedtype.OptionalNamedType(
            "generation",
            univ.Integer().subtype(
                subtypeSpec=constraint.ValueRangeConstraint(0, 9223372036854775807)
            ).subtype(implicitTag=_ctx(1)),
        ),
    )


class Directory(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("format", univ.ObjectIdentifier()),
        namedtype.NamedType("version", Version()),
        namedtype.NamedType(
            "imageUUID",
            univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(16, 16)),
        ),
        namedtype.NamedType(
            "generation",
            univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(0, 2**63 - 1)),
        ),
        namedtype.NamedType(
            "headerAreaSize",
            univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(65536, 16777216)),
        ),
        namedtype.NamedType("imageSize", UnsignedInteger()),
        namedtype.NamedType("scratch", Extent()),
        namedtype.NamedType(
            "sections",
            univ.SequenceOf(componentType=Section()).subtype(
                subtypeSpec=constraint.ValueSizeConstraint(0, 4096)
            ),
        ),
        namedtype.OptionalNamedType(
            "domainUUID",
            univ.OctetString().subtype(
                implicitTag=_ctx(0), subtypeSpec=constraint.ValueSizeConstraint(16, 16)
            ),
        ),
        namedtype.OptionalNamedType(
            "encryption", EncryptionInfo().subtype(implicitTag=_ctx(1, constructed=True))
        ),
        namedtype.OptionalNamedType(
            "members",
            univ.SequenceOf(componentType=Member()).subtype(
                implicitTag=_ctx(2, constructed=True),
                subtypeSpec=constraint.ValueSizeConstraint(1, 64),
            ),
        ),
        namedtype.OptionalNamedType(
            "runner", Runner().subtype(implicitTag=_ctx(3, constructed=True))
        ),
        namedtype.OptionalNamedType(
            "incoming", Runner().subtype(implicitTag=_ctx(4, constructed=True))
        ),
        namedtype.OptionalNamedType(
            "orphaned", Orphaned().subtype(implicitTag=_ctx(5, constructed=True))
        ),
        namedtype.OptionalNamedType(
            "parent",
            univ.OctetString().subtype(
                implicitTag=_ctx(6), subtypeSpec=constraint.ValueSizeConstraint(16, 16)
            ),
        ),
        namedtype.OptionalNamedType(
            "extensions", Extensions().subtype(implicitTag=_ctx(15, constructed=True))
        ),
    )


class HeaderCopy(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("directory", Directory()),
        namedtype.NamedType(
            "digest",
            univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(32, 32)),
        ),
        namedtype.OptionalNamedType(
            "mac",
            univ.OctetString().subtype(implicitTag=_ctx(0),
                                       subtypeSpec=constraint.ValueSizeConstraint(32, 32)),
        ),
    )


# --------------------------------------------------------------- the reference codec

_FLAG_BITS = ("encrypted", "live", "dirty")


def _flags(s: model.Section) -> SectionFlags:
    bits = [s.encrypted, s.live, s.dirty]
    while bits and not bits[-1]:  # DER: named bit lists drop trailing zeros
        bits.pop()
    return SectionFlags([int(b) for b in bits])


def _section_to_asn1(s: model.Section, tmpl: Any) -> Any:
    a = tmpl.clone()
    a["name"] = s.name
    a["binding"] = int(s.binding)
    a["flags"] = _flags(s)
    a["capacity"] = s.capacity
    a["reserved"] = s.reserved
    a["length"] = s.length
    a["crc32"] = s.crc32
    a["offset"] = s.offset
    if s.spare is not None:
        a["spare"] = s.spare
    if s.home is not None:
        a["home"] = s.home
    if s.device is not None:
        a["device"] = s.device
    if s.crypto is not None:
        c = a["crypto"]
        c["scheme"] = 1
        c["iv"] = s.crypto.iv
        c["mac"] = s.crypto.mac
    if s.member is not None:
        a["member"] = s.member
    return a


def directory_to_asn1(d: model.Directory) -> Directory:
    """*d* as a pyasn1 value of :class:`Directory`."""
    a = Directory()
    a["format"] = id_nvmgr_directory
    a["version"] = d.version
    a["imageUUID"] = d.image_uuid.bytes
    a["generation"] = d.generation
    a["headerAreaSize"] = d.header_area
    a["imageSize"] = d.image_size
    a["scratch"]["offset"] = d.scratch_offset
    a["scratch"]["length"] = d.scratch_length
    secs = a["sections"]
    secs.clear()  # an empty SEQUENCE OF is a value too (pyasn1 refuses to encode it otherwise)
    tmpl = secs.componentType
    for s in d.sections:
        secs.append(_section_to_asn1(s, tmpl))
    if d.domain_uuid is not None:
        a["domainUUID"] = d.domain_uuid.bytes
    if d.key_slots is not None:
        enc = a["encryption"]
        enc["scheme"] = 1
        slots = enc["keySlots"]
        for k in d.key_slots:
            ks = slots.componentType.clone()
            ks["keyId"] = k.key_id
            ks["wrap"] = 1
            ks["wrappedKey"] = k.wrapped_key
            if k.label is not None:
                ks["label"] = k.label
            slots.append(ks)
    if d.members is not None:
        mem = a["members"]
        for m in d.members:
            ma = mem.componentType.clone()
            ma["index"] = m.index
            ma["path"] = m.path
            ma["imageUUID"] = m.image_uuid.bytes
            if m.fmt is not None:
                ma["format"] = model.MEMBER_FORMATS.index(m.fmt)
            if m.generation is not None:
                ma["generation"] = m.generation
            mem.append(ma)
    for field, who in (("runner", d.runner), ("incoming", d.incoming)):
        if who is not None:
            a[field]["run"] = who.run
            a[field]["host"] = who.host
    if d.orphaned is not None:
        a["orphaned"]["since"] = d.orphaned.since
        if d.orphaned.domain_name is not None:
            a["orphaned"]["domainName"] = d.orphaned.domain_name
    if d.parent is not None:
        a["parent"] = d.parent.bytes
    return a


def encode_directory(d: model.Directory) -> bytes:
    """The DER of *d* through pyasn1: the reference the writer is held to."""
    return bytes(der_encoder.encode(directory_to_asn1(d)))


def _section_from_asn1(a: Any) -> model.Section:
    name = str(a["name"])
    binding = model.Binding(int(a["binding"]))
    encrypted, dirty = reader.section_flags([bool(b) for b in a["flags"]], name, binding)
    crypto = None
    if a["crypto"].isValue:
        crypto = model.SectionCrypto(iv=bytes(a["crypto"]["iv"]), mac=bytes(a["crypto"]["mac"]))
    reader.no_extensions(a["extensions"].isValue, f"section {name}")
    return model.Section(
        name=name,
        binding=binding,
        capacity=int(a["capacity"]),
        reserved=int(a["reserved"]),
        offset=int(a["offset"]),
        length=int(a["length"]),
        crc32=int(a["crc32"]),
        encrypted=encrypted,
        dirty=dirty,
        spare=int(a["spare"]) if a["spare"].isValue else None,
        home=int(a["home"]) if a["home"].isValue else None,
        device=str(a["device"]) if a["device"].isValue else None,
        crypto=crypto,
        member=int(a["member"]) if a["member"].isValue else None,
    )


def directory_from_asn1(a: Any) -> model.Directory:
    """The model of a decoded :class:`Directory` value, by the version-1 rules.

    :raise ForeignImageError: the format identifier is not nvmgr's.
    :raise DERError: a version-1 rule is broken.
    """
    reader.check_format(reader.oid_content(str(a["format"])))
    reader.check_version(int(a["version"]))
    reader.no_extensions(a["extensions"].isValue, "directory")
    key_slots = None
    if a["encryption"].isValue:
        key_slots = [
            model.KeySlot(
                key_id=bytes(k["keyId"]),
                wrapped_key=bytes(k["wrappedKey"]),
                label=str(k["label"]) if k["label"].isValue else None,
            )
            for k in a["encryption"]["keySlots"]
        ]
    members = None
    if a["members"].isValue:
        members = [
            model.Member(index=int(m["index"]), path=str(m["path"]),
                         image_uuid=uuid.UUID(bytes=bytes(m["imageUUID"])),
                         fmt=model.MEMBER_FORMATS[int(m["format"])] if m["format"].isValue
                         else None,
                         generation=int(m["generation"]) if m["generation"].isValue else None)
            for m in a["members"]
        ]
    return model.Directory(
        version=1,
        image_uuid=uuid.UUID(bytes=bytes(a["imageUUID"])),
        generation=int(a["generation"]),
        header_area=int(a["headerAreaSize"]),
        image_size=int(a["imageSize"]),
        scratch_offset=int(a["scratch"]["offset"]),
        scratch_length=int(a["scratch"]["length"]),
        sections=[_section_from_asn1(s) for s in a["sections"]],
        domain_uuid=uuid.UUID(bytes=bytes(a["domainUUID"])) if a["domainUUID"].isValue else None,
        key_slots=key_slots,
        members=members,
        runner=_runner_from_asn1(a["runner"]),
        incoming=_runner_from_asn1(a["incoming"]),
        orphaned=_orphaned_from_asn1(a["orphaned"]),
        parent=uuid.UUID(bytes=bytes(a["parent"])) if a["parent"].isValue else None,
    )


def _orphaned_from_asn1(a: Any) -> model.Orphaned | None:
    if not a.isValue:
        return None
    name = str(a["domainName"]) if a["domainName"].isValue else None
    return model.Orphaned(int(a["since"]), name)


def _runner_from_asn1(a: Any) -> model.Runner | None:
    return model.Runner(bytes(a["run"]), str(a["host"])) if a.isValue else None


def read_header(body: bytes) -> tuple[model.Directory, bytes, bytes]:
    """The schema layer through pyasn1: the reference for
    :func:`nvmgr.format.reader.read_header`, with the same contract.

    pyasn1 decodes against :class:`HeaderCopy` (types, tags, sizes, ranges)
    but accepts some non-canonical forms, so the value is re-encoded and must
    give back *body* byte for byte.  Trailing bytes and the other X.690 rules
    are :func:`nvmgr.format.der.walk`'s, which ran before.

    :return: (directory, the directory's own DER bytes, the stored digest)
    :raise ForeignImageError: the format identifier is not nvmgr's.
    :raise DERError: any departure from the schema or canonical form.
    """
    try:
        value, _ = der_decoder.decode(body, asn1Spec=HeaderCopy())
    except PyAsn1Error as e:
        # pyasn1's UnicodeDecodeError wrapper has an empty str(): say what it is.
        why = "a UTF8String is not valid UTF-8" if isinstance(e, UnicodeDecodeError) else e
        raise DERError(f"directory does not match the nvmgr schema: {why}") from e
    try:
        again = bytes(der_encoder.encode(value))
    except PyAsn1Error as e:
        raise DERError(f"directory does not match the nvmgr schema: {e}") from e
    if again != body:
        raise DERError("directory is not in canonical DER form")
    # Canonical, so the directory's DER is the bytes between the outer header
    # and the trailing digest (OCTET STRING of 32: 34 bytes) and MAC ([0] of 32).
    _, start = der.read_length(body, 1, len(body))
    mac = bytes(value["mac"]) if value["mac"].isValue else None
    directory_der = body[start : len(body) - 34 - (34 if mac is not None else 0)]
    d = directory_from_asn1(value["directory"])
    d.mac = mac
    return d, directory_der, bytes(value["digest"])


def decode_header(buf: bytes, *, padded: bool = True) -> model.Directory:
    """Decode one header copy with pyasn1 as the schema layer: the reference decoder.

    Slower than :func:`nvmgr.format.codec.decode_header` (a pyasn1 decode and
    a re-encode); the tests require both to agree on every input.
    """
    return codec.decode_header(buf, padded=padded, schema=read_header)


def _value_notation(v: Any, indent: int) -> str:
    pad = "  " * (indent + 1)
    if isinstance(v, univ.SequenceOf):
        if not len(v):
            return "{ }"
        items = [_value_notation(x, indent + 1) for x in v]
        return "{\n" + ",\n".join(pad + i for i in items) + "\n" + "  " * indent + "}"
    if isinstance(v, univ.Sequence):
        items = []
        for i in range(len(v.componentType)):
            name = v.componentType.getNameByPosition(i)
            comp = v.getComponentByPosition(i)
            if comp is None or not comp.isValue:
                continue
            items.append(f"{pad}{name} {_value_notation(comp, indent + 1)}")
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(v, univ.BitString):
        names = [n for n, bit in zip(_FLAG_BITS, v, strict=False) if bit]
        return "{ " + ", ".join(names) + " }" if names else "{ }"
    if isinstance(v, univ.Enumerated):
        name = v.namedValues.getName(int(v)) if v.namedValues else None
        return str(name) if name else str(int(v))
    if isinstance(v, univ.Boolean):
        return "TRUE" if v else "FALSE"
    if isinstance(v, univ.Integer):
        return str(int(v))
    if isinstance(v, univ.ObjectIdentifier):
        return "{ " + " ".join(str(x) for x in v.asTuple()) + " }"
    if isinstance(v, univ.OctetString) and not isinstance(v, char.AbstractCharacterString):
        return "'" + bytes(v).hex().upper() + "'H"
    return json.dumps(str(v))


def value_notation(d: model.Directory) -> str:
    """The directory in ASN.1 value notation (X.680), for people to read."""
    return "directory Directory ::= " + _value_notation(directory_to_asn1(d), 0)
