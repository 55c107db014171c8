"""Directory codec: :class:`nvmgr.format.model.Directory` <-> one DER header copy.

Decoding is strict in three layers, each with its own message:

1. :func:`nvmgr.format.der.walk`: X.690 DER rules, depth and size bounds, trailing
   bytes (only zero padding may follow in a header area);
2. pyasn1 decoding against :mod:`nvmgr.format.asn1` (field order, types, size and
   range constraints), then re-encoding: the bytes must come back identical,
   which rejects every non-canonical form pyasn1 would otherwise accept;
3. :func:`validate`: the layout's own rules (names unique and valid, sections
   aligned, inside the image, not overlapping).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING, Any

from nvmgr.errors import DERError, ForeignImageError, NoSpaceError
from nvmgr.format import der, reader, writer
from nvmgr.format.model import (
    ALIGN,
    HEADER_AREA_SIZES,
    MAX_SECTIONS,
    Binding,
    Directory,
    KeySlot,
    Member,
    Section,
    SectionCrypto,
    check_name,
)

if TYPE_CHECKING:
    from nvmgr.format import asn1

_FLAG_BITS = ("encrypted", "live", "dirty")
# Tag and first length byte a header copy starts with: SEQUENCE, long form.
_SEQUENCE = 0x30
_OCTET_STRING = 0x04
_FORMAT_TLV = bytes([reader.OID, len(reader._FORMAT)]) + reader._FORMAT


def _flags(s: Section) -> asn1.SectionFlags:
    from nvmgr.format import asn1

    bits = [s.encrypted, s.live, s.dirty]
    while bits and not bits[-1]:  # DER: named bit lists drop trailing zeros
        bits.pop()
    return asn1.SectionFlags([int(b) for b in bits])


def _section_to_asn1(s: Section, tmpl: Any) -> Any:
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


def directory_to_asn1(d: Directory) -> asn1.Directory:
    from nvmgr.format import asn1

    a = asn1.Directory()
    a["format"] = asn1.id_nvmgr_directory
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
            mem.append(ma)
    return a


def encode_directory(d: Directory) -> bytes:
    """The DER of the Directory alone (what the digest covers)."""
    return writer.encode_directory(d)


def encode_directory_pyasn1(d: Directory) -> bytes:
    """The same bytes through pyasn1: the reference :func:`encode_directory` is held to."""
    from pyasn1.codec.der import encoder as der_encoder

    return bytes(der_encoder.encode(directory_to_asn1(d)))


_tlv = writer.tlv


def encode_header(d: Directory) -> bytes:
    """One complete HeaderCopy: the directory and its SHA-256 digest.

    :raise NoSpaceError: the directory does not fit the header area.
    """
    validate(d)
    body = encode_directory(d)
    out = _tlv(_SEQUENCE, body + _tlv(_OCTET_STRING, hashlib.sha256(body).digest()))
    if len(out) > d.header_area:
        raise NoSpaceError(
            f"the directory needs {len(out)} bytes but the header area holds {d.header_area}"
        )
    return out


def _opt(value: Any) -> Any:
    return value if value.isValue else None


def _section_from_asn1(a: Any) -> Section:
    name = str(a["name"])
    bits = list(a["flags"])
    if len(bits) > len(_FLAG_BITS):
        raise DERError(f"section flags carry {len(bits)} bits, version 1 defines 3")
    if bits and not bits[-1]:  # X.690 11.2.2: a named bit list drops trailing zeros
        raise DERError(f"section {name}: flags BIT STRING has trailing zero bits (not DER)")
    bits += [0] * (len(_FLAG_BITS) - len(bits))
    binding = Binding(int(a["binding"]))
    if bool(bits[1]) != binding.live:
        raise DERError(f"section {name}: the live flag disagrees with binding {binding.name}")
    crypto = None
    c = _opt(a["crypto"])
    if c is not None:
        crypto = SectionCrypto(iv=bytes(c["iv"]), mac=bytes(c["mac"]))
    if crypto is not None and not bits[0]:
        raise DERError(f"section {name}: crypto parameters on a section not flagged encrypted")
    if bits[0] and crypto is None and (int(a["length"]) or int(a["crc32"])):
        raise DERError(f"section {name}: encrypted data without crypto parameters")
    if a["extensions"].isValue:
        raise DERError(f"section {name}: extensions are not defined in version 1")
    return Section(
        name=name,
        binding=binding,
        capacity=int(a["capacity"]),
        reserved=int(a["reserved"]),
        offset=int(a["offset"]),
        length=int(a["length"]),
        crc32=int(a["crc32"]),
        encrypted=bool(bits[0]),
        dirty=bool(bits[2]),
        spare=int(a["spare"]) if a["spare"].isValue else None,
        home=int(a["home"]) if a["home"].isValue else None,
        device=str(a["device"]) if a["device"].isValue else None,
        crypto=crypto,
        member=int(a["member"]) if a["member"].isValue else None,
    )


def directory_from_asn1(a: Any) -> Directory:
    from nvmgr.format import asn1

    if a["format"] != asn1.id_nvmgr_directory:
        raise ForeignImageError(f"format identifier {a['format']} is not nvmgr's")
    if int(a["version"]) != 1:
        raise DERError(f"directory version {int(a['version'])} is not supported (this is 1)")
    if a["extensions"].isValue:
        raise DERError("directory extensions are not defined in version 1")
    key_slots = None
    if a["encryption"].isValue:
        key_slots = [
            KeySlot(
                key_id=bytes(k["keyId"]),
                wrapped_key=bytes(k["wrappedKey"]),
                label=str(k["label"]) if k["label"].isValue else None,
            )
            for k in a["encryption"]["keySlots"]
        ]
    members = None
    if a["members"].isValue:
        members = [
            Member(index=int(m["index"]), path=str(m["path"]), image_uuid=uuid.UUID(bytes=bytes(m["imageUUID"])))
            for m in a["members"]
        ]
    return Directory(
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
    )


def looks_like_header(buf: bytes) -> bool:
    """Cheap probe: does *buf* start like an nvmgr header copy?"""
    return len(buf) > 16 and buf[0] == _SEQUENCE and _FORMAT_TLV in buf[:64]


def header_length(buf: bytes) -> int:
    """Total bytes of the DER value at the start of *buf* (tag + length + content)."""
    # Probe first: a foreign file that merely starts with 0x30 (BER, another
    # DER format) is foreign, not a damaged nvmgr header.
    if not looks_like_header(buf):
        raise ForeignImageError("no nvmgr directory here")
    length, start = der.read_length(buf, 1, len(buf))
    return start + length


def peek(buf: bytes) -> tuple[int, int]:
    """(generation, headerAreaSize) a header copy claims, from its first fields only.

    Nothing is verified: this orders the copies so that only the newest
    needs a full (expensive) decode, and says where copy B should be.

    :raise ForeignImageError: the bytes do not start like an nvmgr header.
    :raise DERError: the first fields are malformed.
    """
    if not looks_like_header(buf):
        raise ForeignImageError("no nvmgr directory here")
    end = len(buf)
    _, pos = der.read_length(buf, 1, end)  # HeaderCopy SEQUENCE
    if pos >= end or buf[pos] != _SEQUENCE:
        raise DERError("header does not start with the directory")
    _, pos = der.read_length(buf, pos + 1, end)  # Directory SEQUENCE
    for _field in ("format", "version", "imageUUID"):
        length, pos = der.read_length(buf, pos + 1, end)
        pos += length
    values = []
    for field in ("generation", "headerAreaSize"):
        if pos >= end or buf[pos] != 0x02:
            raise DERError(f"the directory's {field} is not an INTEGER")
        length, pos = der.read_length(buf, pos + 1, end)
        if pos + length > end or not 0 < length <= 9:
            raise DERError(f"the directory's {field} is malformed")
        values.append(int.from_bytes(buf[pos : pos + length], "big", signed=True))
        pos += length
    return values[0], values[1]


def decode_header(buf: bytes, *, padded: bool = True) -> Directory:
    """Decode one header copy strictly.

    :func:`nvmgr.format.der.walk` checks X.690 DER rules, :func:`nvmgr.format.reader.read_header`
    the schema (field by field, sizes, ranges), then the digest and
    :func:`validate` the layout.  :func:`decode_header_pyasn1` is the
    reference implementation the tests hold this one to.

    :param buf: the header area (or the bare DER when *padded* is false).
    :raise ForeignImageError: the bytes are not an nvmgr header at all.
    :raise DERError: an nvmgr header that is malformed, non-canonical,
        fails its digest or breaks a layout rule.
    """
    if not looks_like_header(buf):
        raise ForeignImageError("no nvmgr directory here")
    total = der.walk(buf, allow_zero_padding=padded)
    d, directory_der, digest = reader.read_header(bytes(buf[:total]))
    if hashlib.sha256(directory_der).digest() != digest:
        raise DERError("header digest does not match its directory")
    validate(d)
    return d


def decode_header_pyasn1(buf: bytes, *, padded: bool = True) -> Directory:
    """Decode one header copy strictly with pyasn1: the reference decoder.

    Slower than :func:`decode_header` (a pyasn1 decode and a re-encode to
    prove canonical form); the tests require both to agree on every input.

    :param buf: the header area (or the bare DER when *padded* is false).
    :raise ForeignImageError: the bytes are not an nvmgr header at all.
    :raise DERError: an nvmgr header that is malformed, non-canonical,
        fails its digest or breaks a layout rule.
    """
    from pyasn1.codec.der import decoder as der_decoder
    from pyasn1.codec.der import encoder as der_encoder
    from pyasn1.error import PyAsn1Error

    from nvmgr.format import asn1

    if not looks_like_header(buf):
        raise ForeignImageError("no nvmgr directory here")
    total = der.walk(buf, allow_zero_padding=padded)
    body = bytes(buf[:total])
    try:
        value, rest = der_decoder.decode(body, asn1Spec=asn1.HeaderCopy())
    except PyAsn1Error as e:
        # pyasn1's UnicodeDecodeError wrapper has an empty str(): say what it is.
        why = "a UTF8String is not valid UTF-8" if isinstance(e, UnicodeDecodeError) else e
        raise DERError(f"directory does not match the nvmgr schema: {why}") from None
    if rest:
        raise DERError(f"{len(rest)} bytes of trailing data inside the header")
    try:
        again = bytes(der_encoder.encode(value))
    except PyAsn1Error as e:
        raise DERError(f"directory does not match the nvmgr schema: {e}") from None
    if again != body:
        raise DERError("directory is not in canonical DER form")
    # Canonical, so the directory's DER is the bytes between the outer header
    # and the trailing digest (OCTET STRING of 32: 34 bytes).
    _, start = der.read_length(body, 1, len(body))
    directory_der = body[start : len(body) - 34]
    if hashlib.sha256(directory_der).digest() != bytes(value["digest"]):
        raise DERError("header digest does not match its directory")
    d = directory_from_asn1(value["directory"])
    validate(d)
    return d


def validate(d: Directory) -> None:
    """Check the layout rules a decoded or about-to-be-written directory obeys."""
    if d.header_area not in HEADER_AREA_SIZES:
        raise DERError(f"header area size {d.header_area} is not a power of two in 64 KiB..16 MiB")
    if len(d.sections) > MAX_SECTIONS:
        raise DERError(f"{len(d.sections)} sections exceed the limit of {MAX_SECTIONS}")
    names: set[str] = set()
    for s in d.sections:
        try:
            check_name(s.name)
        except Exception:
            raise DERError(f"invalid section name {s.name[:80]!r} in the directory") from None
        if s.name in names:
            raise DERError(f"section {s.name} appears twice")
        names.add(s.name)
        if s.length > s.capacity:
            raise DERError(f"section {s.name}: length {s.length} exceeds capacity {s.capacity}")
        if s.stored_length > s.reserved or s.reserved % ALIGN:
            raise DERError(f"section {s.name}: reserved size {s.reserved} is wrong")
        if s.encrypted and s.live:
            raise DERError(f"section {s.name}: live sections cannot be encrypted")
        if s.encrypted and d.key_slots is None:
            raise DERError(f"section {s.name} is encrypted but the image has no keys")
        if s.live and s.spare is not None:
            raise DERError(f"section {s.name}: live sections have no spare slot")
        if s.home is not None and (
            not s.live or s.offset != d.scratch_offset or s.reserved > d.scratch_length
        ):
            raise DERError(f"section {s.name}: staged in scratch but does not fit there")
        if s.member is not None and (
            d.members is None or s.member not in {m.index for m in d.members}
        ):
            raise DERError(f"section {s.name}: member {s.member} is not listed")
    spans = sorted(d.extents())
    for off, n, what in spans:
        if what.startswith("header"):
            continue
        if off % ALIGN:
            raise DERError(f"{what}: offset {off} is not 4 KiB aligned")
        if off < d.data_start or off + n > d.image_size:
            raise DERError(f"{what}: [{off}, {off + n}) lies outside the image data area")
    for (o1, n1, w1), (o2, _n2, w2) in zip(spans, spans[1:], strict=False):
        if o1 + n1 > o2:
            raise DERError(f"{w1} overlaps {w2}")


def _value_notation(v: Any, indent: int) -> str:
    from pyasn1.type import char, univ

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


def value_notation(d: Directory) -> str:
    """The directory in ASN.1 value notation (X.680), for people to read."""
    return "directory Directory ::= " + _value_notation(directory_to_asn1(d), 0)
