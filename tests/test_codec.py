"""nvmgr.format.codec: round trips, schema-level rejections, interop with openssl and dumpasn1.

Schema-invalid inputs are strict DER (they pass :func:`nvmgr.format.der.walk`) with
a correct SHA-256 digest, so the error must come from the real defect, not
from the walker or the digest check.  Every rejection is also required of the
pyasn1 reference decoder (:func:`nvmgr.format.asn1.decode_header`), and the
invalid inputs are built with pyasn1 (:func:`nvmgr.format.asn1.directory_to_asn1`)
or spliced from the writer's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

from nvmgr.errors import DERError, ForeignImageError, NoSpaceError, UsageError
from nvmgr.format import asn1, codec, der, reader, writer
from nvmgr.format.layout import MAX_SECTION_SIZE, SectionSpec, layout
from nvmgr.format.model import (
    ALIGN,
    LUKS_HEADER_SIZE,
    Binding,
    Directory,
    KeySlot,
    Section,
    SectionCrypto,
)
from nvmgr.image.image import Image

OID_TEXT = "2.25.282081522808666108998162609141495310460.1"

# --------------------------------------------------------------- strategies

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z").filter(lambda n: ".." not in n)
texts = st.text(min_size=1, max_size=128)


@st.composite
def section_specs(draw: st.DrawFn) -> list[SectionSpec]:
    chosen = draw(st.lists(names, max_size=6, unique=True))
    specs = []
    for name in chosen:
        binding = draw(st.sampled_from(list(Binding)))
        if binding.live:
            capacity = 512 * draw(st.integers(1, MAX_SECTION_SIZE // 512))
        else:
            capacity = draw(st.integers(1, MAX_SECTION_SIZE))
        encrypted = not binding.live and draw(st.booleans())
        device = draw(st.none() | texts)
        specs.append(SectionSpec(name, capacity, binding, encrypted, device))
    return specs


key_slots = st.lists(
    st.builds(
        KeySlot,
        key_id=st.binary(min_size=8, max_size=8),
        wrapped_key=st.binary(min_size=40, max_size=40),
        label=st.none() | texts,
    ),
    min_size=1,
    max_size=8,
)


@st.composite
def directories(draw: st.DrawFn) -> Directory:
    specs = draw(section_specs())
    d = layout(
        specs,
        image_uuid=uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))),
        domain_uuid=draw(st.none() | st.uuids()),
    )
    d.generation = draw(st.integers(0, 2**63 - 1))
    staged = False
    for s in d.sections:
        s.length = draw(st.integers(0, s.capacity))
        s.crc32 = draw(st.integers(0, 0xFFFFFFFF))
        if s.encrypted and (s.length or draw(st.booleans())):
            s.crypto = SectionCrypto(
                iv=draw(st.binary(min_size=16, max_size=16)),
                mac=draw(st.binary(min_size=32, max_size=32)),
            )
        elif s.encrypted:
            s.crc32 = 0  # empty and never written
        if s.live:
            s.dirty = draw(st.booleans())
            if not staged and draw(st.booleans()):  # a put staged in scratch
                s.home, s.offset, staged = s.offset, d.scratch_offset, True
        elif draw(st.booleans()):  # the slots have ping-ponged
            assert s.spare is not None
            s.offset, s.spare = s.spare, s.offset
    if any(s.encrypted for s in d.sections):
        d.key_slots = draw(key_slots)
    else:
        d.key_slots = draw(st.none() | key_slots)
    return d


# --------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=directories())
def test_round_trip(d: Directory) -> None:
    blob = codec.encode_header(d)
    assert codec.header_length(blob) == len(blob)
    assert asn1.encode_directory(d) == writer.encode_directory(d)
    assert der.walk(blob) == len(blob)
    back = codec.decode_header(blob, padded=False)
    assert back == d
    for ref in _reference_decoders():
        assert ref(blob, padded=False) == d
    assert codec.encode_header(back) == blob
    # Zero padding up to the header area is what an image holds.
    assert codec.decode_header(blob + bytes(d.header_area - len(blob)), padded=True) == d
    # The pyasn1-modules habit: decode, no rest, re-encode, compare.
    value, rest = der_decoder.decode(blob, asn1Spec=asn1.HeaderCopy())
    assert rest == b""
    assert bytes(der_encoder.encode(value)) == blob
    assert bytes(value["digest"]) == hashlib.sha256(writer.encode_directory(d)).digest()
    assert str(value["directory"]["format"]) == OID_TEXT


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=directories())
def test_value_notation_names_every_section_and_binding(d: Directory) -> None:
    text = asn1.value_notation(d)
    assert text.startswith("directory Directory ::= {")
    assert "format { 2 25 282081522808666108998162609141495310460 1 }" in text
    for s in d.sections:
        assert f'name "{s.name}"' in text
        assert f"binding {s.binding.name.lower()}" in text
    assert f"generation {d.generation}" in text


def test_value_notation_fixed_example() -> None:
    d = _base()
    d.sections[1].crypto = SectionCrypto(iv=b"\x11" * 16, mac=b"\x22" * 32)
    d.sections[1].length = 5
    text = asn1.value_notation(d)
    for expected in [
        'name "efivars"', "binding pflash", "flags { live }",
        'name "tpm-state"', "binding tpm", "flags { encrypted }",
        'name "eeprom0"', "binding opaque", "flags { }",
        "scheme aes256CbcHmacSha256", "iv '" + "11" * 16 + "'H",
        "domainUUID '" + d.domain_uuid.hex.upper() + "'H",  # type: ignore[union-attr]
        'label "file"',
    ]:
        assert expected in text, expected


def test_encoded_header_is_minimal_for_each_length_form() -> None:
    # 0-127, 128-255 and >= 256 bytes of directory take the three length forms.
    for n in (0, 1, 40):
        d = layout([SectionSpec(f"s{i}", 4096) for i in range(n)])
        blob = codec.encode_header(d)
        assert bytes(der_encoder.encode(asn1.directory_to_asn1(d))) == writer.encode_directory(d)
        assert codec.decode_header(blob, padded=False) == d
        assert codec.encode_header(codec.decode_header(blob, padded=False)) == blob


def test_encode_refuses_a_directory_larger_than_its_area() -> None:
    specs = [SectionSpec(f"s{i}", 4096, device="d" * 128) for i in range(500)]
    d = layout(specs, header_area=65536)
    with pytest.raises(NoSpaceError, match=r"header area holds 65536"):
        codec.encode_header(d)
    d.header_area = 131072
    d.sections = layout(specs, header_area=131072).sections
    d.image_size = layout(specs, header_area=131072).image_size
    assert codec.decode_header(codec.encode_header(d), padded=False) == d


# --------------------------------------------------------------- builders for invalid input


def _base() -> Directory:
    d = layout(
        [
            SectionSpec("efivars", 540672, Binding.PFLASH),
            SectionSpec("tpm-state", 65536, Binding.TPM, encrypted=True),
            SectionSpec("eeprom0", 256, Binding.OPAQUE, device="nic0"),
        ],
        image_uuid=uuid.UUID("6f1c4b0e-8a57-4d9a-9a83-2f5f7c0d1e22"),
        domain_uuid=uuid.UUID("0b4e38de-11d5-4c3c-9f7b-5f6a1d2e3c44"),
    )
    d.key_slots = [KeySlot(b"\x01" * 8, b"\x02" * 40, "file")]
    return d


def _seal_der(directory_der: bytes) -> bytes:
    """A HeaderCopy around *directory_der* with its correct digest."""
    content = directory_der + writer.tlv(0x04, hashlib.sha256(directory_der).digest())
    return writer.tlv(0x30, content)


def _seal(a: Any) -> bytes:
    return _seal_der(bytes(der_encoder.encode(a)))


def _asn1(d: Directory | None = None) -> Any:
    return asn1.directory_to_asn1(d or _base())


def _reference_decoders() -> list[Callable[..., Directory]]:
    """Other decoders that must give decode_header's verdict (the pyasn1 reference)."""
    return [asn1.decode_header]


