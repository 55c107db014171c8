"""An nvmgr image: open, read, write, commit.

:class:`Image` joins a :class:`~nvmgr.storage.container.Container` (bytes at
offsets) and the current :class:`~nvmgr.format.model.Directory`.  Every change goes
through :meth:`Image._commit`, which writes the *other* header copy with
the next generation and flushes it.  The promise, checked by fault injection
in ``tests/test_crash.py``: a crash or kill at any point leaves every section
with its old or its new bytes, never a mix, and ``check`` passes.

Write protocols (each I/O is followed by the flush shown):

- ``put`` on an ordinary section: data into the spare slot, flush; commit.
- ``put`` on a live section (QEMU's raw slice points at a fixed offset):
  data into scratch, flush; commit (section now reads from scratch, ``home``
  names its slot); copy into the slot, flush; commit (``home`` cleared).
  A writer that opens an image with a pending copy finishes it first.
- ``add_sections``: resize the container (flushed); commit.
- ``rekey``: commit (the data key is re-wrapped; section data is untouched).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from nvmgr.errors import (
    BusyError,
    CorruptError,
    DERError,
    ExternalError,
    ForeignImageError,
    KeyRequiredError,
    MemberError,
    NoSpaceError,
    NotFoundError,
    NvmgrError,
    UsageError,
    WrongKeyError,
)
from nvmgr.format import codec
from nvmgr.format.layout import SectionSpec, extend, layout
from nvmgr.format.model import (
    HEADER_AREA_SIZES,
    LUKS_HEADER_SIZE,
    MIN_HEADER_AREA,
    Directory,
    KeySlot,
    Member,
    Orphaned,
    Runner,
    Section,
    SectionCrypto,
)
from nvmgr.storage.base import Piece
from nvmgr.storage.container import Container, create_container, open_container
from nvmgr.storage.formats import image_exists, is_location
from nvmgr.storage.rbd import is_rbd

if TYPE_CHECKING:  # cryptography is imported when an encrypted image needs it
    from nvmgr.crypto.cipher import Kek, SectionCipher

log = logging.getLogger(__name__)


def _mac_room(_der: bytes) -> bytes:
    """A directory MAC's room, for sizing a header before the MAC is known."""
    return bytes(32)


CHUNK = 4 << 20
#: The largest unencrypted section :meth:`Image.get` reads into memory at once
#: (a pflash varstore is at most 64 MiB); :meth:`Image.get_to` streams larger
#: ones.  An encrypted section's length is authenticated by the directory's MAC
#: (checked first), so it is read whole, as its MAC must be checked before
#: any byte is decrypted.
MAX_IN_MEMORY = 256 << 20
#: Unencrypted sections up to this size are read once by :meth:`Image.get_to` and
#: kept in memory while their crc32 is checked (over each chunk as the next one is
#: read); larger ones are read twice (a crc pass, then a copy pass), memory bounded.
ONE_PASS_MAX = 64 << 20
#: Bytes to store: bytes, or any buffer such as an mmap of the input file.
Buffer = bytes | bytearray | memoryview | mmap.mmap
#: Progress callback: (bytes done, bytes total).
Progress = Callable[[int, int], None]


@dataclasses.dataclass
class HeaderState:
    """What one header copy held when the image was opened."""

    slot: int
    offset: int
    generation: int | None = None
    length: int = 0
    error: str | None = None
    #: False for the older copy when only the newer one was decoded (``check``
    #: decodes both).
    verified: bool = True


@dataclasses.dataclass
class SectionCheck:
    name: str
    status: str  # ok | corrupt | unverified | empty
    detail: str = ""


@dataclasses.dataclass
class CheckReport:
    """Result of :meth:`Image.check`; ``ok`` is false on any corruption."""

    image: str
    headers: list[HeaderState]
    sections: list[SectionCheck]
    errors: list[str]
    warnings: list[str]
    #: Live sections whose crc no longer matches: their bytes are the guest's
    #: own, so :meth:`Image.repair` may take them as their content.
    repairable: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def repair_hint(self) -> str:
        """The recovery for :attr:`repairable` sections, naming the command ('' if none)."""
        if not self.repairable:
            return ""
        return (f"live section(s) {', '.join(self.repairable)} hold the guest's own bytes "
                "(a power loss while the VM wrote them?); if the VM is stopped, "
                f"'nvmgr check {self.image} --repair --yes' reseals them with the bytes "
                "they hold")

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "ok": self.ok,
            "headers": [dataclasses.asdict(h) for h in self.headers],
            "sections": [dataclasses.asdict(s) for s in self.sections],
            "errors": self.errors,
            "warnings": self.warnings,
            "repairable": self.repairable,
        }


def _decode_copy(c: Container, slot: int, offset: int,
                 area: int | None) -> tuple[Directory | None, HeaderState]:
    """Fully decode and verify one header copy (DER, schema, digest, layout, padding)."""
    state = HeaderState(slot=slot, offset=offset)
    head = c.read(offset, MIN_HEADER_AREA)
    try:
        total = codec.header_length(head)
        if area is not None and total > area:
            raise DERError(f"header length {total} exceeds its area of {area} bytes")
        if total > len(head):
            if total > max(HEADER_AREA_SIZES):
                raise DERError(f"header length {total} exceeds the largest header area")
            head = c.read(offset, total)
        d = codec.decode_header(head[:total], padded=False)
        if area is not None and d.header_area != area:
            raise DERError(f"header area size {d.header_area} disagrees with the other copy")
        if offset != slot * d.header_area:
            raise DERError(f"copy {'AB'[slot]} found at {offset}, but its area size is "
                           f"{d.header_area}")
        # Everything after the DER up to the end of the area must be zero.
        pos = offset + total
        end = offset + d.header_area
        while pos < end:
            n = min(CHUNK, end - pos)
            if c.read(pos, n).strip(b"\x00"):
                raise DERError("non-zero bytes after the directory in its header area")
            pos += n
        state.generation, state.length = d.generation, total
        return d, state
    except (DERError, ForeignImageError) as e:
        state.error = e.message
        return None, state


def _peek(c: Container, offset: int) -> tuple[int, int] | None:
    """(generation, header area) a header copy claims, read cheaply; None if none."""
    return _peek_bytes(c.read(offset, 256))


def _peek_bytes(head: bytes) -> tuple[int, int] | None:
    try:
        return codec.peek(head)
    except (DERError, ForeignImageError):
        return None


def _der_length(c: Container) -> int:
    """Bytes copy A's DER claims (0 when its start is unreadable)."""
    try:
        return codec.header_length(c.read(0, 256))
    except (DERError, ForeignImageError):
        return 0


