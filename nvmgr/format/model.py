"""The directory model: plain data, no I/O, no codecs.

A :class:`Directory` is what one header copy holds (``schemas/nvmgr.asn1``,
type ``Directory``); a :class:`Section` is one named blob.  Edits that keep
the layout valid are methods here; :mod:`nvmgr.format.codec` turns the model into
DER and back (through :mod:`nvmgr.format.writer` and :mod:`nvmgr.format.reader`),
:mod:`nvmgr.image.image` does the I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid

from nvmgr.errors import UsageError

ALIGN = 4096
MIN_HEADER_AREA = 64 * 1024
MAX_HEADER_AREA = 16 * 1024 * 1024
#: Header area sizes an image may use; B is probed at each when A is unreadable.
HEADER_AREA_SIZES = tuple(1 << n for n in range(16, 25))
MAX_SECTIONS = 4096
MAX_NAME = 64
#: Largest single section (worst-case payload size) nvmgr accepts: a sanity
#: bound against absurd sizes in XML, on the command line or in a directory.
MAX_SECTION_SIZE = 1 << 40
#: Largest image a directory may describe (``imageSize`` and every offset
#: and extent below it): 256 TiB, beyond any real set of device state.
MAX_IMAGE_SIZE = 1 << 48
#: Longest device alias a section may record (``device``, schema SIZE 1..128).
MAX_DEVICE = 128
#: Bytes of directory room planned per section when sizing the header areas.
DIRECTORY_BYTES_PER_SECTION = 192
#: AES block: an encrypted section's stored bytes are at most capacity + 16.
CIPHER_OVERHEAD = 16
#: LUKS1 key slots QEMU writes (all of them: QEMU 7.2 cannot make fewer).
LUKS_KEY_SLOTS = 8
#: Anti-forensic stripes per LUKS1 key slot (QEMU's default, cryptsetup's too).
LUKS_STRIPES = 4000
#: Master key bytes of QEMU's default LUKS cipher, aes-256-xts (two AES-256 keys).
LUKS_MASTER_KEY = 64
#: What a LUKS volume inside a live section costs beyond its payload: QEMU's
#: LUKS1 header (592 bytes, one 4 KiB block) and 8 key slots of
#: ``LUKS_MASTER_KEY * LUKS_STRIPES`` bytes each, 4 KiB aligned: 2,068,480
#: bytes, the payload offset ``qemu-img create -f luks`` writes on QEMU 7.2
#: (``tests/test_luks_sections.py`` measures it against the qemu-img installed).
LUKS_HEADER_SIZE = 4096 + LUKS_KEY_SLOTS * (
    (LUKS_MASTER_KEY * LUKS_STRIPES + 4095) // 4096 * 4096)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class Binding(enum.IntEnum):
    """How a device consumes its section (see README "Bindings")."""

    OPAQUE = 0
    PFLASH = 1
    TPM = 2
    BLOCK = 3
    FWCFG = 4

    @property
    def live(self) -> bool:
        """QEMU reads and writes these sections in place through a raw slice."""
        return self in (Binding.PFLASH, Binding.BLOCK)

    @classmethod
    def parse(cls, text: str) -> Binding:
        try:
            return cls[text.upper()]
        except KeyError as e:
            names = ", ".join(b.name.lower() for b in cls)
            raise UsageError(f"unknown binding {text!r} (one of: {names})") from e


def align_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def check_name(name: str) -> str:
    """Return *name* if it is a valid section name, else raise :class:`UsageError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid section name {name!r}: 1-{MAX_NAME} characters from "
            "A-Z a-z 0-9 . _ + -, starting with a letter or digit, no '..'",
            section=str(name)[:80],
        )
    return name


def header_area_for(sections: int) -> int:
    """The smallest allowed header area that holds *sections* with room to spare."""
    need = 1024 + DIRECTORY_BYTES_PER_SECTION * max(sections, 1) * 2
    for size in HEADER_AREA_SIZES:
        if size >= need:
            return size
    raise UsageError(f"{sections} sections exceed the directory limit of {MAX_SECTIONS}")


@dataclasses.dataclass
class SectionCrypto:
    iv: bytes
    mac: bytes


@dataclasses.dataclass
class Section:
    """One named blob.  ``offset`` always points at the current bytes."""

    name: str
    binding: Binding
    capacity: int
    reserved: int
    offset: int
    length: int = 0
    crc32: int = 0
    encrypted: bool = False
    dirty: bool = False
    spare: int | None = None
    home: int | None = None
    device: str | None = None
    crypto: SectionCrypto | None = None
    member: int | None = None

    @property
    def live(self) -> bool:
        return self.binding.live

    @property
    def luks(self) -> bool:
        """A live section of an encrypted image: its slot holds a LUKS volume
        (:data:`LUKS_HEADER_SIZE` bytes of header, then the payload QEMU's
        ``luks`` driver decrypts as the VM runs); ``capacity`` counts both."""
        return self.encrypted and self.binding.live

    @property
    def payload(self) -> int:
        """The bytes the device sees: ``capacity``, less a LUKS header."""
        return self.capacity - LUKS_HEADER_SIZE if self.luks else self.capacity

    @property
    def stored_length(self) -> int:
        """Bytes on disk: the ciphertext length for encrypted sections."""
        if self.encrypted and self.crypto is not None and not self.binding.live:
            return (self.length // 16 + 1) * 16
        return self.length

    def extents(self) -> list[tuple[int, int]]:
        """Every byte range this section owns in the image.

        A live section whose bytes sit in scratch (``home`` set) owns its home
        slot; the scratch area is the directory's, not the section's.
        """
        if self.home is not None:
            return [(self.home, self.reserved)]
        out = [(self.offset, self.reserved)]
        if self.spare is not None:
            out.append((self.spare, self.reserved))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "binding": self.binding.name.lower(),
            "capacity": self.capacity,
            "reserved": self.reserved,
            "length": self.length,
            "crc32": f"{self.crc32:08x}",
            "offset": self.offset,
            "spare": self.spare,
            "home": self.home,
            "encrypted": self.encrypted,
            "live": self.live,
            "dirty": self.dirty,
            "device": self.device,
            "member": self.member,
        }


@dataclasses.dataclass
class KeySlot:
    key_id: bytes
    wrapped_key: bytes
    label: str | None = None


#: Container formats a member record may name (``ContainerFormat``), by value.
MEMBER_FORMATS = ("raw", "qcow2")
#: Members an image may have (``Member.index`` 1..64).
MAX_MEMBERS = 64


@dataclasses.dataclass
class Member:
    """A member image holding the sections that name :attr:`index`.

    ``path`` is as recorded: absolute, an ``rbd:`` location, or relative to
    the directory of the image that lists it.  ``fmt`` None: probed.
    ``generation``: the member's directory generation when this image last
    committed with the member open (a lower bound: a member whose directory
    is older is an older copy of itself, refused); None: not recorded (an
    image written before it was), nothing checked.
    """

    index: int
    path: str
    image_uuid: uuid.UUID
    fmt: str | None = None
    generation: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "path": self.path, "image_uuid": str(self.image_uuid),
                "format": self.fmt, "generation": self.generation}


@dataclasses.dataclass(frozen=True)
class Runner:
    """One start of the VM on one host (``Runner`` in the schema).

    The prepare hook makes one per start (a random *run*); the directory's
    ``runner`` is the start that owns the image while the VM runs, and
    ``incoming`` the destination of a live migration until the source's
    release hands the image over.
    """

    run: bytes
    host: str

    def to_json(self) -> dict[str, str]:
        return {"run": self.run.hex(), "host": self.host}


@dataclasses.dataclass
class Orphaned:
    """The owner domain was undefined and left the image behind (``Orphaned``)."""

    since: int  # seconds since 1970-01-01 UTC
    domain_name: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"since": self.since, "domain_name": self.domain_name}


@dataclasses.dataclass
class Directory:
    """One generation of the image directory."""

    image_uuid: uuid.UUID
    header_area: int
    image_size: int
    generation: int = 0
    scratch_offset: int = 0
    scratch_length: int = 0
    sections: list[Section] = dataclasses.field(default_factory=list)
    domain_uuid: uuid.UUID | None = None
    key_slots: list[KeySlot] | None = None
    members: list[Member] | None = None
    runner: Runner | None = None
    incoming: Runner | None = None
    orphaned: Orphaned | None = None
    #: A member image: the image UUID of the image whose sections it holds.
    parent: uuid.UUID | None = None
    version: int = 1
    #: ``HeaderCopy.mac`` of the copy this directory was read from: the HMAC
    #: that authenticates it under the image's key (encrypted images), not
    #: part of the directory's own DER.
    mac: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def encrypted(self) -> bool:
        return self.key_slots is not None

    def sealed(self) -> bytes:
        """What an encrypted image's directory MAC authenticates (``HeaderCopy.mac``).

        The key slots, and for every encrypted section that holds data its
        name, length and crypto parameters (IV and the section's own MAC):
        everything whose forgery or rollback the section MACs alone cannot
        catch (an older version's IV and MAC with the older ciphertext still
        in the other slot; a section dropped or made plaintext), and for
        every LUKS section (an encrypted live one) its name and length.  Offsets,
        sizes, plaintext live sections and in-use marks are left out on purpose: writers
        without the key change them (reseal, grow, resize, hand-off), and a
        forged offset only makes a section fail its own MAC.  Canonical bytes:
        length-prefixed fields, sections in name order.
        """
        def field(b: bytes) -> bytes:
            return len(b).to_bytes(4, "big") + b

        out = [b"nvmgr-v1 sealed\0"]
        for k in self.key_slots or []:
            out += [b"K", field(k.key_id), field(k.wrapped_key)]
        for s in sorted(self.sections, key=lambda s: s.name):
            if s.encrypted and s.crypto is not None:
                out += [b"S", field(s.name.encode()), s.length.to_bytes(8, "big"),
                        field(s.crypto.iv), field(s.crypto.mac)]
            elif s.encrypted and s.live:
                # A LUKS volume QEMU decrypts: sealed as such, and whether it
                # was made (its length), so that nobody without the key makes
                # nvmgr take it for plaintext or for empty (refilled from a template).
                out += [b"L", field(s.name.encode()), s.length.to_bytes(8, "big")]
            elif s.member is not None:
                # A section in a member: its bytes and crypto are sealed in the
                # member's directory (same data key); here, where it is.
                out += [b"M", field(s.name.encode()), s.member.to_bytes(1, "big")]
        for m in self.members or []:
            out += [b"U", m.index.to_bytes(1, "big"), field(m.image_uuid.bytes)]
        if self.parent is not None:
            out += [b"P", field(self.parent.bytes)]
        return b"".join(out)

    @property
    def data_start(self) -> int:
        return 2 * self.header_area

    def member(self, index: int) -> Member | None:
        for m in self.members or []:
            if m.index == index:
                return m
        return None

    def find(self, name: str) -> Section | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def end_of_data(self) -> int:
        """First byte after every extent in use (sections and scratch)."""
        end = self.data_start
        if self.scratch_length:
            end = max(end, self.scratch_offset + self.scratch_length)
        for s in self.sections:
            if s.member is not None:  # its bytes are in the member's file
                continue
            for off, n in s.extents():
                end = max(end, off + n)
        return end

    def extents(self) -> list[tuple[int, int, str]]:
        out = [(0, self.header_area, "header A"), (self.header_area, self.header_area, "header B")]
        if self.scratch_length:
            out.append((self.scratch_offset, self.scratch_length, "scratch"))
        for s in self.sections:
            if s.member is not None:
                continue
            for off, n in s.extents():
                out.append((off, n, f"section {s.name}"))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "image_uuid": str(self.image_uuid),
            "domain_uuid": str(self.domain_uuid) if self.domain_uuid else None,
            "generation": self.generation,
            "header_area": self.header_area,
            "image_size": self.image_size,
            "scratch": {"offset": self.scratch_offset, "length": self.scratch_length},
            "encrypted": self.encrypted,
            "key_slots": [
                {"key_id": k.key_id.hex(), "label": k.label} for k in (self.key_slots or [])
            ],
            "members": [m.to_json() for m in (self.members or [])],
            "parent": str(self.parent) if self.parent else None,
            "runner": self.runner.to_json() if self.runner else None,
            "incoming": self.incoming.to_json() if self.incoming else None,
            "orphaned": self.orphaned.to_json() if self.orphaned else None,
            "sections": [s.to_json() for s in self.sections],
        }
