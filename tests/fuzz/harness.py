"""Three fuzz targets for nvmgr, a pure-Python mutation engine and a minimizer.

The contract every target holds (issue 10): a malformed input makes nvmgr
raise one of its own errors (:class:`nvmgr.errors.NvmgrError`), never
IndexError, ValueError, struct.error, MemoryError, RecursionError, an lxml
error or anything else, within 1 s and 200 MB.  A well-formed input may
succeed; whatever it returns is then printed (text and JSON), as the CLI
would, so that values which decode but cannot be shown are caught too.

Targets:

``der``
    The DER directory decoder (:func:`nvmgr.format.codec.decode_header`, with
    :func:`~nvmgr.format.codec.peek` and
    :func:`~nvmgr.format.codec.header_length`).
``image``
    An image whose header copies are replaced by the input (mutated, then
    given a valid SHA-256 digest so that it passes the first check): open it,
    list its sections, ``check`` it and ``get`` every section, without the
    key and with it.
``xml``
    The domain XML parser and planner: parse, plan, render the plan, rewrite
    the domain with nvmgr's wiring and strip it again.

Inputs of ``der`` and ``image`` start with one mode byte (see
:func:`_frame` and :class:`ImageTarget`); the rest is the directory's DER,
which the target frames with its digest, or a whole header copy as is.

Everything is deterministic for a given seed (:class:`random.Random`), so a
run is reproducible.  Nothing here is imported by nvmgr; ``tests/test_fuzz.py``
runs each target briefly, ``bench/fuzz.py`` runs them long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from nvmgr.errors import NvmgrError
from nvmgr.format import codec, writer
from nvmgr.format.layout import SectionSpec, layout
from nvmgr.format.model import Binding, Directory, KeySlot, Member, SectionCrypto
from nvmgr.format.reader import OCTET_STRING, SEQUENCE

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "fuzz-corpus"
KEY = bytes(range(32))

#: Values that break code which trusts numbers: limits, signs, sizes of types.
INTERESTING_INTS = [
    0, 1, -1, 511, 512, 4095, 4096, 4097, 65535, 65536, 131072, 2**31 - 1, 2**31, 2**32 - 1,
    2**32, 2**40, 2**40 + 1, 2**48, 2**48 + 4096, 2**53, 2**62, 2**63 - 1, 2**63, 2**64,
    -(2**63), 10**30, -(10**30), 10**5000, -(10**5000),
]


# ----------------------------------------------------------------- failures


@dataclasses.dataclass
class Failure:
    """An input that broke the contract."""

    target: str
    kind: str  # exception type name, or "timeout"
    detail: str
    data: bytes

    def signature(self) -> tuple[str, str]:
        return self.target, self.kind


class Timeout(Exception):
    """An input took longer than the time limit."""


def check_contract(target: Target, data: bytes, *, limit: float = 1.0) -> Failure | None:
    """Run *data* through *target*; a :class:`Failure` if it broke the contract.

    The time limit is checked after the run (a hang is caught by the caller's
    process limits in ``bench/fuzz.py``; in the suite inputs are short).
    """
    start = time.perf_counter()
    try:
        target.run(data)
    except NvmgrError:
        pass
    except Exception as e:  # the contract: nothing but nvmgr's own errors
        return Failure(target.name, type(e).__name__, _short(e), data)
    elapsed = time.perf_counter() - start
    if elapsed > limit:
        return Failure(target.name, "timeout", f"{elapsed:.2f} s", data)
    return None


def _short(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - an unprintable exception is still a finding
        text = f"<{type(e).__name__} that cannot be printed>"
    return text[:300]


# ----------------------------------------------------------------- mutation


def mutate_bytes(rng: random.Random, data: bytes, tokens: list[bytes],
                 others: list[bytes]) -> bytes:
    """One to four byte-level edits of *data* (flip, set, insert, delete,
    duplicate, splice another input, insert a dictionary token)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            i = rng.randrange(n + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = rng.randrange(n + 1)
            buf[j:j] = buf[i : i + rng.randint(1, 64)]
        elif op == 5 and others:
            other = rng.choice(others)
            if other:
                i, j = rng.randrange(n + 1), rng.randrange(len(other))
                buf[i:] = other[j:]
        elif op == 6 and tokens:
            i = rng.randrange(n + 1)
            buf[i:i] = rng.choice(tokens)
        elif op == 7 and tokens and n:
            i = rng.randrange(n)
            tok = rng.choice(tokens)
            buf[i : i + len(tok)] = tok
        elif op == 8 and n > 2:  # DER length bytes are where decoders trust numbers
            i = rng.randrange(n - 1)
            buf[i + 1] = rng.choice((0x00, 0x7F, 0x80, 0x81, 0x82, 0x84, 0x85, 0xFF))
    return bytes(buf)


def _rand_int(rng: random.Random) -> int:
    if rng.random() < 0.7:
        return rng.choice(INTERESTING_INTS)
    return rng.randrange(-(2**20), 2**50) // 4096 * 4096 * rng.choice((1, 1, 1, -1))


def mutate_directory(rng: random.Random, d: Directory) -> Directory:
    """One to three edits of the model: the numbers, flags, members and
    names a directory holds (the writer encodes whatever results)."""
    d = dataclasses.replace(d, sections=[dataclasses.replace(s) for s in d.sections])
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        s = rng.choice(d.sections) if d.sections else None
        if op == 0:
            d.image_size = _rand_int(rng)
        elif op == 1:
            d.scratch_offset, d.scratch_length = _rand_int(rng), _rand_int(rng)
        elif op == 2:
            d.header_area = rng.choice((65536, 131072, 4096, 1 << 24, 1 << 25, 0, -1))
        elif op == 3:
            d.generation = rng.choice((0, 1, 2**63 - 1, 2**63, -1, d.generation + 1))
        elif op == 4 and s is not None:
            field = rng.choice(("capacity", "reserved", "length", "offset", "crc32"))
            setattr(s, field, _rand_int(rng))
        elif op == 5 and s is not None:
            field = rng.choice(("spare", "home"))
            setattr(s, field, rng.choice((None, _rand_int(rng), s.offset, d.scratch_offset)))
        elif op == 6 and s is not None:
            s.member = rng.choice((None, 1, 2, 64))
            if s.member is not None and rng.random() < 0.8:
                d.members = [Member(s.member, rng.choice(("/tmp/m1", "m", "/dev/zero")),
                                    uuid.UUID(int=rng.getrandbits(128)))]
        elif op == 7 and s is not None:
            s.binding = rng.choice(list(Binding))
            s.dirty = rng.random() < 0.5
        elif op == 8 and s is not None:
            s.encrypted = not s.encrypted
            if rng.random() < 0.5:
                s.crypto = SectionCrypto(iv=bytes(16), mac=bytes(32)) if s.crypto is None else None
        elif op == 9 and s is not None:
            s.device = rng.choice((None, "x" * 128, "x" * 129, "tpm0", "é" * 64))
            s.name = rng.choice((s.name, "a" * 64, "a" * 65, "..", "../x", s.name + ".1"))
        elif op == 10:
            d.key_slots = rng.choice((None, [], [KeySlot(bytes(8), bytes(40))] * 9,
                                      d.key_slots))
        elif op == 11 and len(d.sections) > 1:
            a, b = rng.sample(range(len(d.sections)), 2)
            d.sections[a].offset = d.sections[b].offset
    return d


def frame(directory_der: bytes, mac: bytes | None = None) -> bytes:
    """A HeaderCopy around *directory_der* with its correct SHA-256 digest
    (and *mac*, the directory MAC of an encrypted image)."""
    digest = hashlib.sha256(directory_der).digest()
    tail = writer.tlv(OCTET_STRING, digest)
    if mac is not None:
        tail += writer.tlv(0x80, mac)
    return writer.tlv(SEQUENCE, directory_der + tail)


def _frame(mode: int, body: bytes) -> bytes:
    """Mode bit 0: *body* is a directory to frame with a valid digest; else a
    header copy used as it is."""
    return frame(body) if mode & 1 else body


def _directory_der(header: bytes) -> bytes:
    """The directory's DER inside a header copy this harness wrote."""
    _, pos = _length(header, 1)
    _, start = _length(header, pos + 1)
    length, _ = _length(header, pos + 1)
    return header[pos : start + length]


def _length(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def _decode_model(body: bytes) -> Directory | None:
    try:
        return codec.decode_header(frame(body), padded=False)
    except NvmgrError:
        return None


# ----------------------------------------------------------------- seeds


def seed_directories() -> list[Directory]:
    """Directories that exercise every field: keys, members, crypto, devices,
    live sections staged in scratch, many sections."""
    specs = [
        SectionSpec("uefi-vars", 540672, Binding.PFLASH),
        SectionSpec("tpm-permall", 64 * 1024, Binding.TPM, device="tpm0"),
        SectionSpec("nic-eeprom", 8192),
        SectionSpec("pci-vpd", 32768, Binding.FWCFG),
        SectionSpec("spapr-nvram", 65536, Binding.BLOCK, device="nvram0"),
    ]
    out = []
    d = layout(specs, image_uuid=uuid.UUID(int=1), domain_uuid=uuid.UUID(int=2))
    out.append(d)
    e = layout([dataclasses.replace(s, encrypted=not s.binding.live) for s in specs],
               image_uuid=uuid.UUID(int=3))
    e.key_slots = [KeySlot(bytes(range(8)), bytes(40), "primary"), KeySlot(bytes(8), bytes(40))]
    for s in e.sections:
        if s.encrypted:
            s.length, s.crc32 = 100, 0x12345678
            s.crypto = SectionCrypto(iv=bytes(16), mac=bytes(range(32)))
    out.append(e)
    m = layout(specs[:3], image_uuid=uuid.UUID(int=4))
    m.members = [Member(1, "/var/lib/libvirt/nvmgr/vm1.m1", uuid.UUID(int=5))]
    m.sections[2].member = 1
    out.append(m)
    st = layout(specs, image_uuid=uuid.UUID(int=6))
    live = st.sections[0]
    live.home, live.offset, live.length = live.offset, st.scratch_offset, 4096
    out.append(st)
    out.append(layout([SectionSpec(f"s{i}", 4096 * (i % 5 + 1)) for i in range(150)],
                      image_uuid=uuid.UUID(int=7)))
    out.append(layout([], image_uuid=uuid.UUID(int=8)))
    return out


DER_TOKENS = [
    b"\x02\x01\x00", b"\x02\x01\xff", b"\x02\x09\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x02\x82\x01\x00", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff", b"\x04\x10", b"\x0c\x01a",
    b"\xa0\x00", b"\xaf\x00", b"\xa4\x01\x01", b"\x80\x01\x01", b"\x84\x01\x40",
    b"\x03\x02\x05\xe0", b"\x0a\x01\x04", b"\x01\x01\x01", b"\x1f\x81\x80\x00",
]


# ----------------------------------------------------------------- targets


class Target:
    """A fuzz target: seeds, a mutator and the code under test."""

    name = ""

    def seeds(self) -> list[bytes]:
        raise NotImplementedError

    def mutate(self, rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
        raise NotImplementedError

    def run(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the target holds (temporary files)."""


class DerTarget(Target):
    """The DER directory decoder."""

    name = "der"

    def seeds(self) -> list[bytes]:
        out = []
        for d in seed_directories():
            out.append(b"\x01" + writer.encode_directory(d))
            out.append(b"\x00" + codec.encode_header(d) + bytes(64))
        return out

    def mutate(self, rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
        mode, body = (data[0], data[1:]) if data else (1, b"")
        if mode & 1 and rng.random() < 0.4:
            d = _decode_model(body)
            if d is not None:
                try:
                    return bytes([mode]) + writer.encode_directory(mutate_directory(rng, d))
                except (OverflowError, ValueError):  # the model mutator's own limits
                    pass
        if rng.random() < 0.05:
            mode ^= 1
        return bytes([mode]) + mutate_bytes(rng, body, DER_TOKENS, [p[1:] for p in pool])

    def run(self, data: bytes) -> None:
        if not data:
            return
        buf = _frame(data[0], data[1:])
        for probe in (codec.peek, codec.header_length):
            try:
                probe(buf)
            except NvmgrError:
                pass
        d = codec.decode_header(buf, padded=not data[0] & 2)
        show(d.to_json())


def show(obj: object) -> None:
    """Print *obj* as ``--output json`` and as text would (to nowhere)."""
    json.dumps(obj)
    str(obj)


class ImageTarget(Target):
    """Open, list, check and get on images whose header copies are the input.

    Mode byte: bit 0 frame the body with a valid digest; bits 1-2 where the
    copy goes (0: both copies, 1: A only, 2: B only, 3: A, with B zeroed);
    bit 3 the base image is the encrypted one; bit 4 also open with its key;
    bit 5 also give the copy a valid directory MAC under that key (so that
    keyed readers get past the directory's authentication too).
    """

    name = "image"

    def __init__(self) -> None:
        from nvmgr.crypto.cipher import Kek
        from nvmgr.image.image import Image

        self._tmp = tempfile.TemporaryDirectory(prefix="nvmgr-fuzz-")
        self.kek = Kek(KEY)
        self.bases: list[tuple[str, bytes, int]] = []  # path, pristine bytes, header area
        specs = [
            SectionSpec("uefi-vars", 8192, Binding.PFLASH),
            SectionSpec("tpm-permall", 6144, Binding.TPM),
            SectionSpec("nic-eeprom", 512),
            SectionSpec("pci-vpd", 1024, Binding.FWCFG),
            SectionSpec("empty", 4096),
        ]
        for i, kek in enumerate((None, self.kek)):
            path = os.path.join(self._tmp.name, f"base{i}.nvram")
            with Image.create(path, specs, kek=kek, image_uuid=uuid.UUID(int=10 + i)) as img:
                img.put("uefi-vars", bytes(range(256)) * 32)
                img.put("tpm-permall", b"permall" * 500)
                img.put("nic-eeprom", b"\x52\x54\x00" * 100)
                img.put("pci-vpd", b"VPD" * 300)
                area = img.directory.header_area
            self.bases.append((path, Path(path).read_bytes(), area))
        self.work = os.path.join(self._tmp.name, "work.nvram")
        from nvmgr.crypto.cipher import SectionCipher, unlock

        with Image.open(self.bases[1][0]) as img:
            self.cipher = SectionCipher(unlock(img.directory.key_slots or [], self.kek))

    def close(self) -> None:
        self._tmp.cleanup()

    def seeds(self) -> list[bytes]:
        from nvmgr.image.image import Image

        out = []
        for i, (path, _raw, _area) in enumerate(self.bases):
            with Image.open(path) as img:
                body = writer.encode_directory(img.directory)
            flag = 0x38 if i else 0
            out += [bytes([1 | flag]) + body, bytes([1 | 2 | flag]) + body,
                    bytes([1 | 4 | flag]) + body]
        return out

    def mutate(self, rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
        mode, body = (data[0], data[1:]) if data else (1, b"")
        if rng.random() < 0.05:
            mode ^= 1 << rng.randrange(6)
        if mode & 1 and rng.random() < 0.6:
            d = _decode_model(body)
            if d is not None:
                try:
                    return bytes([mode]) + writer.encode_directory(mutate_directory(rng, d))
                except (OverflowError, ValueError):
                    pass
        return bytes([mode]) + mutate_bytes(rng, body, DER_TOKENS, [p[1:] for p in pool])

    def run(self, data: bytes) -> None:
        from nvmgr.image.image import Image

        if not data:
            return
        mode = data[0]
        _path, raw, area = self.bases[1 if mode & 8 else 0]
        copy = _frame(mode, data[1:])
        if mode & 0x21 == 0x21:
            d = _decode_model(data[1:])
            if d is not None:
                copy = frame(data[1:], self.cipher.directory_mac(d.sealed()))
        copy = copy[:area]
        buf = bytearray(raw)
        where = mode >> 1 & 3
        if where in (0, 1, 3):
            buf[0:area] = copy + bytes(area - len(copy))
        if where in (0, 2):
            buf[area : 2 * area] = copy + bytes(area - len(copy))
        if where == 3:
            buf[area : 2 * area] = bytes(area)
        Path(self.work).write_bytes(buf)
        keys = [None, self.kek] if mode & 16 else [None]
        for kek in keys:
            try:
                with Image.open(self.work, kek=kek) as img:
                    show(img.directory.to_json())
                    show(img.check().to_json())
                    for s in list(img.directory.sections):
                        try:
                            img.get_to(s.name, _sink())
                        except NvmgrError:
                            pass
            except NvmgrError:
                pass


def _sink() -> Callable[[bytes], None]:
    total = [0]

    def write(chunk: bytes) -> None:
        total[0] += len(chunk)

    return write


XML_TOKENS = [
    b"<nvmgr:section name='x' size='1T'/>", b"<nvmgr:section name='blk' size='4K' binding='block'/>",
    b"<nvmgr:section name='uefi-vars' size='99999999999999999999999'/>",
    b"<nvmgr:section name='v' kind='pci-vpd'/>", b" device='" + b"d" * 200 + b"'",
    b"<loader type='pflash'/>", b"<loader readonly='yes' type='pflash'></loader>",
    b"<nvram template='/dev/zero'/>", b"<nvram template='/dev/null'/>",
    b"<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
    b"<tpm model='tpm-tis'><backend type='emulator' version='1.2'/><alias name='" + b"a" * 200
    + b"'/></tpm>",
    b"text after", b"<!-- c -->", b"<?pi x?>", b"&amp;", b"&#0;", b"]]>", b"<![CDATA[x]]>",
    b"xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'", b" image='/tmp/x.nvram'",
    b" format='qcow2'", b" uuid='00000000-0000-0000-0000-000000000000'", b"firmware='efi'",
    b"<uuid>not-a-uuid</uuid>", b"<name>" + b"n" * 300 + b"</name>", b"size='-1'", b"size='0'",
    b"size='18446744073709551616'", b"<qemu:commandline><qemu:arg value='-blockdev'/>",
    b"<nvmgr:libvirt-nvram path='/x' template='/y' format='raw'/>", b"\xff\xfe", b"\x00",
]


class XmlTarget(Target):
    """The domain XML parser and planner."""

    name = "xml"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="nvmgr-fuzz-xml-")
        fifo = os.path.join(self._tmp.name, "fifo")
        os.mkfifo(fifo)
        big = os.path.join(self._tmp.name, "big.fd")
        with open(big, "wb") as f:
            f.truncate(64 << 30)  # sparse: a 64 GiB "template"
        # Inputs name them by placeholder, so that corpus files work on any run.
        self.places = {b"@FIFO@": fifo.encode(), b"@BIG@": big.encode(),
                       b"@DIR@": self._tmp.name.encode()}
        self.fifo, self.big = b"@FIFO@", b"@BIG@"
        self.edits = self._edits()
        self.tokens = XML_TOKENS + [
            b"<nvram template='@FIFO@'/>", b"<nvram template='@BIG@'/>",
            b"<nvram template='@DIR@'/>",
        ]

    def close(self) -> None:
        self._tmp.cleanup()

    def seeds(self) -> list[bytes]:
        data = ROOT / "tests" / "data"
        out = [p.read_bytes() for p in sorted(data.glob("*-in.xml"))]
        out += [p.read_bytes() for p in sorted(data.glob("*-out.xml"))]
        out += [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.xml"))]
        return out

    def _edits(self) -> list[tuple[re.Pattern[bytes], list[bytes]]]:
        """Edits where they mean something: (pattern, replacements)."""
        paths = [self.fifo, self.big, b"@DIR@", b"/dev/zero", b"/dev/null",
                 b"/nonexistent", b"relative", b""]
        long = b"a" * 129
        return [
            (re.compile(rb"template='[^']*'"), [b"template='" + p + b"'" for p in paths]),
            (re.compile(rb"(<loader[^>]*>)[^<]*(</loader>)"),
             [rb"\1\2", rb"\1 \2", rb"\1" + self.fifo + rb"\2", rb"\1/dev/zero\2"]),
            (re.compile(rb"<loader[^>]*>[^<]*</loader>"),
             [b"<loader type='pflash'/>", b"<loader readonly='yes' type='pflash'/>"]),
            (re.compile(rb"</os>"), [b"<nvram template='" + p + b"'/></os>" for p in paths]),
            (re.compile(rb"(</nvmgr:nvram>|<nvmgr:nvram[^>]*/>)"),
             [rb"\1 tail text", rb"\1<x/>", rb"\1&amp;", rb"\1<!--c-->", rb"\1<?pi?>"]),
            (re.compile(rb"<backend type='emulator'"),
             [b"<alias name='" + long + b"'/><backend type='emulator'",
              b"<alias name='" + b"a" * 128 + b"'/><backend type='emulator'"]),
            (re.compile(rb"device='[^']*'"), [b"device='" + long + b"'", b"device=''"]),
            (re.compile(rb"size='[^']*'"),
             [b"size='" + v + b"'" for v in (b"1T", b"1025G", b"0", b"-1", b"9" * 400, b"1.5",
                                             b"64M", b"4294967296K", b"1e9")]),
            (re.compile(rb"name='[^']*'"), [b"name='" + b"s" * 65 + b"'", b"name='..'",
                                            b"name='uefi-vars'", b"name='tpm-permall'"]),
        ]

    def mutate(self, rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
        if rng.random() < 0.4:
            edits = [(pat, reps) for pat, reps in self.edits if pat.search(data)]
            if edits:
                pat, reps = rng.choice(edits)
                matches = list(pat.finditer(data))
                m = rng.choice(matches)
                new = m.expand(rng.choice(reps))
                return data[: m.start()] + new + data[m.end() :]
        if rng.random() < 0.4 and b">" in data:
            # Structure-aware: insert a token right after a tag or before a close tag.
            marks = [i + 1 for i in range(len(data)) if data[i] == 0x3E]
            marks += [i for i in range(len(data)) if data[i] == 0x3C]
            i = rng.choice(marks)
            return data[:i] + rng.choice(self.tokens) + data[i:]
        return mutate_bytes(rng, data, self.tokens, pool)

    def run(self, data: bytes) -> None:
        from nvmgr.domain.plan import plan_domain, plan_to_json, render_text
        from nvmgr.domain.qemuargs import rewrite_domain, strip_nvmgr

        for place, path in self.places.items():
            data = data.replace(place, path)
        for encrypted in (False, True):
            plan = plan_domain(data, encrypted=encrypted)
            show(plan_to_json(plan))
            render_text(plan)
        out = rewrite_domain(data, plan, plan.image, plan.format,
                             plan.image_uuid or uuid.UUID(int=9))
        strip_nvmgr(out)


TARGETS: dict[str, Callable[[], Target]] = {
    "der": DerTarget, "image": ImageTarget, "xml": XmlTarget,
}


# ----------------------------------------------------------------- running


@dataclasses.dataclass
class RunStats:
    target: str
    inputs: int = 0
    accepted: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    failures: list[Failure] = dataclasses.field(default_factory=list)


def fuzz(target: Target, *, seed: int, count: int | None = None,
         seconds: float | None = None, limit: float = 1.0,
         on_failure: Callable[[Failure], None] | None = None,
         progress: Callable[[RunStats], None] | None = None) -> RunStats:
    """Mutate the target's seeds (and the inputs it accepted) for *count*
    inputs or *seconds*, whichever ends first; deterministic for *seed*
    when bounded by *count*."""
    rng = random.Random(seed)
    seeds = target.seeds()
    pool = list(seeds)
    stats = RunStats(target.name)
    seen: set[tuple[str, str]] = set()
    start = time.perf_counter()
    while True:
        if count is not None and stats.inputs >= count:
            break
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        parent = rng.choice(pool)
        data = target.mutate(rng, parent, pool)
        if progress is not None and stats.inputs and stats.inputs % 5000 == 0:
            stats.seconds = time.perf_counter() - start
            progress(stats)
        t0 = time.perf_counter()
        failure = check_contract(target, data, limit=limit)
        took = time.perf_counter() - t0
        stats.slowest = max(stats.slowest, took)
        stats.inputs += 1
        if failure is not None:
            if failure.signature() not in seen:
                seen.add(failure.signature())
                stats.failures.append(failure)
                if on_failure:
                    on_failure(failure)
        elif len(pool) < 2000 and rng.random() < 0.02:
            pool.append(data)  # keep some survivors as parents: deeper mutations
            stats.accepted += 1
    stats.seconds = time.perf_counter() - start
    return stats


def minimize(target: Target, failure: Failure, *, budget: int = 2000) -> bytes:
    """A shorter input that breaks the contract the same way (delta debugging
    over byte ranges; the mode byte of der/image inputs is kept)."""
    data = failure.data
    keep = 1 if target.name in ("der", "image") else 0
    tries = 0

    def same(candidate: bytes) -> bool:
        f = check_contract(target, candidate, limit=10.0)
        return f is not None and f.kind == failure.kind

    chunk = max(1, (len(data) - keep) // 2)
    while chunk >= 1 and tries < budget:
        i = keep
        changed = False
        while i < len(data) and tries < budget:
            candidate = data[:i] + data[i + chunk :]
            tries += 1
            if same(candidate):
                data, changed = candidate, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


def corpus_files(target: str) -> Iterator[Path]:
    """The regression inputs kept for *target* (``tests/data/fuzz-corpus/TARGET/``)."""
    folder = CORPUS / target
    if folder.is_dir():
        yield from sorted(p for p in folder.iterdir() if p.suffix == ".bin")
