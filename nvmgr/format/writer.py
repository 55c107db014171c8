"""DER for the directory, written straight from the model.

The counterpart of :mod:`nvmgr.format.reader` and the product's only DER
encoder.  pyasn1 (:func:`nvmgr.format.asn1.encode_directory`) is the
reference encoder; the tests require both to produce the same bytes for every
directory.  This one exists because encoding 1,024 sections with pyasn1 took
about 0.1 s per commit and importing pyasn1 a fifth of the command line's
start-up.
"""

from __future__ import annotations

from nvmgr.format.model import MEMBER_FORMATS, Directory, Section
from nvmgr.format.reader import (
    BIT_STRING,
    ENUMERATED,
    FORMAT,
    INTEGER,
    OCTET_STRING,
    OID,
    SEQUENCE,
    UTF8,
    ctx,
)


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, minimal definite length, content."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def integer(value: int, tag: int = INTEGER) -> bytes:
    """A minimal two's-complement INTEGER (or ENUMERATED, or an implicit tag)."""
    length = value.bit_length() // 8 + 1  # room for the sign bit
    return tlv(tag, value.to_bytes(length, "big", signed=True))


def _utf8(text: str, tag: int = UTF8) -> bytes:
    return tlv(tag, text.encode("utf-8"))


def _flags(s: Section) -> bytes:
    bits = [s.encrypted, s.live, s.dirty]
    while bits and not bits[-1]:  # named bit lists drop trailing zero bits
        bits.pop()
    if not bits:
        return tlv(BIT_STRING, b"\x00")
    byte = sum(1 << (7 - i) for i, b in enumerate(bits) if b)
    return tlv(BIT_STRING, bytes((8 - len(bits), byte)))


def _section(s: Section) -> bytes:
    parts = [
        _utf8(s.name),
        integer(int(s.binding), ENUMERATED),
        _flags(s),
        integer(s.capacity),
        integer(s.reserved),
        integer(s.length),
        integer(s.crc32),
        integer(s.offset),
    ]
    if s.spare is not None:
        parts.append(integer(s.spare, ctx(0)))
    if s.home is not None:
        parts.append(integer(s.home, ctx(1)))
    if s.device is not None:
        parts.append(_utf8(s.device, ctx(2)))
    if s.crypto is not None:
        parts.append(tlv(ctx(3, True), integer(1, ENUMERATED) + tlv(OCTET_STRING, s.crypto.iv)
                         + tlv(OCTET_STRING, s.crypto.mac)))
    if s.member is not None:
        parts.append(integer(s.member, ctx(4)))
    return tlv(SEQUENCE, b"".join(parts))


def encode_directory(d: Directory) -> bytes:
    """The DER of ``Directory`` (schemas/nvmgr.asn1) for *d*."""
    parts = [
        tlv(OID, FORMAT),
        integer(d.version),
        tlv(OCTET_STRING, d.image_uuid.bytes),
        integer(d.generation),
        integer(d.header_area),
        integer(d.image_size),
        tlv(SEQUENCE, integer(d.scratch_offset) + integer(d.scratch_length)),
        tlv(SEQUENCE, b"".join(_section(s) for s in d.sections)),
    ]
    if d.domain_uuid is not None:
        parts.append(tlv(ctx(0), d.domain_uuid.bytes))
    if d.key_slots is not None:
        slots = b"".join(
            tlv(SEQUENCE, tlv(OCTET_STRING, k.key_id) + integer(1, ENUMERATED)
                + tlv(OCTET_STRING, k.wrapped_key)
                + (_utf8(k.label, ctx(0)) if k.label is not None else b""))
            for k in d.key_slots)
        parts.append(tlv(ctx(1, True), integer(1, ENUMERATED) + tlv(SEQUENCE, slots)))
    if d.members is not None:
        members = b"".join(
            tlv(SEQUENCE, integer(m.index) + _utf8(m.path)
                + tlv(OCTET_STRING, m.image_uuid.bytes)
                + (integer(MEMBER_FORMATS.index(m.fmt), ctx(0)) if m.fmt is not None else b"")
                + (integer(m.generation, ctx(1)) if m.generation is not None else b""))
            for m in d.members)
        parts.append(tlv(ctx(2, True), members))
    for n, who in ((3, d.runner), (4, d.incoming)):
        if who is not None:
            parts.append(tlv(ctx(n, True), tlv(OCTET_STRING, who.run) + _utf8(who.host)))
    if d.orphaned is not None:
        o = d.orphaned
        parts.append(tlv(ctx(5, True), integer(o.since) + (
            _utf8(o.domain_name) if o.domain_name is not None else b"")))
    if d.parent is not None:
        parts.append(tlv(ctx(6), d.parent.bytes))
    return tlv(SEQUENCE, b"".join(parts))