def _rejects(blob: bytes, pattern: str, exc: type[Exception] = DERError) -> None:
    """*blob* is strict DER, yet decode_header rejects it with *pattern* (and
    the reference decoder rejects it too, with the same class of error)."""
    assert der.walk(blob) == len(blob)
    with pytest.raises(exc, match=pattern) as info:
        codec.decode_header(blob, padded=False)
    assert "header digest does not match" not in str(info.value)
    for ref in _reference_decoders():
        with pytest.raises(exc) as ref_info:
            ref(blob, padded=False)
        assert "header digest does not match" not in str(ref_info.value)


def _children(content: bytes) -> list[bytes]:
    """Split DER content into its TLVs (valid, short-tag DER only)."""
    out = []
    pos = 0
    while pos < len(content):
        length, start = der.read_length(content, pos + 1, len(content))
        out.append(content[pos : start + length])
        pos = start + length
    return out


def _content(tlv: bytes) -> bytes:
    _, start = der.read_length(tlv, 1, len(tlv))
    return tlv[start:]


def _directory_elements(d: Directory | None = None) -> list[bytes]:
    return _children(_content(writer.encode_directory(d or _base())))


def _seq(*tlvs: bytes, tag: int = 0x30) -> bytes:
    return writer.tlv(tag, b"".join(tlvs))


