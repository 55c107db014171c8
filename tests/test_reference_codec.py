"""nvmgr's own DER reader/writer against pyasn1, the reference implementation.

The product path (nvmgr.format.reader, nvmgr.format.writer, framed by
nvmgr.format.codec) must produce the same bytes and the same model as pyasn1
driven by nvmgr.format.asn1 on every directory, and both decoders must reject
the same inputs.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmgr.errors import DERError, ForeignImageError
from nvmgr.format import asn1, codec, writer
from nvmgr.format.layout import SectionSpec, layout
from nvmgr.format.model import (
    Binding,
    Directory,
    KeySlot,
    Member,
    Orphaned,
    Runner,
    SectionCrypto,
)

NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True).filter(
    lambda n: ".." not in n)


@st.composite
def directories(draw: st.DrawFn) -> Directory:
    names = draw(st.lists(NAME, max_size=12, unique=True))
    encrypted_image = draw(st.booleans())
    specs = []
    for n in names:
        binding = draw(st.sampled_from(list(Binding)))
        size = draw(st.sampled_from([512, 4096, 540672, 1 << 20])) if binding.live else \
            draw(st.integers(1, 1 << 30))
        specs.append(SectionSpec(n, size, binding,
                                 encrypted_image and not binding.live and draw(st.booleans()),
                                 draw(st.none() | st.text(min_size=1, max_size=20))))
    d = layout(specs, domain_uuid=draw(st.none() | st.uuids()))
    d.generation = draw(st.integers(0, 2**63 - 1))
    for s in d.sections:
        s.length = draw(st.integers(0, s.capacity))
        s.crc32 = draw(st.integers(0, 2**32 - 1))
        s.dirty = s.live and draw(st.booleans())
        if s.encrypted:
            s.crypto = SectionCrypto(os.urandom(16), os.urandom(32))
    if encrypted_image:
        d.key_slots = [KeySlot(os.urandom(8), os.urandom(40), draw(st.none() | st.just("file")))
                       for _ in range(draw(st.integers(1, 8)))]
    if draw(st.booleans()):
        d.members = [Member(1, "/var/lib/nvmgr/m1.img", uuid.uuid4(),
                            draw(st.none() | st.sampled_from(["raw", "qcow2"])),
                            draw(st.none() | st.integers(0, 2**63 - 1)))]
    else:  # a member image names its parent (members do not nest)
        d.parent = draw(st.none() | st.uuids())
    runners = st.none() | st.builds(Runner, st.binary(min_size=16, max_size=16),
                                    st.text(min_size=1, max_size=40))
    d.runner, d.incoming = draw(runners), draw(runners)
    if d.domain_uuid is not None:  # an owner that was undefined
        d.orphaned = draw(st.none() | st.builds(
            Orphaned, st.integers(0, 2**63 - 1), st.none() | st.text(min_size=1, max_size=40)))
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directories())
def test_writer_and_pyasn1_encode_the_same_bytes(d: Directory) -> None:
    assert writer.encode_directory(d) == asn1.encode_directory(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directories())
def test_reader_and_pyasn1_decode_to_the_same_model(d: Directory) -> None:
    blob = codec.encode_header(d)
    assert codec.decode_header(blob, padded=False) == d
    assert asn1.decode_header(blob, padded=False) == d


def _verdict(fn: object, blob: bytes) -> str:
    try:
        fn(blob, padded=False)  # type: ignore[operator]
        return "accepted"
    except (DERError, ForeignImageError) as e:
        return type(e).__name__


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_both_decoders_reject_the_same_damaged_headers(data: st.DataObject) -> None:
    """Flip, drop or insert bytes anywhere: the fast reader never accepts what pyasn1 rejects."""
    d = layout([SectionSpec("uefi-vars", 540672, Binding.PFLASH),
                SectionSpec("tpm-permall", 65536, Binding.TPM, device="tpm0")],
               domain_uuid=uuid.uuid4())
    blob = bytearray(codec.encode_header(d))
    pos = data.draw(st.integers(0, len(blob) - 1))
    how = data.draw(st.sampled_from(["flip", "drop", "insert"]))
    if how == "flip":
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif how == "drop":
        del blob[pos]
    else:
        blob.insert(pos, data.draw(st.integers(0, 255)))
    fast = _verdict(codec.decode_header, bytes(blob))
    ref = _verdict(asn1.decode_header, bytes(blob))
    assert (fast == "accepted") == (ref == "accepted"), (how, pos, fast, ref)


def test_the_command_line_does_not_load_pyasn1_or_cryptography_to_read() -> None:
    import subprocess
    import sys

    code = ("import sys, nvmgr.cli, nvmgr.image.image; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyasn1', 'cryptography'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("sections", [0, 1, 1024])
def test_large_directories_round_trip(sections: int) -> None:
    d = layout([SectionSpec(f"s{i}", 4096) for i in range(sections)])
    blob = codec.encode_header(d)
    assert writer.encode_directory(d) == asn1.encode_directory(d)
    assert codec.decode_header(blob, padded=False) == d
