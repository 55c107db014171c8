"""The strict X.690 DER reader (nvmgr.format.der) and its use by codec.decode_header.

Each malformed form appears twice:

- surgically edited into a valid header (``encode_header`` of a small
  directory from ``layout()``): the edit is made on a parsed tree and the tree
  is re-serialized with correct enclosing lengths and a recomputed SHA-256
  digest, so the injected defect is the *only* thing wrong and the error must
  name it;
- as a tiny standalone DER value for :func:`nvmgr.format.der.walk`.

Every vector also goes through :func:`nvmgr.format.codec.decode_header`, which may
only raise DERError or ForeignImageError (never a traceback of another type).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmgr.errors import DERError, ForeignImageError
from nvmgr.format import asn1, codec, der
from nvmgr.format.layout import SectionSpec, layout
from nvmgr.format.model import Binding, Directory

# --------------------------------------------------------------- DER tree helper


def _len_octets(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


@dataclasses.dataclass
class Node:
    """One TLV.  ``children`` is None for primitives; ``length`` overrides the
    length octets (to inject malformed lengths); ``tail`` follows the content
    (an end-of-contents marker for indefinite lengths)."""

    ident: bytes
    content: bytes = b""
    children: list[Node] | None = None
    length: bytes | None = None
    tail: bytes = b""

    def body(self) -> bytes:
        if self.children is None:
            return self.content
        return b"".join(c.encode() for c in self.children)

    def encode(self) -> bytes:
        body = self.body()
        return self.ident + (self.length or _len_octets(len(body))) + body + self.tail

    def at(self, *path: int) -> Node:
        n = self
        for i in path:
            assert n.children is not None
            n = n.children[i]
        return n


def _parse(buf: bytes) -> list[Node]:
    """Parse valid DER with one-octet tags (all the header uses) into Nodes."""
    out = []
    pos = 0
    while pos < len(buf):
        ident = buf[pos : pos + 1]
        assert ident[0] & 0x1F != 0x1F
        length, start = der.read_length(buf, pos + 1, len(buf))
        content = buf[start : start + length]
        if ident[0] & 0x20:
            out.append(Node(ident, children=_parse(content)))
        else:
            out.append(Node(ident, content=content))
        pos = start + length
    return out


def _prim(ident: int, content: bytes) -> Node:
    return Node(bytes([ident]), content=content)


def _cons(ident: int, *children: Node) -> Node:
    return Node(bytes([ident]), children=list(children))


# --------------------------------------------------------------- the base header

IMAGE_UUID = uuid.UUID("0c7d7a51-58f3-4c1e-9a0b-6d2f9f4d8e11")


def _directory() -> Directory:
    return layout(
        [
            SectionSpec("efivars", 540672, Binding.PFLASH),
            SectionSpec("tpm", 65536, Binding.TPM),
        ],
        image_uuid=IMAGE_UUID,
    )


HEADER = codec.encode_header(_directory())
TREE = _parse(HEADER)[0]
# HeaderCopy ::= SEQUENCE { directory, digest }
DIR = (0,)
VERSION = (0, 1)
IMAGE_UUID_PATH = (0, 2)
GENERATION = (0, 3)
SCRATCH = (0, 6)
SCRATCH_LENGTH = (0, 6, 1)
SECTIONS = (0, 7)
EFIVARS = (0, 7, 0)
EFIVARS_FLAGS = (0, 7, 0, 2)
TPM = (0, 7, 1)
TPM_SPARE = (0, 7, 1, 8)


def _seal(tree: Node) -> bytes:
    """Serialize *tree* with the digest recomputed over its directory."""
    tree.at(1).content = hashlib.sha256(tree.at(*DIR).encode()).digest()
    return tree.encode()


def _edit(fn: Callable[[Node], None]) -> bytes:
    tree = copy.deepcopy(TREE)
    fn(tree)
    return _seal(tree)


def test_tree_helper_round_trips_the_base_header() -> None:
    assert TREE.encode() == HEADER
    assert _edit(lambda t: None) == HEADER
    # The paths name what the tests think they name.
    assert TREE.at(*VERSION).content == b"\x01"
    assert TREE.at(*IMAGE_UUID_PATH).content == IMAGE_UUID.bytes
    assert TREE.at(*EFIVARS_FLAGS).ident == b"\x03"
    assert TREE.at(*EFIVARS_FLAGS).content == b"\x06\x40"  # { live }
    assert TREE.at(*TPM_SPARE).ident == b"\x80"
    assert TREE.at(*EFIVARS, 0).content == b"efivars"
    assert codec.decode_header(HEADER, padded=False) == _directory()


# --------------------------------------------------------------- header vectors


def _set(path: tuple[int, ...], **fields: object) -> Callable[[Node], None]:
    def fn(t: Node) -> None:
        n = t.at(*path)
        for k, v in fields.items():
            setattr(n, k, v)

    return fn


def _replace(path: tuple[int, ...], node: Node) -> Callable[[Node], None]:
    def fn(t: Node) -> None:
        parent = t.at(*path[:-1])
        assert parent.children is not None
        parent.children[path[-1]] = node

    return fn


def _append(path: tuple[int, ...], node: Node) -> Callable[[Node], None]:
    def fn(t: Node) -> None:
        children = t.at(*path).children
        assert children is not None
        children.append(node)

    return fn


def _deep(levels: int, leaf: Node | None = None) -> Node:
    n = leaf or _prim(0x05, b"")
    for _ in range(levels):
        n = _cons(0x30, n)
    return n


def _extensions(*extension_fields: Node) -> Node:
    # [15] Extensions ::= SEQUENCE OF Extension; Extension ::= SEQUENCE {oid, BOOLEAN, OCTET STRING}
    return _cons(0xAF, _cons(0x30, _prim(0x06, b"\x2a\x03"), *extension_fields))


def _indefinite(t: Node) -> None:
    n = t.at(*SCRATCH)
    n.length, n.tail = b"\x80", b"\x00\x00"


def _past_container(t: Node) -> None:
    # scratch.length claims more octets than its Extent holds.
    n = t.at(*SCRATCH_LENGTH)
    n.length = bytes([len(n.content) + 4])


def _constructed_octets(t: Node) -> None:
    # BER's constructed OCTET STRING: 24 { 04 08 .. 04 08 .. }
    u = IMAGE_UUID.bytes
    _replace(IMAGE_UUID_PATH, _cons(0x24, _prim(0x04, u[:8]), _prim(0x04, u[8:])))(t)


def _deep_extension(t: Node) -> None:
    # HeaderCopy(0) > Directory(1) > [15](2) > Extension(3) > ... : the chain
    # puts a value at depth MAX_DEPTH + 1.
    _append(DIR, _cons(0xAF, _deep(der.MAX_DEPTH - 2)))(t)


# (id, edit, regex the DERError message must match)
HEADER_VECTORS: list[tuple[str, Callable[[Node], None], str]] = [
    ("indefinite-length", _indefinite, r"indefinite length"),
    ("non-minimal-length-81", _set(SCRATCH, length=b"\x81\x0a"), r"non-minimal length"),
    ("non-minimal-length-82-00", _set((), length=b"\x82\x00" + bytes([len(TREE.body())])),
     r"non-minimal length"),
    ("non-minimal-length-82-0080", _set(SCRATCH, length=b"\x82\x00\x0a"), r"non-minimal length"),
    ("length-octets-5", _set(SCRATCH, length=b"\x85\x00\x00\x00\x00\x0a"),
     r"length of 5 octets .*beyond the limit"),
    ("reserved-length-ff", _set(SCRATCH, length=b"\xff"), r"reserved length octet 0xFF"),
    ("length-past-container", _past_container, r"runs past its container"),
    ("integer-00-01", _set(VERSION, content=b"\x00\x01"), r"non-minimal INTEGER"),
    ("integer-ff-80", _set(GENERATION, content=b"\xff\x80"), r"non-minimal INTEGER"),
    ("integer-empty", _set(GENERATION, content=b""), r"empty INTEGER"),
    ("enumerated-00-01", _set((*EFIVARS, 1), content=b"\x00\x01"), r"non-minimal INTEGER"),
    ("boolean-01", _append(DIR, _extensions(_prim(0x01, b"\x01"), _prim(0x04, b""))),
     r"BOOLEAN must be one octet 00 or FF"),
    ("boolean-two-bytes", _append(DIR, _extensions(_prim(0x01, b"\xff\xff"), _prim(0x04, b""))),
     r"BOOLEAN must be one octet 00 or FF"),
    ("boolean-empty", _append(DIR, _extensions(_prim(0x01, b""), _prim(0x04, b""))),
     r"BOOLEAN must be one octet 00 or FF"),
    ("bitstring-unused-bits-set", _set(EFIVARS_FLAGS, content=b"\x06\x41"),
     r"BIT STRING unused bits are not zero"),
    ("bitstring-unused-count-8", _set(EFIVARS_FLAGS, content=b"\x08\x40"),
     r"bad BIT STRING unused-bit count"),
    ("bitstring-unused-without-bits", _set((*TPM, 2), content=b"\x03"),
     r"bad BIT STRING unused-bit count"),
    ("bitstring-empty", _set((*TPM, 2), content=b""), r"empty BIT STRING"),
    ("constructed-octet-string", _constructed_octets, r"constructed form of universal type 4\b"),
    ("constructed-integer", _replace(VERSION, _cons(0x22, _prim(0x02, b"\x01"))),
     r"constructed form of universal type 2\b"),
    ("constructed-utf8string", _replace((*EFIVARS, 0), _cons(0x2C, _prim(0x0C, b"efivars"))),
     r"constructed form of universal type 12\b"),
    ("high-tag-fits-short-form", _set(VERSION, ident=b"\x1f\x02"),
     r"tag 2 should use the short form"),
    ("high-tag-context-fits-short-form", _set(TPM_SPARE, ident=b"\x9f\x00"),
     r"tag 0 should use the short form"),
    ("high-tag-leading-0x80", _set(VERSION, ident=b"\x1f\x80\x21"), r"non-minimal tag number"),
    ("tag-number-too-long", _set(TPM_SPARE, ident=b"\x9f\x81\x81\x81\x81\x01"),
     r"tag number too long"),
    ("nesting-too-deep", _deep_extension, rf"nesting deeper than {der.MAX_DEPTH}"),
]


@pytest.mark.parametrize(("edit", "pattern"), [v[1:] for v in HEADER_VECTORS],
                         ids=[v[0] for v in HEADER_VECTORS])
def test_header_vector_is_rejected_naming_the_defect(
    edit: Callable[[Node], None], pattern: str
) -> None:
    blob = _edit(edit)
    assert blob != HEADER
    with pytest.raises(DERError, match=pattern):
        der.walk(blob)
    # The walker, not the digest or the schema, is what stops it.
    with pytest.raises(DERError, match=pattern):
        codec.decode_header(blob, padded=False)
    with pytest.raises(DERError, match=pattern):
        codec.decode_header(blob + bytes(64), padded=True)


def test_header_walk_names_the_offset() -> None:
    blob = _edit(_set(GENERATION, content=b""))
    offset = HEADER.index(b"\x02\x01\x00\x02\x03\x01\x00\x00")  # generation, headerAreaSize
    with pytest.raises(DERError, match=rf"empty INTEGER at offset {offset}$"):
        der.walk(blob)


def test_header_nesting_at_the_limit_passes_the_walker() -> None:
    # One level shallower than the rejected vector: the walker accepts it and
    # the schema (version 1 defines no extensions) rejects it.
    blob = _edit(_append(DIR, _cons(0xAF, _deep(der.MAX_DEPTH - 3))))
    assert der.walk(blob) == len(blob)
    with pytest.raises(DERError, match="does not match the nvmgr schema"):
        codec.decode_header(blob, padded=False)


def test_header_four_byte_tag_passes_the_walker_only() -> None:
    blob = _edit(_set(TPM_SPARE, ident=b"\x9f\x81\x81\x81\x01"))
    assert der.walk(blob) == len(blob)
    with pytest.raises(DERError, match="does not match the nvmgr schema"):
        codec.decode_header(blob, padded=False)


def test_header_declared_length_past_the_end() -> None:
    for cut in (1, 34, len(HEADER) - 4):
        with pytest.raises(DERError, match=r"declared length \d+ runs past the end"):
            der.walk(HEADER[:-cut])
        with pytest.raises((DERError, ForeignImageError)):
            codec.decode_header(HEADER[:-cut], padded=False)
    with pytest.raises(DERError, match=r"declared length \d+ runs past the end"):
        codec.decode_header(HEADER[:-1], padded=True)


def test_header_length_octets_past_the_end() -> None:
    with pytest.raises(DERError, match="length runs past the end"):
        der.walk(HEADER[:2])  # 30 81 | (missing length octet)
    with pytest.raises(ForeignImageError):
        codec.header_length(HEADER[:2])  # too short to tell


def test_header_length() -> None:
    assert codec.header_length(HEADER + bytes(100)) == len(HEADER)
    # An nvmgr header (its OID is there) with a malformed outer length is damaged ...
    with pytest.raises(DERError, match="indefinite length at offset 1"):
        codec.header_length(b"\x30\x80" + HEADER[3:] + b"\x00\x00")
    with pytest.raises(DERError, match="non-minimal length"):
        codec.header_length(b"\x30\x82\x00" + HEADER[2:])
    # ... while a file that merely starts with a SEQUENCE is foreign.
    for foreign in (bytes.fromhex("3080 06092a864886f70d010702") + bytes(200),
                    bytes.fromhex("308200ff") + bytes(300), bytes(300), b"\x30"):
        with pytest.raises(ForeignImageError, match="no nvmgr directory here"):
            codec.header_length(foreign)


def test_header_too_many_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = _count_nodes(TREE) - 1  # the outermost value is not counted
    monkeypatch.setattr(der, "MAX_NODES", nodes)
    assert der.walk(HEADER) == len(HEADER)
    assert codec.decode_header(HEADER, padded=False) == _directory()
    monkeypatch.setattr(der, "MAX_NODES", nodes - 1)
    with pytest.raises(DERError, match=rf"more than {nodes - 1} values"):
        der.walk(HEADER)
    with pytest.raises(DERError, match=rf"more than {nodes - 1} values"):
        codec.decode_header(HEADER, padded=False)


def _count_nodes(n: Node) -> int:
    return 1 + sum(_count_nodes(c) for c in n.children or [])


def test_header_trailing_data() -> None:
    # Zero padding: accepted only when the caller allows it.
    padded = HEADER + bytes(4096)
    assert der.walk(padded, allow_zero_padding=True) == len(HEADER)
    assert codec.decode_header(padded, padded=True) == _directory()
    with pytest.raises(DERError, match=r"4096 bytes of trailing data"):
        der.walk(padded)
    with pytest.raises(DERError, match=r"4096 bytes of trailing data"):
        codec.decode_header(padded, padded=False)
    # A non-zero byte anywhere after the value is refused even when padded.
    for tail in (b"\x01", bytes(100) + b"\x01", b"\x01" + bytes(100), b"\x30\x00"):
        with pytest.raises(DERError, match=rf"{len(tail)} bytes of trailing data"):
            der.walk(HEADER + tail, allow_zero_padding=True)
        with pytest.raises(DERError, match=rf"{len(tail)} bytes of trailing data"):
            codec.decode_header(HEADER + tail, padded=True)


# --------------------------------------------------------------- standalone vectors

def _nested(levels: int) -> bytes:
    return _deep(levels - 1).encode()


STANDALONE_VECTORS: list[tuple[str, bytes, str]] = [
    ("indefinite-length", bytes.fromhex("3080 020101 0000"), r"indefinite length at offset 1"),
    ("indefinite-inner", bytes.fromhex("3007 3080 020101 0000"), r"indefinite length at offset 3"),
    ("non-minimal-81-05", bytes.fromhex("308105 020101 0500"), r"non-minimal length"),
    ("non-minimal-82-0080", bytes.fromhex("30820080") + bytes.fromhex("0400") * 64,
     r"non-minimal length"),
    ("non-minimal-inner-81", bytes.fromhex("3004 048101aa"), r"non-minimal length encoding at offset 3"),
    ("length-octets-5", bytes.fromhex("30850000000003 020101"), r"length of 5 octets"),
    ("length-octets-8", bytes.fromhex("3088000000000000000103"), r"length of 8 octets"),
    ("reserved-length-ff", bytes.fromhex("30ff"), r"reserved length octet 0xFF"),
    ("length-missing", bytes.fromhex("30"), r"length missing"),
    ("length-octets-past-end", bytes.fromhex("308201"), r"length runs past the end"),
    ("length-past-end", bytes.fromhex("3005 020101"), r"declared length 5 runs past the end"),
    ("inner-length-past-container", bytes.fromhex("3003 020501"), r"runs past its container"),
    ("inner-length-past-container-2", bytes.fromhex("3006 3003 020201 00"),
     r"runs past its container"),
    ("integer-00-01", bytes.fromhex("3004 02020001"), r"non-minimal INTEGER"),
    ("integer-ff-80", bytes.fromhex("3004 0202ff80"), r"non-minimal INTEGER"),
    ("integer-00-00-ff", bytes.fromhex("3005 020300 00ff"), r"non-minimal INTEGER"),
    ("integer-empty", bytes.fromhex("3002 0200"), r"empty INTEGER"),
    ("enumerated-empty", bytes.fromhex("3002 0a00"), r"empty INTEGER"),
    ("enumerated-ff-ff", bytes.fromhex("3004 0a02ffff"), r"non-minimal INTEGER"),
    ("boolean-01", bytes.fromhex("3003 010101"), r"BOOLEAN must be one octet 00 or FF"),
    ("boolean-7f", bytes.fromhex("3003 01017f"), r"BOOLEAN must be one octet 00 or FF"),
    ("boolean-two-bytes", bytes.fromhex("3004 0102ff00"), r"BOOLEAN must be one octet 00 or FF"),
    ("boolean-empty", bytes.fromhex("3002 0100"), r"BOOLEAN must be one octet 00 or FF"),
    ("bitstring-unused-bits-set", bytes.fromhex("3004 030206c1"), r"unused bits are not zero"),
    ("bitstring-unused-bit-1", bytes.fromhex("3004 030201ff"), r"unused bits are not zero"),
    ("bitstring-unused-count-8", bytes.fromhex("3004 03020800"), r"unused-bit count"),
    ("bitstring-unused-count-ff", bytes.fromhex("3004 0302ff00"), r"unused-bit count"),
    ("bitstring-unused-no-content", bytes.fromhex("3003 030101"), r"unused-bit count"),
    ("bitstring-empty", bytes.fromhex("3002 0300"), r"empty BIT STRING"),
    ("constructed-octet-string", bytes.fromhex("3006 2404 0402aabb"),
     r"constructed form of universal type 4\b"),
    ("constructed-integer", bytes.fromhex("3005 2203 020101"),
     r"constructed form of universal type 2\b"),
    ("constructed-boolean", bytes.fromhex("3005 2103 0101ff"),
     r"constructed form of universal type 1\b"),
    ("constructed-bitstring", bytes.fromhex("3006 2304 03020780"),
     r"constructed form of universal type 3\b"),
    ("constructed-oid", bytes.fromhex("3006 2604 06022a03"),
     r"constructed form of universal type 6\b"),
    ("outermost-constructed-octet-string", bytes.fromhex("2404 0402aabb"),
     r"outermost value is not a SEQUENCE"),
    ("outermost-primitive", bytes.fromhex("020101"), r"outermost value is not a SEQUENCE"),
    ("outermost-context", bytes.fromhex("a003 020101"), r"outermost value is not a SEQUENCE"),
    ("outermost-set", bytes.fromhex("3103 020101"), r"outermost value is not a SEQUENCE"),
    ("empty", b"", r"tag missing"),
    ("high-tag-fits-short-form", bytes.fromhex("3003 1f0200"), r"tag 2 should use the short form"),
    ("high-tag-30-fits-short-form", bytes.fromhex("3003 9f1e00"),
     r"tag 30 should use the short form"),
    ("high-tag-outermost", bytes.fromhex("3f1000"), r"tag 16 should use the short form"),
    ("high-tag-leading-0x80", bytes.fromhex("3004 9f801f00"), r"non-minimal tag number"),
    ("tag-number-too-long", bytes.fromhex("3007 9f818181810100"), r"tag number too long"),
    ("tag-past-end", bytes.fromhex("3002 9f81"), r"tag runs past the end"),
    ("nesting-too-deep", _nested(der.MAX_DEPTH + 2), rf"nesting deeper than {der.MAX_DEPTH}"),
    ("trailing-data", bytes.fromhex("3000 01"), r"1 bytes of trailing data"),
    ("trailing-zeros-not-allowed", bytes.fromhex("3000 0000"), r"2 bytes of trailing data"),
    ("trailing-value", bytes.fromhex("3000 3000"), r"2 bytes of trailing data"),
]


@pytest.mark.parametrize(("blob", "pattern"), [v[1:] for v in STANDALONE_VECTORS],
                         ids=[v[0] for v in STANDALONE_VECTORS])
def test_standalone_vector_is_rejected_naming_the_defect(blob: bytes, pattern: str) -> None:
    with pytest.raises(DERError, match=pattern):
        der.walk(blob)
    with pytest.raises((DERError, ForeignImageError)):
        codec.decode_header(blob, padded=False)
    with pytest.raises((DERError, ForeignImageError)):
        codec.decode_header(blob, padded=True)


VALID_STANDALONE = [
    bytes.fromhex("3000"),
    bytes.fromhex("3003 020100"),
    bytes.fromhex("3004 0202 0080"),  # 128 needs the leading 00
    bytes.fromhex("3003 0201 80"),  # -128
    bytes.fromhex("3004 0202 ff7f"),  # -129
    bytes.fromhex("3006 010100 0101ff"),
    bytes.fromhex("3003 030100"),
    bytes.fromhex("3004 0302 0780"),
    bytes.fromhex("3004 0302 0040"),
    bytes.fromhex("3003 1f1f00"),  # tag 31: the smallest that needs the long form
    bytes.fromhex("3006 9f81818101 00"),  # four tag octets: the limit
    bytes.fromhex("3081 80") + bytes.fromhex("0400") * 64,
    bytes.fromhex("3082 0100") + bytes.fromhex("0400") * 128,
    bytes.fromhex("3004 a002 0500"),
    _nested(der.MAX_DEPTH + 1),  # the innermost value at depth MAX_DEPTH
]


@pytest.mark.parametrize("blob", VALID_STANDALONE, ids=lambda b: b.hex()[:24])
def test_standalone_valid_values_pass(blob: bytes) -> None:
    assert der.walk(blob) == len(blob)
    assert der.walk(blob + bytes(7), allow_zero_padding=True) == len(blob)


def test_read_length_forms() -> None:
    assert der.read_length(b"\x05", 0, 1) == (5, 1)
    assert der.read_length(b"\x81\x80", 0, 2) == (128, 2)
    assert der.read_length(b"\x82\x01\x00", 0, 3) == (256, 3)
    assert der.read_length(b"\x84\x01\x00\x00\x00", 0, 5) == (1 << 24, 5)
    for bad, pattern in [
        (b"\x80", "indefinite"),
        (b"\x81\x05", "non-minimal"),
        (b"\x81\x7f", "non-minimal"),
        (b"\x82\x00\x80", "non-minimal"),
        (b"\x84\x00\xff\xff\xff", "non-minimal"),
        (b"\x85\x01\x00\x00\x00\x00", "5 octets"),
        (b"\x82\x01", "past the end"),
        (b"", "missing"),
    ]:
        with pytest.raises(DERError, match=pattern):
            der.read_length(bad, 0, len(bad))


def test_too_many_nodes_real_bound() -> None:
    def seq_of_nulls(n: int) -> bytes:
        content = b"\x05\x00" * n
        return b"\x30" + _len_octets(len(content)) + content

    at_limit = seq_of_nulls(der.MAX_NODES)
    assert der.walk(at_limit) == len(at_limit)
    with pytest.raises(DERError, match=rf"more than {der.MAX_NODES} values"):
        der.walk(seq_of_nulls(der.MAX_NODES + 1))


# --------------------------------------------------------------- random damage

def _verdict(decode: Callable[..., Directory], blob: bytes) -> Directory | type[Exception]:
    try:
        return decode(blob, padded=False)
    except (DERError, ForeignImageError) as e:
        return type(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(["set", "del", "ins"]), st.integers(0, 10_000),
                  st.integers(0, 255)),
        min_size=1, max_size=4,
    ),
    reseal=st.booleans(),
)
def test_damaged_header_never_raises_anything_else(
    edits: list[tuple[str, int, int]], reseal: bool
) -> None:
    """Byte damage in the directory: DERError/ForeignImageError, or (if the
    result happens to be a valid header) it must re-encode byte for byte."""
    _, start = der.read_length(HEADER, 1, len(HEADER))
    body = bytearray(HEADER[start:-34])
    for op, where, value in edits:
        i = where % (len(body) + 1)
        if op == "set" and i < len(body):
            body[i] = value
        elif op == "del" and i < len(body):
            del body[i]
        else:
            body.insert(i, value)
    if reseal:
        digest = hashlib.sha256(bytes(body)).digest()
        content = bytes(body) + b"\x04\x20" + digest
        blob = b"\x30" + _len_octets(len(content)) + content
    else:
        blob = HEADER[:start] + bytes(body) + HEADER[-34:]
    verdict = _verdict(codec.decode_header, blob)
    # The pyasn1 reference decoder must agree.
    assert _verdict(asn1.decode_header, blob) == verdict
    if isinstance(verdict, Directory):
        assert codec.encode_header(verdict) == blob, "a non-canonical header was accepted"


def test_non_canonical_named_bit_string_is_rejected() -> None:
    # '010'B for { live }: DER (X.690 11.2.2) drops trailing zero bits, so only
    # '01'B (03 02 06 40) is canonical.  Both are strict DER at the walker's level.
    blob = _edit(_set(EFIVARS_FLAGS, content=b"\x05\x40"))
    assert der.walk(blob) == len(blob)
    with pytest.raises(DERError, match=r"section efivars: flags.*trailing zero"):
        codec.decode_header(blob, padded=False)
    # An empty flag set spelled as one zero bit.
    blob = _edit(_set((*TPM, 2), content=b"\x07\x00"))
    with pytest.raises(DERError, match=r"section tpm: flags.*trailing zero"):
        codec.decode_header(blob, padded=False)
