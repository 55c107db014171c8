"""A strict X.690 DER reader, schema-free.

The first layer of decoding a header copy, before the schema: nvmgr walks
the bytes here and rejects, with a message naming the offset:

- indefinite lengths, non-minimal lengths, lengths past the buffer;
- multi-byte tag numbers beyond a small bound, constructed forms of
  primitive universal types;
- non-minimal INTEGER/ENUMERATED encodings, empty INTEGERs;
- BOOLEAN contents other than 00 or FF;
- BIT STRING with non-zero unused bits, or unused-bit counts above 7;
- nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_NODES` TLVs;
- trailing data after the outermost value (only zero padding may follow when
  the caller says so).

Schema rules (which fields, which order, which sizes, the INTEGER rule for
context-tagged values, which this walker cannot recognise) are the job of
:mod:`nvmgr.format.reader`; :func:`nvmgr.format.codec.decode_header` runs both.
"""

from __future__ import annotations

from nvmgr.errors import DERError

MAX_DEPTH = 12
MAX_NODES = 200_000
MAX_TAG_BYTES = 4

_BOOLEAN, _INTEGER, _BIT_STRING, _ENUMERATED = 1, 2, 3, 10
# Universal types that DER requires to be primitive.
_PRIMITIVE_ONLY = {1, 2, 3, 4, 5, 6, 10, 12, 19, 22, 23, 24}


def read_length(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a definite, minimal DER length at *pos*; return (length, next pos)."""
    if pos >= end:
        raise DERError(f"DER: length missing at offset {pos}")
    first = buf[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    if first == 0x80:
        raise DERError(f"DER: indefinite length at offset {pos - 1}")
    if first == 0xFF:
        raise DERError(f"DER: reserved length octet 0xFF at offset {pos - 1}")
    count = first & 0x7F
    if count > 4:
        raise DERError(f"DER: length of {count} octets at offset {pos - 1} is beyond the limit")
    if pos + count > end:
        raise DERError(f"DER: length runs past the end at offset {pos - 1}")
    value = int.from_bytes(buf[pos : pos + count], "big")
    if buf[pos] == 0 or value < 0x80:
        raise DERError(f"DER: non-minimal length encoding at offset {pos - 1}")
    return value, pos + count


def _read_tag(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, bool, int, int]:
    """Return (tag class, constructed, tag number, next pos)."""
    if pos >= end:
        raise DERError(f"DER: tag missing at offset {pos}")
    b = buf[pos]
    cls, constructed, number = b >> 6, bool(b & 0x20), b & 0x1F
    pos += 1
    if number == 0x1F:
        number = 0
        for i in range(MAX_TAG_BYTES + 1):
            if i == MAX_TAG_BYTES:
                raise DERError(f"DER: tag number too long at offset {pos}")
            if pos >= end:
                raise DERError(f"DER: tag runs past the end at offset {pos}")
            c = buf[pos]
            if i == 0 and c == 0x80:
                raise DERError(f"DER: non-minimal tag number at offset {pos}")
            number = (number << 7) | (c & 0x7F)
            pos += 1
            if not c & 0x80:
                break
        if number < 0x1F:
            raise DERError(f"DER: tag {number} should use the short form (offset {pos})")
    return cls, constructed, number, pos


def integer_defect(content: bytes | memoryview) -> str | None:
    """What makes *content* an invalid DER INTEGER (or ENUMERATED), or None.

    X.690 8.3: at least one octet, and the first nine bits not all equal.
    The one place this rule is written; :mod:`nvmgr.format.reader` applies it
    to the context-tagged INTEGERs, which this walker cannot recognise.
    """
    if len(content) == 0:
        return "empty INTEGER"
    if len(content) > 1 and (
        (content[0] == 0x00 and not content[1] & 0x80)
        or (content[0] == 0xFF and content[1] & 0x80)
    ):
        return "non-minimal INTEGER"
    return None


def _check_primitive(cls: int, number: int, content: bytes | memoryview, at: int) -> None:
    if cls != 0:
        return
    if number in (_INTEGER, _ENUMERATED):
        defect = integer_defect(content)
        if defect is not None:
            raise DERError(f"DER: {defect} at offset {at}")
    elif number == _BOOLEAN:
        if len(content) != 1 or content[0] not in (0x00, 0xFF):
            raise DERError(f"DER: BOOLEAN must be one octet 00 or FF at offset {at}")
    elif number == _BIT_STRING:
        if len(content) == 0:
            raise DERError(f"DER: empty BIT STRING at offset {at}")
        unused = content[0]
        if unused > 7 or (unused and len(content) == 1):
            raise DERError(f"DER: bad BIT STRING unused-bit count at offset {at}")
        if unused and content[-1] & ((1 << unused) - 1):
            raise DERError(f"DER: BIT STRING unused bits are not zero at offset {at}")


def walk(buf: bytes | memoryview, *, allow_zero_padding: bool = False) -> int:
    """Check that *buf* starts with one strict DER value; return its length.

    :param allow_zero_padding: accept zero bytes after the value (a header
        area); any non-zero byte there is an error.
    :raise DERError: naming the first defect and its offset.
    """
    end = len(buf)
    nodes = 0
    # Iterative walk: a stack of (end of constructed value, depth).
    cls, constructed, number, pos = _read_tag(buf, 0, end)
    if (cls, constructed, number) != (0, True, 16):
        raise DERError("DER: the outermost value is not a SEQUENCE")
    length, pos = read_length(buf, pos, end)
    total = pos + length
    if total > end:
        raise DERError(f"DER: declared length {length} runs past the end of {end} bytes")
    stack = [total]
    while stack:
        if pos == stack[-1]:
            stack.pop()
            continue
        if len(stack) > MAX_DEPTH:
            raise DERError(f"DER: nesting deeper than {MAX_DEPTH} at offset {pos}")
        nodes += 1
        if nodes > MAX_NODES:
            raise DERError(f"DER: more than {MAX_NODES} values")
        at = pos
        cls, constructed, number, pos = _read_tag(buf, pos, stack[-1])
        length, pos = read_length(buf, pos, stack[-1])
        if pos + length > stack[-1]:
            raise DERError(f"DER: value at offset {at} runs past its container")
        if constructed:
            if cls == 0 and number in _PRIMITIVE_ONLY:
                raise DERError(f"DER: constructed form of universal type {number} at offset {at}")
            stack.append(pos + length)
        else:
            _check_primitive(cls, number, buf[pos : pos + length], at)
            pos += length
    rest = bytes(buf[total:])
    if rest and (not allow_zero_padding or rest.strip(b"\x00")):
        raise DERError(f"DER: {len(rest)} bytes of trailing data after the directory")
    return total