def read_directory(c: Container, *, verify_both: bool = False) -> tuple[Directory, int, list[HeaderState]]:
    """Find the current directory: the valid copy with the highest generation.

    Copy B is looked for where copy A says it is.  Only when A is unreadable
    are the allowed area sizes probed, smallest first, and the first offset
    that holds a header is B: past the real B lies section data, which a
    guest may write (a live pflash section), so nothing further out may
    outvote a readable copy.

    Copies are tried newest first and only the first that verifies is
    decoded in full (decoding dominates opening an image with many
    sections); *verify_both* decodes the other copy too, for ``check``.

    :return: (directory, slot it came from (0 = A, 1 = B), both header states)
    :raise ForeignImageError: neither copy is an nvmgr header.
    :raise DERError: both copies are nvmgr headers and both are damaged.
    """
    size = c.size()
    if size < 2 * MIN_HEADER_AREA:
        raise ForeignImageError(
            f"not an nvmgr image: {size} bytes is smaller than two header areas", image=c.path
        )
    peek_a = _peek(c, 0)
    if peek_a is not None and peek_a[1] in HEADER_AREA_SIZES and 2 * peek_a[1] <= size:
        b_offsets = [peek_a[1]]
    else:
        b_offsets = [n for n in HEADER_AREA_SIZES if 2 * n <= size]
    peek_b, off_b = None, b_offsets[0]
    a_length = _der_length(c)
    for off in b_offsets:
        if off < a_length:
            continue  # inside copy A's own DER
        head = c.read(off, 256)
        peek_b = _peek_bytes(head)
        if peek_b is not None:
            off_b = off
            break
        if head.strip(b"\x00"):
            # Not padding of copy A's area: copy B (damaged) was here, or this
            # is already section data, which a guest may write (a live pflash
            # section). Nothing further out may stand in for copy B.
            off_b = off
            break
    gen_a = peek_a[0] if peek_a else None
    gen_b = peek_b[0] if peek_b else None
    order = sorted([(gen_a, 0, 0), (gen_b, 1, off_b)],
                   key=lambda t: -1 if t[0] is None else t[0], reverse=True)
    states: dict[int, HeaderState] = {}
    found: tuple[Directory, int] | None = None
    for gen, slot, off in order:
        if found is not None and not verify_both:
            states[slot] = HeaderState(slot=slot, offset=off, generation=gen,
                                       length=-1, error=None, verified=False)
            continue
        area = found[0].header_area if found is not None else None
        if found is not None:
            off = slot * found[0].header_area
        d, st = _decode_copy(c, slot, off, area)
        states[slot] = st
        if d is not None and found is None:
            found = (d, slot)
    result = [states[0], states[1]]
    if found is None:
        if all(s.error == "no nvmgr directory here" for s in result):
            raise ForeignImageError(
                "not an nvmgr image (no directory in either header copy)", image=c.path
            )
        raise DERError(
            f"both header copies are damaged (A: {result[0].error}; B: {result[1].error})",
            image=c.path,
        )
    d, slot = found
    for st in result:
        if st.length == -1:  # not decoded: whatever it holds is rewritten by the next commit
            st.length = d.header_area
    return d, slot, result