def test_builders_reproduce_the_valid_header() -> None:
    d = _base()
    assert _seal(_asn1(d)) == codec.encode_header(d)
    assert _seal_der(_seq(*_directory_elements(d))) == codec.encode_header(d)
    assert codec.decode_header(_seal(_asn1(d)), padded=False) == d


# --------------------------------------------------------------- directory-level rejections


def test_unknown_version() -> None:
    a = _asn1()
    a["version"] = 2
    _rejects(_seal(a), r"directory version 2 is not supported")


def test_version_zero() -> None:
    a = _asn1()
    a["version"] = 0
    _rejects(_seal(a), r"directory version 0 is not supported")


def test_foreign_format_oid() -> None:
    a = _asn1()
    a["format"] = univ.ObjectIdentifier("1.2.840.113549.1.1.1")
    _rejects(_seal(a), r"no nvmgr directory", ForeignImageError)


def test_foreign_format_oid_after_decoding() -> None:
    # The probe finds nvmgr's OID; the decoded directory must still carry it.
    a = _asn1()
    a["format"] = univ.ObjectIdentifier(OID_TEXT + ".7")
    with pytest.raises(ForeignImageError, match=r"format identifier .*\.1\.7 is not nvmgr's"):
        asn1.directory_from_asn1(a)


def test_the_reader_names_a_foreign_format_identifier() -> None:
    # The probe in front of the reader stops this in practice (the bytes do not
    # start like an nvmgr header); the reader's own check says the same thing.
    els = _directory_elements()
    els[0] = writer.tlv(0x06, reader.FORMAT + b"\x07")
    blob = _seal_der(_seq(*els))
    with pytest.raises(ForeignImageError, match=r"format identifier 2\.25\.\d+\.1\.7 is not nvmgr's"):
        reader.read_header(blob)
    _rejects(blob, r"no nvmgr directory", ForeignImageError)
    assert reader.oid_text(reader.FORMAT) == OID_TEXT
    assert reader.oid_text(b"\x2b\x86") == "2b86"  # cut inside an arc: shown as hex


def test_missing_field() -> None:
    els = _directory_elements()
    # Drop imageSize (index 5): the scratch Extent arrives where an INTEGER is due.
    _rejects(_seal_der(_seq(*els[:5], *els[6:])),
             r"schema: (expected imageSize|<TagSet object, tags 0:32:16> not in asn1Spec)")
    # Drop the digest from the HeaderCopy.
    _rejects(_seq(_seq(*els)),
             r"schema: (digest is missing|.*HeaderCopy has uninitialized components)")


def test_missing_field_in_a_section() -> None:
    els = _directory_elements()
    sections = _children(_content(els[7]))
    eeprom = _children(_content(sections[2]))
    assert _content(eeprom[0]) == b"eeprom0"
    sections[2] = _seq(*eeprom[:6], *eeprom[7:])  # no crc32
    els[7] = _seq(*sections)
    # crc32 missing: offset moves up, and [0] spare arrives where offset is due.
    _rejects(_seal_der(_seq(*els)),
             r"schema: (expected offset .*found tag 0x80|<TagSet object, tags 128:0:0> not in)")


# The reader's words, or pyasn1's.
EXTRA = r"schema: (unexpected element .*after the last field|Excessive components|.*not in asn1Spec)"


def test_extra_trailing_element_in_directory() -> None:
    els = _directory_elements()
    _rejects(_seal_der(_seq(*els, bytes.fromhex("020100"))), EXTRA)


