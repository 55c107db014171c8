"""A schema-directed DER reader for the directory: bytes straight to the model.

The product's only DER decoder (with :mod:`nvmgr.format.der` and
:mod:`nvmgr.format.writer`; nothing in the product path imports pyasn1).
Why not pyasn1 here: decoding a 1,024-section directory with pyasn1 and
re-encoding it to prove canonical form took about 0.35 s on this machine
kind, most of ``nvmgr info``'s budget of 0.5 s; this reader takes about
0.02 s.  pyasn1 stays the schema's reference (:mod:`nvmgr.format.asn1`): the
tests decode every accepted and rejected input with both and require the
same verdict and the same model (``tests/test_reference_codec.py``,
``tests/test_codec.py``).

The caller runs :func:`nvmgr.format.der.walk` first (lengths, minimal integers,
BOOLEAN, BIT STRING and primitive-form rules, depth, trailing bytes); this
module enforces the schema of ``schemas/nvmgr.asn1``: every field's tag in
order, no extra or missing elements, sizes and ranges, UTF-8, and the
version-1 rules below.

The version-1 rules that are not ASN.1 (the named-bit canonical form of the
section flags and their meaning, version 1, no extensions, nvmgr's format
identifier) are written once, as the functions under "Version-1 rules", and
the pyasn1 reference applies the same functions.  Rules on the decoded model
(names, layout, encryption parameters) are :func:`nvmgr.format.codec.validate`'s.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from nvmgr.errors import DERError, ForeignImageError
from nvmgr.format.der import integer_defect
from nvmgr.format.model import (
    MEMBER_FORMATS,
    Binding,
    Directory,
    KeySlot,
    Member,
    Orphaned,
    Runner,
    Section,
    SectionCrypto,
)

# Tags (universal, and the context tags of the IMPLICIT TAGS module).
INTEGER, BIT_STRING, OCTET_STRING, OID, ENUMERATED, UTF8 = 0x02, 0x03, 0x04, 0x06, 0x0A, 0x0C
SEQUENCE = 0x30


def ctx(n: int, constructed: bool = False) -> int:
    return 0x80 | (0x20 if constructed else 0) | n


FORMAT_OID = "2.25.282081522808666108998162609141495310460.1"
INT64_MAX = 2**63 - 1
_FLAG_COUNT = 3


def oid_content(dotted: str) -> bytes:
    arcs = [int(x) for x in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


#: Content octets of nvmgr's format identifier (the OBJECT IDENTIFIER's value).
FORMAT = oid_content(FORMAT_OID)


def oid_text(content: bytes) -> str:
    """Dotted text of OBJECT IDENTIFIER content octets (hex if malformed), for messages."""
    arcs: list[int] = []
    n = 0
    for b in content:
        n = n << 7 | b & 0x7F
        if not b & 0x80:
            arcs.append(n)
            n = 0
    if not arcs or content[-1] & 0x80:
        return content.hex()
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


# --------------------------------------------------------------- version-1 rules
# Shared with the pyasn1 reference (nvmgr.format.asn1): each is written here only.
# *fail* makes the error; the reader's names the field's place in the bytes.

Fail = Callable[[str], DERError]


def check_format(content: bytes) -> None:
    """The format identifier must be nvmgr's.

    :raise ForeignImageError: it is another format's.
    """
    if content != FORMAT:
        raise ForeignImageError(f"format identifier {oid_text(content)} is not nvmgr's")


def check_version(version: int) -> None:
    """:raise DERError: the directory is not version 1."""
    if version != 1:
        raise DERError(f"directory version {version} is not supported (this is 1)")


def no_extensions(present: bool, what: str, fail: Fail = DERError) -> None:
    """:raise DERError: *what* carries extensions, which version 1 does not define."""
    if present:
        raise fail(f"{what} extensions are not defined in version 1")


def section_flags(bits: Sequence[bool], name: str, binding: Binding,
                  fail: Fail = DERError) -> tuple[bool, bool]:
    """(encrypted, dirty) from section *name*'s flag bits, checked.

    DER's named-bit form drops trailing zero bits (X.690 11.2.2); version 1
    defines three bits; the live bit must agree with the binding.

    :raise DERError: any of the three is broken.
    """
    if bits and not bits[-1]:
        raise fail(f"section {name}: flags are not in canonical form (trailing zero bit)")
    if len(bits) > _FLAG_COUNT:
        raise fail(f"section {name}: flags carry {len(bits)} bits, version 1 defines 3")
    encrypted, live, dirty = (*bits, *[False] * (_FLAG_COUNT - len(bits)))
    if live != binding.live:
        raise DERError(f"section {name}: the live flag disagrees with binding {binding.name}")
    return encrypted, dirty


# --------------------------------------------------------------- the reader


class _Reader:
    """Reads the elements of one constructed value, in order."""

    __slots__ = ("buf", "pos", "end", "what")

    def __init__(self, buf: bytes, pos: int, end: int, what: str) -> None:
        self.buf, self.pos, self.end, self.what = buf, pos, end, what

    def _fail(self, msg: str) -> DERError:
        return DERError(f"directory does not match the nvmgr schema: {msg} "
                        f"(in {self.what}, offset {self.pos})")

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.pos < self.end else None

    def take(self, tag: int, field: str) -> tuple[int, int]:
        """The content bounds of the next element, which must carry *tag*."""
        if self.pos >= self.end:
            raise self._fail(f"{field} is missing")
        if self.buf[self.pos] != tag:
            raise self._fail(f"expected {field} (tag 0x{tag:02x}), found tag "
                             f"0x{self.buf[self.pos]:02x}")
        first = self.buf[self.pos + 1]
        pos = self.pos + 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            length = int.from_bytes(self.buf[pos : pos + n], "big")
            pos += n
        if pos + length > self.end:
            raise self._fail(f"{field} runs past its container")
        self.pos = pos + length
        return pos, pos + length

    def sub(self, tag: int, field: str) -> _Reader:
        start, end = self.take(tag, field)
        return _Reader(self.buf, start, end, field)

    def integer(self, field: str, lo: int = 0, hi: int = INT64_MAX,
                tag: int = INTEGER) -> int:
        """The next INTEGER, within *lo*..*hi*.

        The schema's ``(0..MAX)`` is read as 0..2**63-1: no field of a real
        directory comes near it, and a value of thousands of digits (which
        Python cannot even print) is refused here, by its encoded length,
        before it is converted.  :func:`nvmgr.format.codec.validate` applies
        the tighter bounds (image, section and offset limits).
        """
        start, end = self.take(tag, field)
        # der.walk checks universal INTEGERs; context-tagged ones are checked here.
        if tag & 0xC0 and integer_defect(self.buf[start:end]) is not None:
            raise self._fail(f"{field} is not a minimal INTEGER")
        if end - start > 9:
            raise self._fail(f"{field} is out of range {lo}..{hi} ({end - start} octets)")
        value = int.from_bytes(self.buf[start:end], "big", signed=True)
        if value < lo or value > hi:
            raise self._fail(f"{field} {value} is outside {lo}..{hi}")
        return value

    def octets(self, field: str, size: int | None = None, tag: int = OCTET_STRING) -> bytes:
        start, end = self.take(tag, field)
        if size is not None and end - start != size:
            raise self._fail(f"{field} must be {size} bytes, not {end - start}")
        return self.buf[start:end]

    def utf8(self, field: str, lo: int, hi: int, tag: int = UTF8) -> str:
        raw = self.octets(field, tag=tag)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"{field} is not valid UTF-8") from e
        if not lo <= len(text) <= hi:
            raise self._fail(f"{field} must be {lo}..{hi} characters, not {len(text)}")
        return text

    def done(self) -> None:
        if self.pos != self.end:
            raise self._fail(f"unexpected element with tag 0x{self.buf[self.pos]:02x} "
                             "after the last field")

    def none_left(self, field: str) -> None:
        no_extensions(self.peek() == ctx(15, True), field, self._fail)


def _bits(r: _Reader) -> list[bool]:
    """The bits of the next BIT STRING (der.walk has checked the unused-bit count)."""
    start, end = r.take(BIT_STRING, "flags")
    unused = r.buf[start]
    bits = []
    for byte in r.buf[start + 1 : end]:
        bits += [bool(byte >> (7 - i) & 1) for i in range(8)]
    return bits[: len(bits) - unused]


def _section(r: _Reader) -> Section:
    name = r.utf8("name", 1, 64)
    b = r.integer("binding", 0, 4, tag=ENUMERATED)
    binding = Binding(b)
    encrypted, dirty = section_flags(_bits(r), name, binding, r._fail)
    capacity = r.integer("capacity")
    reserved = r.integer("reserved")
    length = r.integer("length")
    crc32 = r.integer("crc32", 0, 0xFFFFFFFF)
    offset = r.integer("offset")
    spare = r.integer("spare", tag=ctx(0)) if r.peek() == ctx(0) else None
    home = r.integer("home", tag=ctx(1)) if r.peek() == ctx(1) else None
    device = r.utf8("device", 1, 128, tag=ctx(2)) if r.peek() == ctx(2) else None
    crypto = None
    if r.peek() == ctx(3, True):
        c = r.sub(ctx(3, True), f"section {name} crypto")
        c.integer("scheme", 1, 1, tag=ENUMERATED)
        crypto = SectionCrypto(iv=c.octets("iv", 16), mac=c.octets("mac", 32))
        c.done()
    member = r.integer("member", 1, 64, tag=ctx(4)) if r.peek() == ctx(4) else None
    r.none_left(f"section {name}")
    r.done()
    return Section(name=name, binding=binding, capacity=capacity, reserved=reserved,
                   offset=offset, length=length, crc32=crc32, encrypted=encrypted, dirty=dirty,
                   spare=spare, home=home, device=device, crypto=crypto, member=member)


def read_header(body: bytes) -> tuple[Directory, bytes, bytes]:
    """Decode one header copy's DER (already checked by :func:`nvmgr.format.der.walk`).

    :return: (directory, the directory's own DER bytes, the stored digest)
    :raise ForeignImageError: the format identifier is not nvmgr's.
    :raise DERError: any departure from the schema.
    """
    outer = _Reader(body, 0, len(body), "header copy")
    top = outer.sub(SEQUENCE, "HeaderCopy")
    outer.done()
    d_start = top.pos
    r = top.sub(SEQUENCE, "directory")
    directory_der = body[d_start : top.pos]
    digest = top.octets("digest", 32)
    mac = top.octets("mac", 32, tag=ctx(0)) if top.peek() == ctx(0) else None
    top.done()
    check_format(r.octets("format", tag=OID))
    check_version(r.integer("version"))
    image_uuid = uuid.UUID(bytes=r.octets("imageUUID", 16))
    generation = r.integer("generation", 0, INT64_MAX)
    header_area = r.integer("headerAreaSize", 65536, 16777216)
    image_size = r.integer("imageSize")
    ext = r.sub(SEQUENCE, "scratch")
    scratch_offset, scratch_length = ext.integer("offset"), ext.integer("length")
    ext.done()
    secs = r.sub(SEQUENCE, "sections")
    sections: list[Section] = []
    while secs.peek() is not None:  # how many: validate() (der.walk bounds the work)
        sections.append(_section(secs.sub(SEQUENCE, "section")))
    domain_uuid = None
    if r.peek() == ctx(0):
        domain_uuid = uuid.UUID(bytes=r.octets("domainUUID", 16, tag=ctx(0)))
    key_slots = None
    if r.peek() == ctx(1, True):
        enc = r.sub(ctx(1, True), "encryption")
        enc.integer("scheme", 1, 1, tag=ENUMERATED)
        slots = enc.sub(SEQUENCE, "keySlots")
        key_slots = []
        while slots.peek() is not None:
            k = slots.sub(SEQUENCE, "keySlot")
            key_id = k.octets("keyId", 8)
            k.integer("wrap", 1, 1, tag=ENUMERATED)
            wrapped = k.octets("wrappedKey", 40)
            label = k.utf8("label", 1, 128, tag=ctx(0)) if k.peek() == ctx(0) else None
            k.done()
            key_slots.append(KeySlot(key_id, wrapped, label))
        enc.done()
        if not 1 <= len(key_slots) <= 8:
            raise enc._fail(f"{len(key_slots)} key slots; 1..8 allowed")
    members = None
    if r.peek() == ctx(2, True):
        mem = r.sub(ctx(2, True), "members")
        members = []
        while mem.peek() is not None:
            m = mem.sub(SEQUENCE, "member")
            index, path = m.integer("index", 1, 64), m.utf8("path", 1, 4096)
            image = uuid.UUID(bytes=m.octets("imageUUID", 16))
            fmt = None
            if m.peek() == ctx(0):
                fmt = MEMBER_FORMATS[m.integer("member format", 0, len(MEMBER_FORMATS) - 1,
                                               tag=ctx(0))]
            seen = None
            if m.peek() == ctx(1):
                seen = m.integer("member generation", 0, INT64_MAX, tag=ctx(1))
            members.append(Member(index, path, image, fmt, seen))
            m.done()
        if not 1 <= len(members) <= 64:
            raise mem._fail(f"{len(members)} members; 1..64 allowed")
    runner = _runner(r, 3, "runner") if r.peek() == ctx(3, True) else None
    incoming = _runner(r, 4, "incoming") if r.peek() == ctx(4, True) else None
    orphaned = None
    if r.peek() == ctx(5, True):
        o = r.sub(ctx(5, True), "orphaned")
        since = o.integer("orphaned since", 0, INT64_MAX)
        name = o.utf8("orphaned domainName", 1, 255) if o.peek() is not None else None
        o.done()
        orphaned = Orphaned(since, name)
    parent = None
    if r.peek() == ctx(6):
        parent = uuid.UUID(bytes=r.octets("parent", 16, tag=ctx(6)))
    r.none_left("directory")
    r.done()
    d = Directory(version=1, image_uuid=image_uuid, generation=generation,
                  header_area=header_area, image_size=image_size,
                  scratch_offset=scratch_offset, scratch_length=scratch_length,
                  sections=sections, domain_uuid=domain_uuid, key_slots=key_slots,
                  members=members, runner=runner, incoming=incoming, orphaned=orphaned,
                  parent=parent, mac=mac)
    return d, directory_der, digest


def _runner(r: _Reader, n: int, field: str) -> Runner:
    x = r.sub(ctx(n, True), field)
    out = Runner(x.octets(f"{field} run", 16), x.utf8(f"{field} host", 1, 255))
    x.done()
    return out