class Image:
    """An open nvmgr image.  Use :meth:`open` or :meth:`create`; close it (or use ``with``)."""

    def __init__(
        self,
        container: Container,
        directory: Directory,
        slot: int,
        headers: list[HeaderState],
        kek: Kek | None = None,
    ) -> None:
        self.container = container
        self.directory = directory
        self.headers = headers
        self._slot = slot
        # Bytes of DER last written into each header area: a shorter commit
        # must zero what a longer one left behind.
        self._written = [h.length if h.error is None else directory.header_area for h in headers]
        self.kek = kek
        self._unsealed = False
        self._cipher: SectionCipher | None = None
        self._data_key = b""
        self._wait = 0.0
        #: Member images opened so far (by index), checked against this directory.
        self._members: dict[int, Image] = {}
        #: A member image opened by its parent: (the parent, this member's index).
        #: Each commit of it is followed by one of the parent's that records the
        #: member's new generation (:meth:`_member_committed`).
        self._parent: tuple[Image, int] | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def path(self) -> str:
        return self.container.path

    @property
    def fmt(self) -> str:
        return self.container.fmt

    @classmethod
    def open(
        cls,
        path: str,
        *,
        writable: bool = False,
        kek: Kek | None = None,
        wait: float = 0.0,
        fmt: str | None = None,
        unsealed: bool = False,
    ) -> Image:
        """Open an existing image.

        With *kek*, an encrypted image's directory must carry its MAC under
        the image's key (:meth:`nvmgr.format.model.Directory.sealed`),
        checked when the key is first used (to read, check or write): a
        forged or rolled-back directory is refused as corrupt then.

        :param unsealed: accept an encrypted image's directory that carries
            no MAC at all (an image written before directories were
            authenticated), to seal it: ``nvmgr rekey --seal-directory``.
        :raise NotFoundError: no such file.
        :raise ForeignImageError: the file is not an nvmgr image.
        :raise CorruptError: both header copies damaged, or the file is truncated.
        :raise BusyError: another nvmgr writer holds it.
        :raise WrongKeyError: *kek* is not one of the image's keys.
        """
        c = open_container(path, writable=writable, wait=wait, fmt=fmt)
        try:
            d, slot, states = read_directory(c)
            size = c.size()
            if size < d.image_size:
                raise CorruptError(
                    f"image is truncated: {size} bytes, its directory needs {d.image_size}",
                    image=path,
                )
            img = cls(c, d, slot, states, kek)
            img._unsealed = unsealed
            img._wait = wait
            if writable:
                img._finish_pending()
            return img
        except BaseException:
            c.close()
            raise

    @classmethod
    def create(
        cls,
        path: str,
        specs: list[SectionSpec],
        *,
        fmt: str = "raw",
        kek: Kek | None = None,
        domain_uuid: uuid.UUID | None = None,
        header_area: int | None = None,
        image_uuid: uuid.UUID | None = None,
        parent: Image | None = None,
    ) -> Image:
        """Create a new image holding empty *specs* sections.

        With *kek*, the image gets a random data key wrapped by it, and every
        section QEMU does not read live is encrypted.

        :param parent: make a member image of *parent*: its directory names
            *parent*'s image UUID, and an encrypted parent's key slots (the
            same data key, so its sections' ciphertext moves as it is; its
            directory is sealed under that key, which *parent* must hold).
        """
        if parent is not None:
            kek = parent.kek
            domain_uuid = parent.directory.domain_uuid
        elif kek is not None:  # a member's sections keep their parent's flags
            specs = [
                dataclasses.replace(s, encrypted=True) if not s.binding.live else s for s in specs
            ]
        d = layout(specs, image_uuid=image_uuid, domain_uuid=domain_uuid,
                   header_area=header_area)
        data_key = None
        if parent is not None:
            d.parent = parent.directory.image_uuid
            if parent.directory.encrypted:
                parent._get_cipher()
                data_key = parent._data_key
                d.key_slots = [dataclasses.replace(k) for k in parent.directory.key_slots or []]
        elif kek is not None:
            from nvmgr.crypto.cipher import new_data_key

            data_key = new_data_key()
            d.key_slots = [KeySlot(kek.key_id, kek.wrap(data_key), kek.label)]
        # Fails early (NoSpaceError) before any file exists.
        codec.encode_header(d, _mac_room if d.encrypted else None)
        c = create_container(path, fmt, d.image_size)
        states = [HeaderState(0, 0, error="new"), HeaderState(1, d.header_area, error="new")]
        img = cls(c, d, 1, states, kek)
        if parent is not None:
            img._wait = parent._wait
        if data_key is not None:
            from nvmgr.crypto.cipher import SectionCipher

            img._data_key = data_key
            img._cipher = SectionCipher(data_key, image=path)
        try:
            # Write both copies so either can stand in for the other.
            img._commit(d)
            img._commit(d)
        except BaseException:
            img.close()
            raise
        return img

    def close(self) -> None:
        members, self._members = self._members, {}
        try:
            for m in members.values():
                m.close()
        finally:
            self.container.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading

    def section(self, name: str) -> Section:
        """Section *name* as stored: its member's entry (``member`` set) when
        a member image holds it."""
        s = self._find(self.directory, name)
        if s.member is None:
            return s
        holder, ms = self._where(name)
        return dataclasses.replace(ms, member=s.member)

    def _keys(self) -> tuple[Kek, list[KeySlot]]:
        """The key given and the image's key slots.

        :raise UsageError: the image is not encrypted.
        :raise KeyRequiredError: no key was given.
        """
        if self.directory.key_slots is None:
            raise UsageError("the image is not encrypted", image=self.path)
        if self.kek is None:
            raise KeyRequiredError(
                "the image is encrypted: give the key with --key-file, --key-secret "
                "or --key-stdin",
                image=self.path,
            )
        return self.kek, self.directory.key_slots

    def _get_cipher(self) -> SectionCipher:
        if self._cipher is None:
            kek, slots = self._keys()
            from nvmgr.crypto.cipher import SectionCipher, unlock

            self._data_key = unlock(slots, kek, image=self.path)
            self._cipher = SectionCipher(self._data_key, image=self.path)
            try:
                self._authenticate(self._unsealed)
            except BaseException:
                self._cipher, self._data_key = None, b""
                raise
        return self._cipher

    def _local(self, s: Section) -> Section:
        """*s*, if its bytes are in this file (a section of this directory
        that names no member).

        :raise NvmgrError: *s* is stored in a member image: never read from
            or written into this file (callers go through the member).
        """
        if s.member is not None:
            raise NvmgrError(
                f"section {s.name} is stored in member image {s.member}, not in this file",
                image=self.path, section=s.name)
        return s

    # ------------------------------------------------------------ members

    def member_path(self, m: Member) -> str:
        """Where member *m* is: its recorded path, a relative one taken
        relative to this image's directory."""
        if is_location(m.path) or os.path.isabs(m.path) or is_location(self.path):
            return m.path
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), m.path)

    def member_sections(self, index: int) -> list[Section]:
        """This directory's entries for the sections member *index* holds."""
        return [s for s in self.directory.sections if s.member == index]

    def member_image(self, index: int) -> Image:
        """Member *index*, opened as this image is (writable, key, wait) and
        checked against this directory before anything is read from it.

        :raise MemberError: the member is not listed, missing, unreadable,
            another image (UUID), another image's member (parent), holds
            members itself, lacks a section this directory places there, or
            a section of it lies beyond the member's end.  Each message names
            the member and the section(s) it should hold.
        """
        got = self._members.get(index)
        if got is not None:
            return got
        names = ", ".join(s.name for s in self.member_sections(index)) or "none"
        m = self.directory.member(index)
        if m is None:
            raise MemberError(f"member image {index} (holding section(s) {names}) is not "
                              "listed in the directory", image=self.path)
        path = self.member_path(m)
        what = f"member image {index} ({path}, holding section(s) {names})"
        first = self.member_sections(index)[0].name if self.member_sections(index) else None
        try:
            exists = image_exists(path)
        except NvmgrError as e:
            raise MemberError(f"{what} cannot be looked up: {e.message}", image=self.path,
                              section=first) from e
        if not exists:
            raise MemberError(f"{what} is missing", image=self.path, section=first)
        try:
            mi = Image.open(path, writable=self.container.writable, kek=self.kek,
                            wait=self._wait, fmt=m.fmt if not is_rbd(path) else None,
                            unsealed=self._unsealed)
        except (CorruptError, NotFoundError) as e:
            raise MemberError(f"{what} is unreadable: {e.message}", image=self.path,
                              section=first) from e
        except OSError as e:
            raise MemberError(f"{what} cannot be opened: {e}", image=self.path,
                              section=first) from e
        try:
            self._check_member(mi, m, what)
        except BaseException:
            mi.close()
            raise
        self.adopt_member(index, mi)
        return mi

    def adopt_member(self, index: int, mi: Image) -> None:
        """Keep *mi*, member *index* of this image (listed and checked), open:
        its commits are recorded here (its generation) from now on."""
        self._members[index] = mi
        mi._parent = (self, index)

    def _member_committed(self, index: int, mi: Image) -> None:
        """Member *index* committed: record its generation here, in a commit of
        this image (a crash between the two leaves the member newer than the
        record, which is taken; only an older one is refused)."""
        m = self.directory.member(index)
        if (m is None or m.image_uuid != mi.directory.image_uuid
                or m.generation == mi.directory.generation or not self.container.writable):
            return
        self._commit(self._copy_dir())

    def _member_generations(self, new: Directory) -> None:
        """Record in *new* the generation of every member open (and still the one listed)."""
        if not new.members or not self._members:
            return
        out = []
        for m in new.members:
            mi = self._members.get(m.index)
            if mi is not None and mi.directory.image_uuid == m.image_uuid:
                m = dataclasses.replace(m, generation=mi.directory.generation)
            out.append(m)
        new.members = out

    def _check_member(self, mi: Image, m: Member, what: str) -> None:
        d = mi.directory
        if d.image_uuid != m.image_uuid:
            raise MemberError(f"{what} is image {d.image_uuid}, the directory names "
                              f"{m.image_uuid}: another image's member, or an older copy",
                              image=self.path)
        if d.parent != self.directory.image_uuid:
            whose = f"image {d.parent}" if d.parent else "no image (it is not a member)"
            raise MemberError(f"{what} belongs to {whose}, not to this image "
                              f"({self.directory.image_uuid})", image=self.path)
        if m.generation is not None and d.generation < m.generation:
            first = self.member_sections(m.index)
            raise MemberError(
                f"{what} is an older copy of itself: its directory is generation "
                f"{d.generation}, and this image recorded generation {m.generation} of it "
                "(the member's file was replaced by an earlier copy, a backup or snapshot "
                "of it?): put the current member file back; to go back to older contents, "
                "restore them into the current files (nvmgr restore, nvmgr put)",
                image=self.path, section=first[0].name if first else None)
        if d.members:
            raise MemberError(f"{what} lists members of its own; members do not nest",
                              image=self.path)
        for s in self.member_sections(m.index):
            ms = d.find(s.name)
            if ms is None:
                raise MemberError(f"section {s.name} is missing from {what}",
                                  image=self.path, section=s.name)
            if ms.binding is not s.binding:
                raise MemberError(f"section {s.name} in {what} is bound "
                                  f"{ms.binding.name.lower()}, the directory says "
                                  f"{s.binding.name.lower()}", image=self.path, section=s.name)
            for off, n in s.extents():
                if off + n > d.image_size:
                    raise MemberError(
                        f"section {s.name} ([{off:,}, {off + n:,}), {s.capacity:,} bytes) lies "
                        f"beyond the end of {what} ({d.image_size:,} bytes)",
                        image=self.path, section=s.name)

    def members(self) -> list[tuple[Member, Image]]:
        """Every member, opened and checked (see :meth:`member_image`)."""
        return [(m, self.member_image(m.index)) for m in self.directory.members or []]

    def _where(self, name: str) -> tuple[Image, Section]:
        """The image that holds section *name*'s bytes, and its entry there."""
        s = self._find(self.directory, name)
        if s.member is None:
            return self, s
        mi = self.member_image(s.member)
        return mi, mi._find(mi.directory, name)

    def image_path_of(self, name: str) -> str:
        """The file section *name*'s bytes are in: this image's, or its member's."""
        s = self._find(self.directory, name)
        m = self.directory.member(s.member) if s.member is not None else None
        return self.member_path(m) if m is not None else self.path

    def sections(self) -> list[Section]:
        """Every section as stored: a member's entry (``member`` set) for a
        section in a member image, this directory's for the others."""
        out = []
        for s in self.directory.sections:
            if s.member is None:
                out.append(s)
            else:
                ms = self.member_image(s.member)._find(
                    self.member_image(s.member).directory, s.name)
                out.append(dataclasses.replace(ms, member=s.member))
        return out

    def _by_holder(self, names: Iterable[str]) -> dict[int | None, list[str]]:
        """*names* grouped by member index (None: this file)."""
        out: dict[int | None, list[str]] = {}
        for name in names:
            out.setdefault(self._find(self.directory, name).member, []).append(name)
        return out

    def _stored_crc(self, s: Section, progress: Progress | None = None) -> int:
        self._local(s)
        crc = 0
        done = 0
        total = s.stored_length
        for piece in self.container.pieces(s.offset, total, CHUNK, reuse=True):
            crc = zlib.crc32(piece, crc)
            done += len(piece)
            if progress:
                progress(done, total)
        return crc

    def get(self, name: str) -> bytes:
        """The section's payload, verified (crc32; MAC when encrypted) and decrypted.

        :raise CorruptError: "section NAME is corrupted", with the reason.
        :raise KeyRequiredError, WrongKeyError: an encrypted section without its key.
        :raise MemberError: the member image that holds it is missing or foreign.
        """
        holder, _ = self._where(name)
        if holder is not self:
            return holder.get(name)
        s = self._local(self.section(name))
        if s.crypto is not None or s.luks:
            # The key first: the directory's MAC covers an encrypted section's
            # length, so a size read past this point is the key holder's own.
            self._get_cipher()
        elif s.stored_length > MAX_IN_MEMORY:
            raise UsageError(
                f"section {name} holds {s.stored_length:,} bytes, more than the "
                f"{MAX_IN_MEMORY:,} read into memory at once: stream it "
                f"(nvmgr get -o FILE)", image=self.path, section=name)
        raw = self._read_stored(s)
        if s.crypto is not None:  # one pass checks the crc32 and the MAC
            try:
                return self._get_cipher().decrypt(name, raw, s.crypto.iv, s.crypto.mac,
                                                  crc32=s.crc32)
            except CorruptError as e:
                e.image = self.path
                raise
        if not (s.live and s.dirty):
            self._require_crc(s, zlib.crc32(raw))
        if s.luks:
            return self._luks_payload(s, raw)
        return raw

    def get_to(self, name: str, write: Callable[[bytes | bytearray | memoryview], object], *,
               verified_first: bool = True) -> int:
        """Write the section's payload through *write*, verified; return its length.

        Unencrypted sections up to :data:`ONE_PASS_MAX` are read once, in
        :data:`CHUNK` pieces kept until their crc is checked; larger ones stream
        (a first pass checks the crc, a second copies), so memory stays bounded
        whatever the section's size.  Encrypted sections are read whole, their crc32
        and MAC checked in one pass, then decrypted and written in
        :data:`CHUNK` pieces: no byte is decrypted before the MAC is checked.
        *write* may be given a ``memoryview`` that is reused after it returns.

        With ``verified_first=False`` an unencrypted section's bytes go to *write*
        as they are read, in one pass whatever the size, and its crc is checked at
        the end: :class:`CorruptError` then comes *after* the bytes were written.
        Only for a sink that the caller discards on an error and publishes on
        success (``nvmgr get -o FILE``'s anonymous file): the output is then written
        while the next pieces are on their way.  Encrypted sections are verified
        first either way.

        :raise CorruptError, KeyRequiredError, WrongKeyError: as :meth:`get`.
        """
        holder, _ = self._where(name)
        if holder is not self:
            return holder.get_to(name, write, verified_first=verified_first)
        s = self._local(self.section(name))
        if s.crypto is not None:  # verified whole in memory, then decrypted chunk by chunk
            cipher = self._get_cipher()
            raw = self._read_stored(s)
            try:
                return cipher.decrypt_to(name, raw, s.crypto.iv, s.crypto.mac, write,
                                         crc32=s.crc32, chunk=CHUNK)
            except CorruptError as e:
                e.image = self.path
                raise
        if s.luks or s.stored_length <= CHUNK:
            data = self.get(name)
            write(data)
            return len(data)
        check = not (s.live and s.dirty)
        if not verified_first:  # written as read, the crc checked at the end
            crc = 0
            for piece in self.container.pieces(s.offset, s.stored_length, CHUNK, reuse=True):
                if check:
                    crc = zlib.crc32(piece, crc)
                write(piece)
            if check:
                self._require_crc(s, crc)
            return s.stored_length
        if s.stored_length <= ONE_PASS_MAX:
            chunks, crc = self._read_once(s, check)
            if check:
                self._require_crc(s, crc)
            for chunk in chunks:
                write(chunk)
            return s.stored_length
        if check:  # a first pass checks, a second copies
            self._require_crc(s, self._stored_crc(s))
        for piece in self.container.pieces(s.offset, s.stored_length, CHUNK, reuse=True):
            write(piece)
        return s.stored_length

    def _require_crc(self, s: Section, crc: int) -> None:
        """:raise CorruptError: *crc*, of section *s*'s stored bytes, is not the directory's."""
        if crc != s.crc32:
            raise CorruptError(
                f"section {s.name} is corrupted (crc32 {crc:08x}, directory says {s.crc32:08x})",
                image=self.path, section=s.name)

    def _read_stored(self, s: Section) -> bytes:
        """Section *s*'s stored bytes, whole: one read, or where the container keeps
        several reads in flight (a network image's), :data:`CHUNK` pieces joined."""
        if s.stored_length <= CHUNK or not self.container.parallel_reads:
            return self.container.read(s.offset, s.stored_length)
        # Fresh pieces: join() takes them all before it copies (reused ones would clash).
        return b"".join(self.container.pieces(s.offset, s.stored_length, CHUNK))

    def _read_once(self, s: Section, check: bool) -> tuple[list[Piece], int]:
        """Section *s*'s stored bytes in :data:`CHUNK` pieces and their crc32 (0
        unless *check*): each piece's crc runs in a helper thread while the next
        piece is read (both release the GIL), so the check costs no extra time
        where reads wait on storage (a network image's export)."""
        import threading

        chunks: list[Piece] = []
        crc = [0]
        helper: threading.Thread | None = None
        try:
            for piece in self.container.pieces(s.offset, s.stored_length, CHUNK):
                if helper is not None:
                    helper.join()
                if check:
                    helper = threading.Thread(
                        target=lambda p=piece: crc.__setitem__(0, zlib.crc32(p, crc[0])),
                        name="nvmgr-crc", daemon=True)
                    helper.start()
                chunks.append(piece)
        finally:
            if helper is not None:
                helper.join()
        return chunks, crc[0]

    # ------------------------------------------------------------ LUKS sections

    def luks_passphrase(self) -> bytes:
        """The passphrase of this image's LUKS volumes (its encrypted live
        sections), for QEMU's ``secret`` object: derived from the data key
        (:meth:`nvmgr.crypto.cipher.SectionCipher.luks_passphrase`).

        :raise KeyRequiredError, WrongKeyError: no key, or not one of the image's.
        """
        return self._get_cipher().luks_passphrase()

    def vtpm_passphrase(self) -> bytes:
        """The passphrase swtpm encrypts this image's TPM state with while the
        VM runs: the value of the domain's libvirt ``vtpm`` secret
        (:meth:`nvmgr.crypto.cipher.SectionCipher.vtpm_passphrase`).

        :raise KeyRequiredError, WrongKeyError: no key, or not one of the image's.
        """
        return self._get_cipher().vtpm_passphrase()

    def _luks_payload(self, s: Section, raw: bytes) -> bytes:
        """The payload of LUKS section *s* whose stored bytes are *raw* (the
        key already proven by the key slots: a volume that does not open with
        the passphrase derived from it is damaged or replaced, not a wrong key).
        """
        if not raw:
            return b""  # never written: no volume yet
        from nvmgr.storage import qemu

        try:
            return qemu.luks_payload(raw, self.luks_passphrase(), image=self.path,
                                     section=s.name)
        except WrongKeyError as e:
            raise CorruptError(
                f"section {s.name} is corrupted (its LUKS volume does not open with the "
                "image's key: damaged or replaced)", image=self.path, section=s.name) from e

    def _luks_volume(self, s: Section, data: Buffer) -> bytes:
        """The LUKS volume to store in section *s* for payload *data*: its
        current volume re-encrypted when it is whole, else a new one."""
        from nvmgr.storage import qemu

        if len(data) > s.payload:
            raise NoSpaceError(
                f"{len(data)} bytes do not fit section {s.name} (a LUKS volume with a "
                f"payload of {s.payload})", image=self.path, section=s.name)
        current = None
        if s.length == s.capacity:
            raw = self._read_stored(s)
            if (s.live and s.dirty) or zlib.crc32(raw) == s.crc32:
                current = raw
        vol = qemu.luks_volume(bytes(data), s.payload, self.luks_passphrase(), volume=current,
                               image=self.path, section=s.name)
        if len(vol) != s.capacity:
            raise ExternalError(
                f"section {s.name}: qemu-img made a LUKS volume of {len(vol):,} bytes, the "
                f"section holds {s.capacity:,} (a LUKS header of {len(vol) - s.payload:,} "
                f"bytes, nvmgr plans {s.capacity - s.payload:,}): this QEMU's LUKS "
                "layout differs", image=self.path, section=s.name)
        return vol

    # ------------------------------------------------------------ writing

    def _require_writable(self) -> None:
        if not self.container.writable:
            raise UsageError("image was opened read-only", image=self.path)

    def _refuse_if_running(self, s: Section, force: bool = False) -> None:
        """Refuse to write live section *s* while a VM may be running on it.

        Two signs count: the storage's own (QEMU's image lock on a file, RBD's
        exclusive lock on an RBD image: never overridden) and the in-use mark the prepare hook sets
        (seen even where QEMU takes no lock: ``locking=off``, a private /dev
        without /dev/null); only *force* overrides the mark.
        """
        if not s.live:
            return
        holder = self.container.running_holder()
        if holder is not None:
            raise BusyError(
                f"section {s.name} is live and {holder}; stop the VM first",
                image=self.path,
                section=s.name,
            )
        if s.dirty and not force:
            raise BusyError(
                f"section {s.name} is live and marked in use by a running VM (set when it "
                "started); stop the VM first. If no VM runs on this image (a host crash "
                "left the mark), give --force, or clear the marks with "
                f"'nvmgr check {self.path} --repair --yes'",
                image=self.path,
                section=s.name,
            )

    def _authenticate(self, unsealed: bool = False) -> None:
        """Check the directory's MAC under the key given (encrypted images).

        :raise WrongKeyError: the key is not one of the image's.
        :raise CorruptError: the MAC is missing (unless *unsealed*) or wrong.
        """
        cipher = self._get_cipher()
        mac = self.directory.mac
        if mac is None:
            if unsealed:
                return
            raise CorruptError(
                "the directory of this encrypted image carries no MAC under its key: "
                "forged, or written before nvmgr authenticated directories. If you trust "
                f"it, seal it: nvmgr rekey {self.path} --key-file KEY --seal-directory",
                image=self.path)
        if not cipher.verify_directory(self.directory.sealed(), mac):
            raise CorruptError(
                "the directory is not authenticated under the image's key (forged, rolled "
                "back or damaged): refusing it", image=self.path)

    def authenticate(self) -> None:
        """Unlock the image with the key given and check its directory's MAC
        now, rather than at the key's first use (the hook's prepare: before
        anything is staged).

        :raise KeyRequiredError: no key was given.
        :raise WrongKeyError, CorruptError: see :meth:`_authenticate`.
        """
        if self.directory.encrypted:
            self._get_cipher()

    def _directory_mac(self, new: Directory) -> Callable[[bytes], bytes] | None:
        """How the commit of *new* is authenticated (encrypted images).

        With the key: a fresh MAC.  Without it (a hook's release, ``grow``,
        a hand-off): the current MAC, carried over, when *new* changes
        nothing it covers; a change it covers needs the key.

        :raise KeyRequiredError: that change, without the key.
        """
        if not new.encrypted:
            return None
        sealed = new.sealed()
        if self.kek is not None:
            mac = self._get_cipher().directory_mac(sealed)
            return lambda _der: mac
        old = self.directory.mac
        if old is None:
            return None  # an unsealed image stays unsealed until sealed with the key
        if not self.directory.encrypted or self.directory.sealed() != sealed:
            raise KeyRequiredError(
                "this change to an encrypted image needs its key (its directory is "
                "authenticated under it): give --key-file, --key-secret or --key-stdin",
                image=self.path)
        return lambda _der: old

    def seal_directory(self) -> None:
        """Authenticate the directory of an image opened ``unsealed``: every
        encrypted section's MAC is checked first, then the directory is
        committed with its MAC.

        :raise CorruptError: a section fails its check.
        :raise KeyRequiredError: no key was given.
        """
        self._require_writable()
        self._keys()
        report = self.check()
        if not report.ok:
            raise CorruptError("refusing to seal: " + "; ".join(report.errors), image=self.path)
        self._commit(self._copy_dir())

    def _commit(self, new: Directory) -> None:
        """Write *new* as the next generation into the other header copy, flush;
        a member's commit is then recorded in its parent's directory."""
        self._member_generations(new)
        new = dataclasses.replace(new, generation=self.directory.generation + 1)
        mac = self._directory_mac(new)
        blob = codec.encode_header(new, mac)
        new.mac = mac(b"") if mac is not None else None
        target = 1 - self._slot
        pad = max(0, self._written[target] - len(blob))
        self.container.write(target * new.header_area, blob + bytes(pad))
        self.container.flush()
        self._written[target] = len(blob)
        self._slot = target
        self.directory = new
        if self._parent is not None:
            parent, index = self._parent
            parent._member_committed(index, self)

    def _copy_dir(self) -> Directory:
        return dataclasses.replace(
            self.directory, sections=[dataclasses.replace(s) for s in self.directory.sections]
        )

    def _find(self, d: Directory, name: str) -> Section:
        """Section *name* of *d* (the current directory or a copy of it)."""
        s = d.find(name)
        if s is None:
            raise NotFoundError(f"no section named {name!r}", image=self.path, section=name)
        return s

    def _write_flush(self, offset: int, data: Buffer, progress: Progress | None) -> None:
        total = len(data)
        view = memoryview(data)
        for done in range(0, max(total, 1), CHUNK):
            self.container.write(offset + done, view[done : done + CHUNK])
            if progress:
                progress(min(done + CHUNK, total), total)
        self.container.flush()

    def _copy_flush(self, src: int, dst: int, length: int) -> None:
        """Copy *length* bytes within the image in :data:`CHUNK` pieces, flush:
        memory stays bounded whatever a directory says a section holds."""
        for off in range(0, length, CHUNK):
            n = min(CHUNK, length - off)
            self.container.write(dst + off, self.container.read(src + off, n))
        self.container.flush()

    def put(self, name: str, data: Buffer, *, progress: Progress | None = None,
            force: bool = False, volume: bool = False) -> Section:
        """Replace the section's payload, crash-safely (see the module docstring).

        :param force: write a live section even though it is marked in use.
        :param volume: *data* is a LUKS section's whole volume as QEMU left it
            in a slot of this image (a backup's capture), stored as it is.
        :raise NoSpaceError: *data* is larger than the section's capacity.
        :raise BusyError: the section is live and a running QEMU holds the image,
            or it is marked in use (without *force*).
        """
        self._require_writable()
        holder, _ = self._where(name)
        if holder is not self:
            holder.put(name, data, progress=progress, force=force, volume=volume)
            return self.section(name)
        s = self._local(self.section(name))
        if volume and (not s.luks or len(data) != s.capacity):
            raise UsageError(f"section {name}: {len(data):,} bytes are not its LUKS volume "
                             f"({s.capacity:,} bytes)", image=self.path, section=name)
        if len(data) > s.payload and not volume:
            raise NoSpaceError(
                f"{len(data)} bytes do not fit section {name} (capacity {s.payload})",
                image=self.path,
                section=name,
            )
        self._refuse_if_running(s, force)
        crypto = None
        stored: Buffer = data
        if s.luks:
            stored = bytes(data) if volume else self._luks_volume(s, data)
        elif s.encrypted:
            if s.spare is None:  # the directory decodes, but offers nowhere to write
                raise CorruptError(f"section {name} has no spare slot to write into",
                                   image=self.path, section=name)
            spare, total = s.spare, len(data)

            def write(off: int, piece: memoryview) -> None:
                self.container.write(spare + off, piece)
                if progress:
                    progress(min(off + len(piece), total), total)

            # One pass: encrypted, MACed and crc'd step by step, straight into the spare slot.
            _n, iv, mac, crc = self._get_cipher().seal_to(name, data, write, chunk=CHUNK)
            self.container.flush()
            crypto = SectionCrypto(iv=iv, mac=mac)
        if crypto is None:
            crc = zlib.crc32(stored)
        new = self._copy_dir()
        ns = self._find(new, name)
        # A forced write keeps the in-use mark: only release or repair clears it.
        # A LUKS section's length is its volume's (header and payload), as QEMU sees the slice.
        ns.length, ns.crc32, ns.crypto = len(stored) if s.luks else len(data), crc, crypto
        if s.live:
            home = s.offset
            self._write_flush(new.scratch_offset, stored, progress)
            ns.offset, ns.home = new.scratch_offset, home
            self._commit(new)
            self._finish_pending()
        else:
            if s.spare is None:  # the directory decodes, but offers nowhere to write
                raise CorruptError(f"section {name} has no spare slot to write into",
                                   image=self.path, section=name)
            if crypto is None:  # an encrypted payload is there already (seal_to)
                self._write_flush(s.spare, stored, progress)
            ns.offset, ns.spare = s.spare, s.offset
            self._commit(new)
        log.info("%s: put %d bytes into section %s", self.path, len(data), name)
        return self.section(name)

    def _finish_pending(self) -> None:
        """Copy live sections staged in scratch to their slot; commit."""
        pending = [(self._local(s), s.home) for s in self.directory.sections
                   if s.home is not None]
        if not pending:
            return
        new = self._copy_dir()
        for s, home in pending:
            self._copy_flush(s.offset, home, s.reserved)
            ns = self._find(new, s.name)
            ns.offset, ns.home = home, None
        self._commit(new)

    def add_sections(self, specs: Iterable[SectionSpec],
                     contents: Mapping[str, Buffer] | None = None,
                     in_use: Iterable[str] = ()) -> list[Section]:
        """Add sections, growing the image; existing sections do not move.

        New slots go first-fit into space nothing uses (see
        :func:`nvmgr.format.layout.extend`), so no byte any section, live
        slice or header copy holds is written.  A new live section that
        reuses freed space gets zeros where no *contents* go (QEMU reads its
        whole slice).  *contents* (section name -> bytes, encrypted where the
        section is) are written into their new slots and flushed before the
        one commit that adds the sections: a crash leaves the image without
        them or with them and their bytes, never a section with other bytes.

        *in_use*: new live sections marked in use by the running VM in that
        same commit (a hot-plug: QEMU writes them from now on).

        :raise NoSpaceError: contents larger than their section, the
            directory or the image full.
        :raise UsageError: contents for a section that is not being added.
        """
        self._require_writable()
        specs = list(specs)
        contents = dict(contents or {})
        if self.directory.encrypted:
            specs = [
                dataclasses.replace(s, encrypted=True) if not s.binding.live else s for s in specs
            ]
        unknown = sorted(set(contents) - {s.name for s in specs})
        if unknown:
            raise UsageError(f"contents given for {', '.join(unknown)}, which is not being added",
                             image=self.path, section=unknown[0])
        for s in specs:
            room = s.capacity - (LUKS_HEADER_SIZE if s.encrypted and s.binding.live else 0)
            if s.name in contents and len(contents[s.name]) > room:
                raise NoSpaceError(f"{len(contents[s.name])} bytes do not fit section {s.name} "
                                   f"(capacity {room})", image=self.path, section=s.name)
        new = extend(self._copy_dir(), specs)
        codec.encode_header(dataclasses.replace(new, generation=new.generation + 1),
                            _mac_room if new.encrypted else None)
        size = self.container.size()
        if new.image_size > size:
            self.container.resize(new.image_size)
        wrote = False
        for spec in specs:
            ns = self._find(new, spec.name)
            data = contents.get(spec.name)
            stored: Buffer = b""
            if ns.luks:
                # QEMU opens nothing but a LUKS volume: one of its contents, or of zeros.
                stored = self._luks_volume(ns, data or b"")
                ns.length, ns.crc32, ns.crypto = len(stored), zlib.crc32(stored), None
                for done in range(0, len(stored), CHUNK):
                    self.container.write(ns.offset + done,
                                         memoryview(stored)[done:done + CHUNK])
                wrote = True
            elif data is not None:
                crypto = None
                stored = data
                if ns.encrypted:
                    ct, iv, mac = self._get_cipher().encrypt(spec.name, bytes(data))
                    stored, crypto = ct, SectionCrypto(iv=iv, mac=mac)
                ns.length, ns.crc32, ns.crypto = len(data), zlib.crc32(stored), crypto
                for done in range(0, len(stored), CHUNK):
                    self.container.write(ns.offset + done,
                                         memoryview(stored)[done:done + CHUNK])
                wrote = True
            if ns.live and ns.offset + len(stored) < size:
                # Freed space may hold a removed section's bytes: QEMU would show them.
                start, end = ns.offset + len(stored), min(ns.offset + ns.reserved, size)
                for off in range(start, end, CHUNK):
                    self.container.write(off, bytes(min(CHUNK, end - off)))
                wrote = True
        if wrote:
            self.container.flush()
        marked = set(in_use)
        for ns in new.sections:
            if ns.name in marked and ns.live and any(s.name == ns.name for s in specs):
                ns.dirty = True
        self._commit(new)
        return [self.section(s.name) for s in specs]

    def remove(self, name: str, *, force: bool = False, unplugged: bool = False) -> None:
        """Drop a section from the directory; its space is free for the next
        section added (:meth:`add_sections`).

        A section in a member image leaves this directory first, then the
        member's (a crash between leaves the member an entry nothing names:
        ``check`` warns of it).  A member left holding nothing is dropped
        from the directory in the same commit, and its file removed after.

        :param unplugged: the caller made sure no running QEMU reads the
            section any more (its node was hot-unplugged): the lock a running
            QEMU holds on the image does not stop the removal of this live
            section (the in-use mark still needs *force*).
        """
        self._require_writable()
        holder, s = self._where(name)
        if not unplugged:
            holder._refuse_if_running(s, force)
        elif s.dirty and not force:
            raise BusyError(f"section {name} is live and marked in use", image=self.path,
                            section=name)
        index = self._find(self.directory, name).member
        new = self._copy_dir()
        new.sections = [x for x in new.sections if x.name != name]
        emptied = index is not None and not any(x.member == index for x in new.sections)
        if emptied:
            new.members = [m for m in new.members or [] if m.index != index] or None
        self._commit(new)
        if holder is not self and index is not None:
            holder.remove(name, force=True)
            if emptied:
                self._drop_member_file(index, holder)

    def _drop_member_file(self, index: int, mi: Image) -> None:
        """Close member *index* (no longer listed) and remove its file (an RBD
        image stays: Ceph's to delete)."""
        self._members.pop(index, None)
        path = mi.path
        mi.close()
        if not is_rbd(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            log.info("%s: removed member image %s, which holds nothing now", self.path, path)

    def resize_section(self, name: str, capacity: int, *, force: bool = False) -> Section:
        """Give a section a new capacity.  Non-live sections move to new slots
        at the end of the image; live sections cannot move (QEMU's arguments
        name their offset) and may only change within their reserved size,
        and not while a VM runs on them.
        """
        self._require_writable()
        holder, _ = self._where(name)
        if holder is not self:
            ms = holder.resize_section(name, capacity, force=force)
            new = self._copy_dir()
            stub = self._find(new, name)
            stub.capacity, stub.reserved, stub.offset, stub.spare = (
                ms.capacity, ms.reserved, ms.home if ms.home is not None else ms.offset, ms.spare)
            self._commit(new)
            return self.section(name)
        s = self._local(self.section(name))
        self._refuse_if_running(s, force)
        if s.luks:
            raise UsageError(f"section {name} is a LUKS volume of a fixed payload size "
                             "(the device's); it cannot be resized", image=self.path,
                             section=name)
        spec = SectionSpec(name, capacity, s.binding, s.encrypted, s.device)
        if capacity < s.length:
            raise NoSpaceError(
                f"section {name} holds {s.length} bytes; cannot shrink it to {capacity}",
                image=self.path,
                section=name,
            )
        if spec.reserved <= s.reserved:
            new = self._copy_dir()
            self._find(new, name).capacity = capacity
            self._commit(new)
            return self.section(name)
        if s.live:
            raise NoSpaceError(
                f"live section {name} cannot grow past {s.reserved} bytes in place; "
                "add a new section or redefine the domain",
                image=self.path,
                section=name,
            )
        base = self._copy_dir()
        base.sections = [x for x in base.sections if x.name != name]
        grown = extend(base, [spec], keep=s.extents())
        moved = grown.sections[-1]
        moved.length, moved.crc32, moved.crypto = s.length, s.crc32, s.crypto
        if grown.image_size > self.container.size():
            self.container.resize(grown.image_size)
        self._copy_flush(s.offset, moved.offset, s.stored_length)
        # Keep the section's place in the directory order.
        new = self._copy_dir()
        new.sections = [moved if x.name == name else x for x in new.sections]
        new.image_size = grown.image_size
        new.scratch_offset, new.scratch_length = grown.scratch_offset, grown.scratch_length
        self._commit(new)
        return self.section(name)

    def set_in_use(self, names: Iterable[str], in_use: bool) -> None:
        """Flag live sections as in use by a running VM (their crc goes stale)."""
        self._require_writable()
        groups = self._by_holder(names)
        for index, group in groups.items():
            if index is not None:
                self.member_image(index).set_in_use(group, in_use)
        new = self._copy_dir()
        changed = False
        for name in groups.get(None, []):
            ns = new.find(name)
            if ns is None:
                raise NotFoundError(f"no section named {name!r}", image=self.path, section=name)
            if ns.live and ns.dirty != in_use:
                ns.dirty, changed = in_use, True
        if changed:
            self._commit(new)

    def set_runner(self, runner: Runner | None, incoming: Runner | None = None) -> None:
        """Record which start of the VM owns the image (``runner``) and which is
        a live migration's destination (``incoming``); commits only a change."""
        self._require_writable()
        if (self.directory.runner, self.directory.incoming) == (runner, incoming):
            return
        new = self._copy_dir()
        new.runner, new.incoming = runner, incoming
        self._commit(new)

    def reseal(self, names: Iterable[str] | None = None) -> list[str]:
        """Recompute the crc of live sections after QEMU wrote them; clear in-use.

        :return: the names of the sections whose content changed.
        """
        self._require_writable()
        changed = []
        for index in sorted({s.member for s in self.directory.sections
                             if s.member is not None and s.live
                             and (names is None or s.name in names)}):
            mine = [s.name for s in self.member_sections(index) if s.live
                    and (names is None or s.name in names)]
            changed += self.member_image(index).reseal(mine)
        # QEMU's writes into the slices may still sit in the page cache (or
        # QEMU's): made durable first, so that a power loss can never keep
        # the crc computed over them while losing the bytes themselves.
        self.container.flush()
        new = self._copy_dir()
        for ns in new.sections:
            if not ns.live or ns.member is not None or (names is not None
                                                          and ns.name not in names):
                continue
            if not ns.length and not ns.luks:  # a LUKS volume's length is sealed: put sets it
                ns.length = ns.capacity
            crc = self._stored_crc(ns)
            if crc != ns.crc32:
                changed.append(ns.name)
            ns.crc32, ns.dirty = crc, False
        self._commit(new)
        return changed

    def use_key(self, kek: Kek | None) -> None:
        """Read and write encrypted sections with *kek* from now on.

        The directory is authenticated under it at its first use (encrypted
        images), so that nothing forged is ever sealed with the key.
        """
        self.kek = kek
        self._cipher = None
        self._data_key = b""

    def reassign(self, *, image_uuid: uuid.UUID, domain_uuid: uuid.UUID | None) -> None:
        """Give the image a new identity and owner (a clone's copy), in both header copies.

        Two commits, so that the older copy, which a torn later commit would
        fall back to, names the new owner too.
        """
        self._require_writable()
        # Members first (opened and checked under the old identity): each a
        # new image of its own whose parent is the new identity.
        renamed = {}
        for m, mi in self.members():
            renamed[m.index] = uuid.uuid4()
            for _copy in "AB":
                nm = mi._copy_dir()
                nm.image_uuid, nm.parent, nm.domain_uuid = renamed[m.index], image_uuid, domain_uuid
                nm.runner = nm.incoming = nm.orphaned = None
                mi._commit(nm)
        for _copy in "AB":
            new = self._copy_dir()
            new.image_uuid = image_uuid
            new.domain_uuid = domain_uuid
            new.runner = new.incoming = None  # a copy is nobody's running image
            new.orphaned = None  # it has an owner
            if new.members:
                new.members = [dataclasses.replace(m, image_uuid=renamed.get(m.index,
                                                                             m.image_uuid))
                               for m in new.members]
            self._commit(new)

    def set_orphaned(self, record: Orphaned | None) -> None:
        """Record that the owner domain was undefined (None: that it is back),
        in both header copies, like :meth:`reassign`."""
        self._require_writable()
        for _copy in "AB":
            new = self._copy_dir()
            new.orphaned = record
            self._commit(new)

    def rekey(self, new_kek: Kek, *, keep_old: bool = False) -> None:
        """Wrap the data key with *new_kek*; drop the current key's slot unless *keep_old*.

        Section data is not rewritten.  At most 8 key slots.
        """
        self._require_writable()
        kek, slots = self._keys()
        self._get_cipher()  # proves the key before anything changes
        members = [mi for _m, mi in self.members()]
        for mi in members:
            mi._get_cipher()
        added = [k for k in slots if k.key_id != new_kek.key_id]
        added.append(KeySlot(new_kek.key_id, new_kek.wrap(self._data_key), new_kek.label))
        final = added if keep_old else [k for k in added if k.key_id != kek.key_id]
        if len(final) > 8 or (members and len(added) > 8):
            raise NoSpaceError("an image holds at most 8 key slots", image=self.path)
        # Members share the data key.  The new key is added everywhere (members
        # first) before the old one leaves anywhere (this image first): a crash
        # at any point leaves one key, old or new, that opens every file.
        if members:
            for mi in members:
                mi._set_key_slots(added)
            self._set_key_slots(added)
        self._set_key_slots(final)
        for mi in members:
            mi._set_key_slots(final)
        self.kek = new_kek
        for mi in members:
            mi.kek = new_kek

    def _set_key_slots(self, slots: list[KeySlot]) -> None:
        if self.directory.key_slots == slots:
            return
        new = self._copy_dir()
        new.key_slots = [dataclasses.replace(k) for k in slots]
        self._commit(new)

    def remove_key(self, key_id: bytes) -> None:
        """Drop one key slot; the last slot cannot be removed."""
        self._require_writable()
        slots = self.directory.key_slots or []
        left = [k for k in slots if k.key_id != key_id]
        if len(left) == len(slots):
            raise NotFoundError(f"no key slot with id {key_id.hex()}", image=self.path)
        if not left:
            raise UsageError("refusing to remove the last key slot", image=self.path)
        self._set_key_slots(left)  # this image first: what it lists, members still open
        for _m, mi in self.members():
            mi._set_key_slots([k for k in mi.directory.key_slots or [] if k.key_id != key_id]
                              or left)

    # ------------------------------------------------------------ checking

    def check(self, *, progress: Progress | None = None) -> CheckReport:
        """Verify both header copies and every section's crc (and MAC with a key).

        Streams: memory stays bounded by one chunk whatever the section sizes.
        """
        errors: list[str] = []
        warnings: list[str] = []
        repairable: list[str] = []
        _, _, self.headers = read_directory(self.container, verify_both=True)
        for h in self.headers:
            if h.error and h.error != "new":
                warnings.append(f"header copy {'AB'[h.slot]} is unusable: {h.error}")
        results: list[SectionCheck] = []
        member_results = self._check_members(errors, warnings, repairable)
        total = sum(s.stored_length for s in self.directory.sections if s.member is None)
        base = 0

        def sub(done: int, _n: int) -> None:
            if progress:
                progress(base + done, total)

        for s in self.directory.sections:
            if s.home is not None:
                warnings.append(f"section {s.name}: a copy to its slot is pending")
            if s.member is not None:
                results.append(member_results.get(s.name) or SectionCheck(
                    s.name, "unverified", f"in member image {s.member}, which was not checked"))
                continue
            if s.live and s.dirty:
                results.append(SectionCheck(s.name, "unverified", "in use by a VM; crc is stale"))
                warnings.append(f"section {s.name} is marked in use by a running VM")
                continue
            crc = self._stored_crc(s, sub)
            base += s.stored_length
            if crc != s.crc32:
                msg = f"section {s.name} is corrupted (crc32 {crc:08x}, expected {s.crc32:08x})"
                errors.append(msg)
                results.append(SectionCheck(s.name, "corrupt", msg))
                if s.live:
                    repairable.append(s.name)
                continue
            if s.luks and s.length:
                if self.kek is None:
                    results.append(SectionCheck(s.name, "ok",
                                                "crc32 ok; LUKS volume not opened (no key)"))
                    continue
                try:
                    self._luks_payload(s, self._read_stored(s))
                except CorruptError as e:
                    errors.append(e.message)
                    results.append(SectionCheck(s.name, "corrupt", e.message))
                    continue
                results.append(SectionCheck(s.name, "ok", "crc32 ok; LUKS volume opens"))
                continue
            if s.crypto is not None:
                if self.kek is None:
                    results.append(SectionCheck(s.name, "ok", "crc32 ok; MAC not checked (no key)"))
                    continue
                cipher = self._get_cipher()
                v = cipher.verifier(s.name, s.crypto.iv)
                for piece in self.container.pieces(s.offset, s.stored_length, CHUNK, reuse=True):
                    v.update(piece)
                if not v.verify(s.crypto.mac):
                    msg = f"section {s.name} is corrupted (MAC mismatch)"
                    errors.append(msg)
                    results.append(SectionCheck(s.name, "corrupt", msg))
                    continue
                results.append(SectionCheck(s.name, "ok", "crc32 and MAC ok"))
            else:
                results.append(SectionCheck(s.name, "ok" if s.length else "empty", "crc32 ok"))
        return CheckReport(self.path, self.headers, results, errors, warnings, repairable)

    def _check_members(self, errors: list[str], warnings: list[str],
                       repairable: list[str]) -> dict[str, SectionCheck]:
        """Check every member (UUID, parent link, the sections it must hold,
        both its header copies, every crc and MAC); its findings join this
        image's report, each naming the member.  :return: the results of the
        sections members hold, by name."""
        out: dict[str, SectionCheck] = {}
        for m in self.directory.members or []:
            names = [s.name for s in self.member_sections(m.index)]
            try:
                mi = self.member_image(m.index)
            except MemberError as e:
                errors.append(e.message)
                for n in names:
                    out[n] = SectionCheck(n, "corrupt", e.message)
                continue
            tag = f"member image {m.index} ({mi.path})"
            r = mi.check()
            errors += [f"{tag}: {e}" for e in r.errors]
            warnings += [f"{tag}: {w}" for w in r.warnings]
            repairable += [n for n in r.repairable if n in names]
            for sc in r.sections:
                if sc.name in names:
                    out[sc.name] = dataclasses.replace(sc, detail=f"{sc.detail} (in {tag})")
                else:
                    warnings.append(f"{tag} holds section {sc.name}, which this image does "
                                    "not place there (left by an interrupted split or "
                                    "remove); it is ignored")
        return out

    def repair(self) -> list[str]:
        """Reseal live sections with the bytes they hold; clear their in-use marks.

        The administrator's recovery for a stopped VM whose live section no
        longer matches its crc (a power loss between QEMU's writes and the
        reseal at release, a write the in-use mark did not cover) or whose
        in-use mark a host crash left behind.  A live section's bytes are the
        guest's own (the UEFI variables OVMF wrote), not nvmgr's, so taking
        them as they are is what the next release would have done.  Sections
        nvmgr writes itself are never touched: their damage stays an error.

        :return: the names of the sections resealed.
        :raise BusyError: a running QEMU holds the image.
        """
        self._require_writable()
        holder = self.container.running_holder()
        if holder is not None:
            raise BusyError(f"{holder}; stop the VM before repairing the image",
                            image=self.path)
        done: list[str] = []
        for _m, mi in self.members():
            names = {s.name for s in self.member_sections(_m.index)}
            done += [n for n in mi.repair() if n in names]
        todo = [s.name for s in self.directory.sections if s.member is None
                and s.live and (s.dirty or self._stored_crc(s) != s.crc32)]
        if todo:
            changed = self.reseal(todo)
            log.warning("%s: resealed live sections %s (content changed: %s)", self.path,
                        todo, changed or "none")
        return done + todo