def test_extra_trailing_element_in_extent() -> None:
    els = _directory_elements()
    scratch = _children(_content(els[6]))
    els[6] = _seq(*scratch, bytes.fromhex("020100"))
    _rejects(_seal_der(_seq(*els)), EXTRA)


def test_extra_trailing_element_in_section() -> None:
    els = _directory_elements()
    sections = _children(_content(els[7]))
    sections[0] = _seq(*_children(_content(sections[0])), bytes.fromhex("020100"))
    els[7] = _seq(*sections)
    _rejects(_seal_der(_seq(*els)), EXTRA)


def test_extra_trailing_element_in_header_copy() -> None:
    blob = codec.encode_header(_base())
    _rejects(_seq(*_children(_content(blob)), bytes.fromhex("0500")), EXTRA)


def test_fields_out_of_order() -> None:
    els = _directory_elements()
    els[3], els[4] = els[4], els[3]  # headerAreaSize before generation: both INTEGERs
    _rejects(_seal_der(_seq(*els)), r"schema: (headerAreaSize 0 is outside|.*65536, 16777216)")


def _extension() -> Any:
    ext = asn1.Extension()
    ext["extnID"] = univ.ObjectIdentifier("1.3.6.1.4.1.99999.1")
    ext["extnValue"] = b"\x05\x00"
    return ext


def test_directory_extension_present() -> None:
    a = _asn1()
    a["extensions"].append(_extension())
    _rejects(_seal(a), r"directory extensions are not defined in version 1")


def test_section_extension_present() -> None:
    a = _asn1()
    a["sections"][2]["extensions"].append(_extension())
    _rejects(_seal(a), r"section eeprom0:? extensions are not defined in version 1")


def test_critical_default_encoded_is_not_canonical() -> None:
    # DER omits a DEFAULT value; an explicit critical FALSE decodes but does
    # not re-encode to the same bytes.  (Spliced: pyasn1 will not encode it.)
    oid = bytes(der_encoder.encode(_extension()["extnID"]))
    ext = _seq(oid, bytes.fromhex("010100"), bytes.fromhex("04020500"))
    blob = _seal_der(_seq(*_directory_elements(), _seq(ext, tag=0xAF)))
    _rejects(blob, r"not in canonical DER form|extensions are not defined in version 1")
    # The same extension without the DEFAULT value reaches the version-1 rule.
    ext = _seq(oid, bytes.fromhex("04020500"))
    blob = _seal_der(_seq(*_directory_elements(), _seq(ext, tag=0xAF)))
    _rejects(blob, r"directory extensions are not defined in version 1")


def test_digest_mismatch() -> None:
    blob = bytearray(codec.encode_header(_base()))
    blob[-1] ^= 0x01
    assert der.walk(bytes(blob)) == len(blob)
    with pytest.raises(DERError, match=r"header digest does not match its directory"):
        codec.decode_header(bytes(blob), padded=False)


def test_digest_over_other_bytes() -> None:
    # A digest of a different (valid) directory does not vouch for this one.
    d = _base()
    other = dataclasses.replace(d, generation=d.generation + 1)
    directory_der = writer.encode_directory(d)
    fake = writer.tlv(0x30, directory_der + writer.tlv(0x04, hashlib.sha256(
        writer.encode_directory(other)).digest()))
    with pytest.raises(DERError, match=r"digest does not match"):
        codec.decode_header(fake, padded=False)


def test_digest_of_wrong_size() -> None:
    directory_der = writer.encode_directory(_base())
    digest = hashlib.sha256(directory_der).digest()
    for bad in (digest[:31], digest + b"\x00"):
        blob = writer.tlv(0x30, directory_der + writer.tlv(0x04, bad))
        _rejects(blob, r"does not match the nvmgr schema")


def test_header_area_not_a_power_of_two() -> None:
    a = _asn1()
    a["headerAreaSize"] = 65536 * 3
    _rejects(_seal(a), r"header area size 196608 is not a power of two")


# --------------------------------------------------------------- section-level rejections


def test_duplicate_names() -> None:
    a = _asn1()
    a["sections"][2]["name"] = "tpm-state"
    _rejects(_seal(a), r"section tpm-state appears twice")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "-x", "a..b", "a b", "é"])
