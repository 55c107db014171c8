"""Header framing: :class:`nvmgr.format.model.Directory` <-> one DER header copy.

A header copy is ``HeaderCopy ::= SEQUENCE { directory Directory, digest
OCTET STRING }`` (``schemas/nvmgr.asn1``).  Decoding is strict in three
layers, each with its own message:

1. :func:`nvmgr.format.der.walk`: X.690 DER rules, depth and size bounds,
   trailing bytes (only zero padding may follow in a header area);
2. :func:`nvmgr.format.reader.read_header`: the schema, field by field (tags,
   order, sizes, ranges, UTF-8) and the version-1 rules; then the digest;
3. :func:`validate`: the rules on the model (names unique and valid, sections
   aligned, inside the image, not overlapping, encryption parameters).

Encoding is :func:`nvmgr.format.writer.encode_directory`, checked by
:func:`validate` first.  Nothing here imports pyasn1: the pyasn1 reference
(:mod:`nvmgr.format.asn1`) runs the same framing with its own schema layer,
for the tests and ``nvmgr dump --asn1`` only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from nvmgr.errors import DERError, ForeignImageError, NoSpaceError, UsageError
from nvmgr.format import der, reader, writer
from nvmgr.format.model import (
    ALIGN,
    CIPHER_OVERHEAD,
    HEADER_AREA_SIZES,
    MAX_IMAGE_SIZE,
    MAX_SECTION_SIZE,
    MAX_SECTIONS,
    Directory,
    align_up,
    check_name,
)

# Tag and first length byte a header copy starts with: SEQUENCE, long form.
_SEQUENCE = 0x30
_OCTET_STRING = 0x04
_FORMAT_TLV = bytes([reader.OID, len(reader.FORMAT)]) + reader.FORMAT

#: The schema layer of decoding: one header copy's DER (already walked) ->
#: (directory, the directory's own DER, the stored digest).
SchemaReader = Callable[[bytes], tuple[Directory, bytes, bytes]]


def encode_header(d: Directory, mac: Callable[[bytes], bytes] | None = None) -> bytes:
    """One complete HeaderCopy: the directory, its SHA-256 digest and, with
    *mac* (an encrypted image's, under its key), the directory's MAC.

    :raise DERError: *d* breaks a rule of :func:`validate`.
    :raise NoSpaceError: the directory does not fit the header area.
    """
    validate(d)
    body = writer.encode_directory(d)
    tail = writer.tlv(_OCTET_STRING, hashlib.sha256(body).digest())
    if mac is not None:
        tail += writer.tlv(reader.ctx(0), mac(body))
    out = writer.tlv(_SEQUENCE, body + tail)
    if len(out) > d.header_area:
        raise NoSpaceError(
            f"the directory needs {len(out)} bytes but the header area holds {d.header_area}"
        )
    return out


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


def decode_header(buf: bytes, *, padded: bool = True,
                  schema: SchemaReader = reader.read_header) -> Directory:
    """Decode one header copy strictly.

    :func:`nvmgr.format.der.walk` checks X.690 DER rules, *schema* the schema
    (field by field, sizes, ranges, version-1 rules), then the digest and
    :func:`validate` the model.

    :param buf: the header area (or the bare DER when *padded* is false).
    :param schema: the schema layer: nvmgr's own reader.  The tests pass
        :func:`nvmgr.format.asn1.read_header` (pyasn1, the reference) to hold
        the two to the same verdicts through this same frame.
    :raise ForeignImageError: the bytes are not an nvmgr header at all.
    :raise DERError: an nvmgr header that is malformed, non-canonical,
        fails its digest or breaks a layout rule.
    """
    if not looks_like_header(buf):
        raise ForeignImageError("no nvmgr directory here")
    total = der.walk(buf, allow_zero_padding=padded)
    d, directory_der, digest = schema(bytes(buf[:total]))
    if hashlib.sha256(directory_der).digest() != digest:
        raise DERError("header digest does not match its directory")
    validate(d)
    return d


def validate(d: Directory) -> None:
    """Check the rules on the model that a decoded or about-to-be-written directory obeys.

    :raise DERError: naming the first rule broken.
    """
    if len(d.sections) > MAX_SECTIONS:
        raise DERError(f"{len(d.sections)} sections exceed the limit of {MAX_SECTIONS}")
    if d.orphaned is not None and d.domain_uuid is None:
        raise DERError("an orphan record without an owner (domainUUID)")
    _check_bounds(d)
    if d.members is not None:
        indices = [m.index for m in d.members]
        if len(set(indices)) != len(indices):
            raise DERError("a member index appears twice")
        if d.parent is not None:
            raise DERError("a member image lists members of its own; members do not nest")
    if d.header_area not in HEADER_AREA_SIZES:
        raise DERError(f"header area size {d.header_area} is not a power of two in 64 KiB..16 MiB")
    names: set[str] = set()
    for s in d.sections:
        try:
            check_name(s.name)
        except UsageError as e:
            raise DERError(f"invalid section name {s.name[:80]!r} in the directory") from e
        if s.name in names:
            raise DERError(f"section {s.name} appears twice")
        names.add(s.name)
        if s.crypto is not None and not s.encrypted:
            raise DERError(f"section {s.name}: crypto parameters on a section not flagged encrypted")
        if s.encrypted and s.crypto is None and (s.length or s.crc32):
            raise DERError(f"section {s.name}: encrypted data without crypto parameters")
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
        if s.member is not None:
            # Its bytes are in another file, but the same layout rules hold there.
            for off, n in s.extents():
                if off % ALIGN or off + n > MAX_IMAGE_SIZE:
                    raise DERError(f"section {s.name}: [{off}, {off + n}) in member "
                                   f"{s.member} is not aligned or lies beyond the limit")
    for field, who in (("runner", d.runner), ("incoming", d.incoming)):
        if who is not None and (len(who.run) != 16 or not 1 <= len(who.host) <= 255):
            raise DERError(f"the directory's {field} needs a 16-byte run and a 1..255 "
                           "character host name")
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


def _span(value: int) -> str:
    """A number for a message: in full when it is small, else its size (Python
    refuses to print integers of more than 4,300 digits)."""
    return str(value) if -(10**20) < value < 10**20 else f"a {value.bit_length()}-bit number"


#: The largest bytes a section may reserve per slot (capacity + cipher padding).
_MAX_RESERVED = align_up(MAX_SECTION_SIZE + CIPHER_OVERHEAD, ALIGN)


def _check_bounds(d: Directory) -> None:
    """Every number of *d* within the documented bounds (README, "Bounds"),
    before any rule compares, adds or prints them.

    :raise DERError: naming the first field out of bounds.
    """
    fields: list[tuple[str, int | None, int]] = [
        ("generation", d.generation, 2**63 - 1),
        ("headerAreaSize", d.header_area, max(HEADER_AREA_SIZES)),
        ("imageSize", d.image_size, MAX_IMAGE_SIZE),
        ("scratch offset", d.scratch_offset, MAX_IMAGE_SIZE),
        ("scratch length", d.scratch_length, MAX_IMAGE_SIZE),
    ]
    for s in d.sections:
        fields += [
            (f"section {s.name[:80]!r} capacity", s.capacity, MAX_SECTION_SIZE),
            (f"section {s.name[:80]!r} reserved", s.reserved, _MAX_RESERVED),
            (f"section {s.name[:80]!r} length", s.length, MAX_SECTION_SIZE),
            (f"section {s.name[:80]!r} crc32", s.crc32, 0xFFFFFFFF),
            (f"section {s.name[:80]!r} offset", s.offset, MAX_IMAGE_SIZE),
            (f"section {s.name[:80]!r} spare", s.spare, MAX_IMAGE_SIZE),
            (f"section {s.name[:80]!r} home", s.home, MAX_IMAGE_SIZE),
        ]
    for what, value, hi in fields:
        if value is not None and not 0 <= value <= hi:
            raise DERError(f"{what} {_span(value)} is outside 0..{hi}")
