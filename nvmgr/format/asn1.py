"""pyasn1 types for the nvmgr directory.

Mirrors ``schemas/nvmgr.asn1`` (module NVMGR-Directory-2026) name for name;
that file is the specification.  This module only declares types: encoding,
strict decoding and the conversion to the plain model live in
:mod:`nvmgr.format.codec`.  Together with :mod:`nvmgr.format.codec` it is the only place
that imports pyasn1.
"""

from __future__ import annotations

from pyasn1.type import char, constraint, namedtype, namedval, tag, univ

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
    )