def test_invalid_name(name: str) -> None:
    a = _asn1()
    a["sections"][2]["name"] = name
    _rejects(_seal(a), r"invalid section name")


def _with_eeprom_field(index: int, tlv: bytes) -> bytes:
    """The base header with field *index* of section eeprom0 replaced by *tlv*."""
    els = _directory_elements()
    sections = _children(_content(els[7]))
    fields = _children(_content(sections[2]))
    fields[index] = tlv
    sections[2] = _seq(*fields)
    els[7] = _seq(*sections)
    return _seal_der(_seq(*els))


def _with_name_bytes(raw: bytes) -> bytes:
    """The base header with eeprom0's name replaced by raw UTF8String content."""
    return _with_eeprom_field(0, writer.tlv(0x0C, raw))


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"", r"name must be 1\.\.64 characters, not 0|ValueSizeConstraint.* 1, 64.*SectionName"),
        (b"a" * 65,
         r"name must be 1\.\.64 characters, not 65|ValueSizeConstraint.* 1, 64.*SectionName"),
        (b"\xff\xfe", r"schema: .*not valid UTF-8"),
        (b"a\xc0\xafb", r"schema: .*not valid UTF-8"),  # an overlong "/"
    ],
    ids=["empty", "65-chars", "bad-utf8", "overlong-utf8"],
)
def test_name_outside_its_type(raw: bytes, pattern: str) -> None:
    # SIZE (1..64) and UTF-8 itself: the schema layer rejects these.
    _rejects(_with_name_bytes(raw), pattern)


def test_name_of_64_chars_is_fine() -> None:
    d = layout([SectionSpec("a" * 64, 4096)])
    assert codec.decode_header(codec.encode_header(d), padded=False) == d
    blob = _with_name_bytes(b"b" * 64)
    assert codec.decode_header(blob, padded=False).sections[2].name == "b" * 64


def test_overlapping_sections() -> None:
    a = _asn1()
    a["sections"][2]["offset"] = int(a["sections"][1]["offset"]) + ALIGN
    _rejects(_seal(a), r"section tpm-state overlaps section eeprom0")


def test_overlapping_scratch() -> None:
    a = _asn1()
    a["scratch"]["offset"] = int(a["sections"][0]["offset"])
    _rejects(_seal(a), r"overlaps")


def test_misaligned_offset() -> None:
    a = _asn1()
    a["sections"][2]["offset"] = int(a["sections"][2]["offset"]) + 512
    _rejects(_seal(a), r"section eeprom0: offset \d+ is not 4 KiB aligned")


def test_misaligned_spare() -> None:
    a = _asn1()
    a["sections"][2]["spare"] = int(a["sections"][2]["spare"]) + 1
    _rejects(_seal(a), r"section eeprom0: offset \d+ is not 4 KiB aligned")


def test_section_past_image_size() -> None:
    d = _base()
    a = _asn1(d)
    a["imageSize"] = d.image_size - ALIGN
    _rejects(_seal(a), r"section eeprom0: \[\d+, \d+\) lies outside the image data area")


def test_section_inside_header_area() -> None:
    a = _asn1()
    a["sections"][2]["offset"] = 0
    _rejects(_seal(a), r"section eeprom0: \[0, \d+\) lies outside the image data area")


def test_length_exceeds_capacity() -> None:
    a = _asn1()
    a["sections"][2]["length"] = 257
    _rejects(_seal(a), r"section eeprom0: length 257 exceeds capacity 256")


def test_live_and_encrypted_is_a_luks_volume_that_holds_its_header() -> None:
    a = _asn1()
    a["sections"][0]["flags"] = asn1.SectionFlags([1, 1])  # { encrypted, live }
    _rejects(_seal(a), r"section efivars: an encrypted live section must be larger than "
             r"its LUKS header \(2068480 bytes\)")


def test_a_luks_section_round_trips_and_never_carries_nvmgr_crypto() -> None:
    d = layout([SectionSpec("efivars", 540672 + LUKS_HEADER_SIZE, Binding.PFLASH, True)],
               image_uuid=uuid.UUID("6f1c4b0e-8a57-4d9a-9a83-2f5f7c0d1e22"))
    d.key_slots = [KeySlot(b"\x01" * 8, b"\x02" * 40, "file")]
    s = d.sections[0]
    s.length, s.crc32 = s.capacity, 0x1234  # a volume: header and payload, no crypto
    got = codec.decode_header(codec.encode_header(d), padded=True).sections[0]
    assert (got.encrypted, got.live, got.luks, got.crypto) == (True, True, True, None)
    assert got.payload == 540672
    s.crypto = SectionCrypto(iv=b"\0" * 16, mac=b"\0" * 32)
    with pytest.raises(DERError, match="a live section is encrypted by QEMU"):
        codec.encode_header(d)


def test_live_flag_disagrees_with_binding() -> None:
    a = _asn1()
    a["sections"][0]["flags"] = asn1.SectionFlags([])
    _rejects(_seal(a), r"section efivars: the live flag disagrees with binding PFLASH")


def test_crypto_without_encrypted_flag() -> None:
    d = _base()
    d.sections[2].crypto = SectionCrypto(iv=b"\x00" * 16, mac=b"\x00" * 32)
    d.sections[2].length = 1
    a = _asn1(d)
    _rejects(_seal(a), r"section eeprom0: crypto parameters on a section not flagged encrypted")


def test_encrypted_data_without_crypto() -> None:
    a = _asn1()
    a["sections"][1]["length"] = 10
    _rejects(_seal(a), r"section tpm-state: encrypted data without crypto parameters")


def test_encrypted_without_key_slots() -> None:
    d = _base()
    d.key_slots = None
    _rejects(_seal(_asn1(d)), r"section tpm-state is encrypted but the image has no keys")


def test_unknown_flag_bits() -> None:
    a = _asn1()
    a["sections"][2]["flags"] = asn1.SectionFlags([0, 0, 0, 1])
    _rejects(_seal(a), r"flags carry 4 bits, version 1 defines 3")


def test_named_bit_string_with_trailing_zero() -> None:
    a = _asn1()
    a["sections"][0]["flags"] = asn1.SectionFlags([0, 1, 0])
    _rejects(_seal(a), r"section efivars: flags.*trailing zero bit")


@pytest.mark.parametrize(
    ("field", "value"),
    [("binding", 5), ("crc32", 2**32), ("capacity", -1)],
)
def test_values_outside_their_range(field: str, value: int) -> None:
    pattern = rf"schema: ({field} {value} is outside|.*ValueConstraintError\({value}\))"
    index, tag = {"binding": (1, 0x0A), "capacity": (3, 0x02), "crc32": (6, 0x02)}[field]
    content = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    _rejects(_with_eeprom_field(index, writer.tlv(tag, content)), pattern)


SPARE, DEVICE = 8, 9  # eeprom0's fields: ..., offset, [0] spare, [2] device


def test_eeprom_fields_are_where_the_tests_think() -> None:
    fields = _children(_content(_children(_content(_directory_elements()[7]))[2]))
    assert fields[SPARE][0] == 0x80 and fields[DEVICE][0] == 0x82
    assert _content(fields[DEVICE]) == b"nic0"
    assert _with_eeprom_field(SPARE, fields[SPARE]) == codec.encode_header(_base())


@pytest.mark.parametrize(
    ("index", "tlv", "pattern"),
    [
        # The walker checks minimal INTEGERs of universal class only: an IMPLICIT
        # [0] INTEGER is the schema layer's to check.
        (SPARE, "80 04 00 00 c0 00", r"not a minimal INTEGER|not in canonical DER form"),
        (SPARE, "80 00", r"not a minimal INTEGER|not in canonical DER form"),
        (SPARE, "80 01 ff", r"spare -1 is outside|ValueRangeConstraint"),
        # [2] UTF8String in BER's constructed form.
        (DEVICE, "a2 06 0c 04 6e 69 63 30", r"tag 0xa2|not in canonical DER form"),
    ],
    ids=["spare-non-minimal", "spare-empty", "spare-negative", "device-constructed"],
)
def test_implicitly_tagged_values_must_be_canonical(index: int, tlv: str, pattern: str) -> None:
    _rejects(_with_eeprom_field(index, bytes.fromhex(tlv)), pattern)


def test_validate_is_applied_before_encoding() -> None:
    d = _base()
    d.sections[2].name = "../x"
    with pytest.raises(DERError, match="invalid section name"):
        codec.encode_header(d)
    with pytest.raises(DERError, match="invalid section name") as ei:
        codec.validate(d)
    assert isinstance(ei.value.__cause__, UsageError)  # the naming rule's own words


def test_encoding_refuses_what_decoding_refuses() -> None:
    # The encryption-parameter rules are validate()'s, so they hold for writing too.
    d = _base()
    d.sections[2].crypto = SectionCrypto(iv=b"\x00" * 16, mac=b"\x00" * 32)
    with pytest.raises(DERError, match="crypto parameters on a section not flagged encrypted"):
        codec.encode_header(d)
    d = _base()
    d.sections[1].length = 10
    with pytest.raises(DERError, match="encrypted data without crypto parameters"):
        codec.encode_header(d)


# --------------------------------------------------------------- interop


def _real_header(tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "vm.nvram"
    specs = [
        SectionSpec("efivars", 540672, Binding.PFLASH),
        SectionSpec("tpm-state", 65536, Binding.TPM),
        SectionSpec("nic0.eeprom", 256, device="net0"),
        SectionSpec("fru_1+x", 1024, Binding.FWCFG),
    ]
    with Image.create(str(path), specs, domain_uuid=uuid.uuid4()) as img:
        img.put("tpm-state", b"state" * 100)
        img.put("efivars", b"\x00" * 4096)
    raw = path.read_bytes()
    n = codec.header_length(raw)
    out = tmp_path / "header-a.der"
    out.write_bytes(raw[:n])
    assert codec.decode_header(raw[:n], padded=False).find("tpm-state") is not None
    return out, [s.name for s in specs]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_openssl_asn1parse_reads_a_real_header(tmp_path: Path) -> None:
    der_file, section_names = _real_header(tmp_path)
    res = subprocess.run(
        [_tool("openssl"), "asn1parse", "-inform", "DER", "-in", str(der_file)],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert f"OBJECT            :{OID_TEXT}" in res.stdout
    for name in section_names:
        assert re.search(rf"UTF8STRING\s+:{re.escape(name)}$", res.stdout, re.M), name
    assert "error" not in res.stderr.lower()


def test_dumpasn1_reads_a_real_header(tmp_path: Path) -> None:
    der_file, section_names = _real_header(tmp_path)
    res = subprocess.run([_tool("dumpasn1"), str(der_file)], capture_output=True, text=True,
                         check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert re.search(r"\b0 warnings, 0 errors\b", out), out
    assert "Error" not in out
    for name in section_names:
        assert f"UTF8String '{name}'" in out, name


def test_dumpasn1_flags_a_broken_header(tmp_path: Path) -> None:
    # The check above can fail: dumpasn1 does report damage.
    der_file, _ = _real_header(tmp_path)
    der_file.write_bytes(der_file.read_bytes()[:-10])  # cut into the digest
    res = subprocess.run([_tool("dumpasn1"), str(der_file)], capture_output=True, text=True,
                         check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 or "Error" in out or not re.search(r"\b0 errors\b", out)


def test_openssl_parses_encrypted_directory(tmp_path: Path) -> None:
    d = _base()
    d.sections[1].length = 3
    d.sections[1].crypto = SectionCrypto(iv=b"\x11" * 16, mac=b"\x22" * 32)
    der_file = tmp_path / "enc.der"
    der_file.write_bytes(codec.encode_header(d))
    res = subprocess.run(
        [_tool("openssl"), "asn1parse", "-inform", "DER", "-in", str(der_file)],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert OID_TEXT in res.stdout
    assert "[HEX DUMP]:" + "11" * 16 in res.stdout  # the section's IV
    assert "[HEX DUMP]:" + "02" * 40 in res.stdout  # the wrapped key
    for s in d.sections:
        assert f":{s.name}" in res.stdout


def test_section_round_trip_keeps_every_optional_field() -> None:
    d = _base()
    s = d.sections[0]
    s.home, s.offset, s.dirty, s.length, s.crc32 = s.offset, d.scratch_offset, True, 512, 7
    back = codec.decode_header(codec.encode_header(d), padded=False)
    assert back.sections[0] == Section(
        name="efivars", binding=Binding.PFLASH, capacity=540672, reserved=540672,
        offset=d.scratch_offset, length=512, crc32=7, dirty=True, home=s.home,
    )
    assert back.sections[2].device == "nic0"
    assert back == d
