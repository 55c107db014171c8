"""Member images: split sections out of an image, merge them back, place new
sections in a member when the image may not grow.

A member is an nvmgr image of its own (two header copies, a directory,
slots, scratch) whose directory names its *parent*, the image UUID of the
image that lists it.  The parent's directory records each member (index,
path, image UUID, format) and keeps an entry per section stored there
(name, binding, device, sizes, ``member``); the member's directory says
where the bytes are (offset, length, crc32, crypto).  An encrypted image's
members carry its key slots (the same data key), so ciphertext moves as it is.

Crash safety (each step flushed; ``tests/test_crash.py`` injects faults at
every I/O):

- ``split``: create the member (or grow an existing one), copy each
  section's bytes into it, commit the member; then commit the parent with the
  sections pointing at the member.  Before that one commit the sections are
  read from the parent, after it from the member; a member left by a crash
  before it is named by nothing (a retry replaces it).
- ``merge``: grow the parent, copy each section's bytes into new slots,
  flush; commit the parent with the sections local again and the member
  dropped; then remove the member's file.
- ``place_in_member``: the same as ``split`` with empty sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ForeignImageError,
    NoSpaceError,
    NotFoundError,
    NvmgrError,
    UsageError,
)
from nvmgr.format import codec
from nvmgr.format.layout import SectionSpec, extend, layout
from nvmgr.format.model import MAX_MEMBERS, Member, Section
from nvmgr.image.image import CHUNK, Buffer, Image
from nvmgr.storage.formats import absolute, image_exists
from nvmgr.storage.rbd import is_rbd

log = logging.getLogger(__name__)

#: Suffix of a member file while it is being created.
PARTIAL = ".partial"


@dataclasses.dataclass
class MemberResult:
    """What a split, merge or placement did."""

    image: str
    member: str
    index: int
    sections: list[str]
    created: bool = False
    removed: bool = False

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _same_place(a: str, b: str) -> bool:
    if is_rbd(a) or is_rbd(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def find_member(img: Image, where: str) -> Member:
    """The member of *img* at *where* (a path, as given or resolved).

    :raise NotFoundError: *where* is not one of *img*'s members; the message
        says when it is a member left over by an interrupted split or merge.
    """
    for m in img.directory.members or []:
        if _same_place(img.member_path(m), absolute(where)) or m.path == where:
            return m
    listed = ", ".join(img.member_path(m) for m in img.directory.members or []) or "none"
    hint = ""
    if image_exists(where):
        with contextlib.suppress(NvmgrError, OSError), Image.open(where) as other:
            if other.directory.parent == img.directory.image_uuid:
                hint = (" (it names this image as its parent: a member left by an "
                        "interrupted split or merge, which nothing reads; remove it)")
    raise NotFoundError(f"{where} is not a member of this image (members: {listed}){hint}",
                        image=img.path)


def member_location(img: Image, index: int, beside: str | None = None,
                    fmt: str | None = None) -> str:
    """Where a member nvmgr makes for *img* goes: beside it, ``NAME.mINDEX.EXT``
    (*beside*: beside that file instead, the image's own path when *img* is
    opened through another location, e.g. the NBD export of a running QEMU;
    a raw member (*fmt*) of a ``.qcow2`` file is ``NAME.mINDEX.nvram``)."""
    base, ext = os.path.splitext(beside or img.path)
    if fmt == "raw" and ext == ".qcow2":
        ext = ".nvram"
    return f"{base}.m{index}{ext or '.nvram'}"


def free_index(img: Image) -> int:
    """The lowest member index *img* does not use.

    :raise NoSpaceError: it has 64 members already.
    """
    used = {m.index for m in img.directory.members or []}
    for i in range(1, MAX_MEMBERS + 1):
        if i not in used:
            return i
    raise NoSpaceError(f"the image has {MAX_MEMBERS} members, the most a directory lists",
                       image=img.path)


def _clear_leftover(img: Image, path: str) -> None:
    """Remove *path* if it is a member of *img* that *img* does not list (an
    interrupted split or merge left it); refuse anything else there.

    :raise BusyError: *path* exists and is something else (never overwritten).
    """
    if not image_exists(path):
        return
    leftover = False
    with contextlib.suppress(ForeignImageError, CorruptError, NotFoundError):
        with Image.open(path) as other:
            leftover = (other.directory.parent == img.directory.image_uuid
                        and all(m.image_uuid != other.directory.image_uuid
                                for m in img.directory.members or []))
    if not leftover and not is_rbd(path):
        leftover = _only_zeros(path)
    if not leftover or is_rbd(path):
        raise BusyError(f"{path} exists; a new member is never written over a file",
                        image=img.path)
    os.unlink(path)
    log.info("%s: removed %s, a member an interrupted split left behind", img.path, path)


def _only_zeros(path: str, limit: int = 1 << 30) -> bool:
    """Whether the file at *path* holds nothing but zero bytes (at most *limit*
    of them): the remains of a member whose creation was cut short before its
    first header copy landed, nothing anyone could lose."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                return False
            while chunk := f.read(CHUNK):
                if chunk.strip(b"\0"):
                    return False
    except OSError:
        return False
    return True


def _open_target(img: Image, into: str, fmt: str | None, specs: list[SectionSpec],
                 contents: Mapping[str, Buffer] | None = None) -> tuple[Image, Member, bool]:
    """The member to move *specs* into: the listed member at *into* (its
    entries of those names that nothing names removed first), or a new one;
    *contents* (new sections' first bytes) are in it, committed, before
    anything names them.

    :return: (member image, its record, whether it was created)
    """
    target = absolute(into)
    for m in img.directory.members or []:
        if _same_place(img.member_path(m), target):
            mi = img.member_image(m.index)
            if fmt is not None and fmt != mi.fmt and not is_rbd(target):
                raise UsageError(f"member {target} is {mi.fmt}, not {fmt}", image=img.path)
            for s in specs:
                if mi.directory.find(s.name) is not None:  # left by an interrupted split
                    mi.remove(s.name, force=True)
            mi.add_sections(specs, contents)
            return mi, m, False
    if _same_place(target, img.path):
        raise UsageError(f"{into} is the image itself", image=img.path)
    fmt = "raw" if is_rbd(target) else (fmt or ("raw" if is_rbd(img.path) else img.fmt))
    index = free_index(img)
    _clear_leftover(img, target)
    mi = _create_member(img, target, specs, fmt, contents)
    return mi, Member(index, target, mi.directory.image_uuid, fmt), True


def _create_member(img: Image, target: str, specs: list[SectionSpec], fmt: str,
                   contents: Mapping[str, Buffer] | None = None) -> Image:
    """A new member of *img* at *target*, its sections empty or holding *contents*.

    A file is made under ``TARGET.partial`` (a partial one an earlier crash
    left is removed first), its directory committed, then renamed to
    *target* and the rename made durable: *target* never holds a member cut
    short (an RBD image is created in place: no power-loss model there).
    """
    if is_rbd(target):
        mi = Image.create(target, specs, fmt=fmt, parent=img)
        for name, data in (contents or {}).items():
            mi.put(name, data)
        return mi
    partial = target + PARTIAL
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    mi = Image.create(partial, specs, fmt=fmt, parent=img)
    try:
        for name, data in (contents or {}).items():
            mi.put(name, data)
    finally:
        mi.close()
    try:
        os.rename(partial, target)
        _sync_dir(target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return Image.open(target, writable=True, kek=img.kek, wait=img._wait, fmt=fmt)


def _sync_dir(path: str) -> None:
    """Make a new file's name durable (fsync of its directory) before anything
    names it: a power loss must not keep the reference and lose the file."""
    if is_rbd(path):
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _new_member_cleanup(mi: Image, created: bool) -> Iterator[list[bool]]:
    """Undo a member made for a split or placement that fails: closed, and its
    file removed while nothing names it yet.

    The body appends to the list it gets just before the parent's commit:
    from that commit's first write on, the parent may name the member, and
    its file stays (a retry, or ``check``, finds it).
    """
    committing: list[bool] = []
    try:
        yield committing
    except BaseException:
        if created:
            mi.close()
            if not committing and not is_rbd(mi.path):  # named by nothing: gone
                with contextlib.suppress(OSError):
                    os.unlink(mi.path)
        raise


def _stub(s: Section, ms: Section, index: int) -> Section:
    """This directory's entry for section *s*, now stored as *ms* in member *index*."""
    return dataclasses.replace(
        s, member=index, capacity=ms.capacity, reserved=ms.reserved,
        offset=ms.home if ms.home is not None else ms.offset, spare=ms.spare, home=None,
        length=0, crc32=0, crypto=None, dirty=False)


def _copy_verified(src: Image, s: Section, dst: Image, offset: int, *, check: bool) -> int:
    """Copy section *s*'s stored bytes from *src* to *offset* of *dst*, in
    chunks; flush.  :return: their crc32.

    :raise CorruptError: *check* and the bytes do not match the crc recorded
        (nothing is committed: the section stays where it was).
    """
    crc = 0
    for off in range(0, s.stored_length, CHUNK):
        chunk = src.container.read(s.offset + off, min(CHUNK, s.stored_length - off))
        crc = zlib.crc32(chunk, crc)
        dst.container.write(offset + off, chunk)
    dst.container.flush()
    if check and crc != s.crc32:
        raise CorruptError(f"section {s.name} is corrupted (crc32 {crc:08x}, directory says "
                           f"{s.crc32:08x}): not moved", image=src.path, section=s.name)
    return crc


def _prepare_move(img: Image, names: Sequence[str], force: bool) -> list[Section]:
    img._require_writable()
    if not names:
        raise UsageError("name at least one section", image=img.path)
    if len(set(names)) != len(names):
        raise UsageError("a section is named twice", image=img.path)
    out = []
    for name in names:
        s = img._find(img.directory, name)
        if s.member is not None:
            m = img.directory.member(s.member)
            raise UsageError(f"section {name} is stored in member image {s.member} "
                             f"({img.member_path(m) if m else '?'}) already",
                             image=img.path, section=name)
        img._refuse_if_running(s, force)
        out.append(s)
    if img.directory.encrypted:
        img._get_cipher()  # the member's directory is sealed under the image's key
    return out


def split(img: Image, names: Sequence[str], into: str, *, fmt: str | None = None,
          force: bool = False) -> MemberResult:
    """Move sections *names* of *img* into the member at *into* (created, or
    a member *img* already lists), crash-safely (module docstring).

    :param force: move a live section marked in use (no VM runs on it).
    :raise UsageError: a section is already in a member, or named twice.
    :raise BusyError: a live section is in use by a running VM; *into* exists
        and is not a member of *img*.
    :raise KeyRequiredError: the image is encrypted and no key was given.
    :raise CorruptError: a section's bytes do not match their crc.
    """
    moving = _prepare_move(img, names, force)
    specs = [SectionSpec(s.name, s.capacity, s.binding, s.encrypted, s.device) for s in moving]
    mi, record, created = _open_target(img, into, fmt, specs)
    with _new_member_cleanup(mi, created) as committing:
        staged = mi._copy_dir()
        for s in moving:
            ms = mi._find(staged, s.name)
            crc = _copy_verified(img, s, mi, ms.offset, check=not (s.live and s.dirty))
            ms.length, ms.crc32, ms.crypto = s.length, crc, s.crypto
        mi._commit(staged)
        new = img._copy_dir()
        if created:  # with the generation it has now (older ones are refused)
            new.members = [*(new.members or []),
                           dataclasses.replace(record, generation=mi.directory.generation)]
        for s in moving:
            stub = _stub(s, mi._find(mi.directory, s.name), record.index)
            new.sections = [stub if x.name == s.name else x for x in new.sections]
        committing.append(True)  # from its first write on, the commit may have landed
        img._commit(new)
    img.adopt_member(record.index, mi)
    log.info("%s: split %s into member %s", img.path, ", ".join(names), mi.path)
    return MemberResult(img.path, mi.path, record.index, list(names), created=created)


def merge(img: Image, where: str, *, force: bool = False) -> MemberResult:
    """Bring every section of the member at *where* back into *img*, then
    remove the member's file (an RBD image is left to Ceph).

    :raise NotFoundError: *where* is not a member of *img*.
    :raise MemberError: the member is missing or foreign.
    :raise BusyError: a live section is in use by a running VM.
    """
    img._require_writable()
    m = find_member(img, where)
    mi = img.member_image(m.index)
    names = [s.name for s in img.member_sections(m.index)]
    stored = [mi._find(mi.directory, n) for n in names]
    for ms in stored:
        mi._refuse_if_running(ms, force)
    if img.directory.encrypted:
        img._get_cipher()
    base = img._copy_dir()
    base.sections = [x for x in base.sections if x.member != m.index]
    grown = extend(base, [SectionSpec(s.name, s.capacity, s.binding, s.encrypted, s.device)
                          for s in stored])
    codec.encode_header(dataclasses.replace(grown, generation=grown.generation + 1),
                        (lambda _d: bytes(32)) if grown.encrypted else None)
    if grown.image_size > img.container.size():
        img.container.resize(grown.image_size)
    placed = {}
    for ms in stored:
        p = grown.find(ms.name)
        if p is None:  # extend places every spec it is given
            raise NvmgrError(f"section {ms.name} was not placed", image=img.path)
        crc = _copy_verified(mi, ms, img, p.offset, check=not (ms.live and ms.dirty))
        p.length, p.crc32, p.crypto = ms.length, crc, ms.crypto
        placed[ms.name] = p
    new = img._copy_dir()
    new.sections = [placed.get(x.name, x) if x.member == m.index else x for x in new.sections]
    new.members = [x for x in new.members or [] if x.index != m.index] or None
    new.image_size = grown.image_size
    new.scratch_offset, new.scratch_length = grown.scratch_offset, grown.scratch_length
    img._commit(new)
    path = mi.path
    img._drop_member_file(m.index, mi)
    log.info("%s: merged %s back from member %s", img.path, ", ".join(names), path)
    return MemberResult(img.path, path, m.index, names, removed=not is_rbd(path))


def place_in_member(img: Image, specs: Sequence[SectionSpec], *, limit: int,
                    into: str | None = None,
                    contents: Mapping[str, Buffer] | None = None,
                    fmt: str | None = None, beside: str | None = None) -> list[MemberResult]:
    """Add new sections *specs* to members of *img* instead of growing it (a
    domain's image may not exceed *limit* bytes): into the last member while
    it stays within *limit*, else into new members beside the image, each
    within *limit* too.  *contents* (name -> first bytes) are committed in
    the member before the image names the section: a crash leaves the image
    without it, or with it holding those bytes.

    :param fmt: the format of new members (default: the image's); with
        *fmt*, the last member takes sections only when it has that format.
    :param beside: the file new members are named after and put beside
        (:func:`member_location`; default: the image's path).

    :raise NoSpaceError: a section alone needs more than *limit* in a new member.
    """
    img._require_writable()
    if img.directory.encrypted:
        img._get_cipher()
        specs = [dataclasses.replace(s, encrypted=True) if not s.binding.live else s
                 for s in specs]
    out: list[MemberResult] = []
    todo = list(specs)
    while todo:
        listed = img.directory.members or []
        last = listed[-1] if listed else None
        batch: list[SectionSpec] = []
        if last is not None and into is None and (fmt is None or last.fmt == fmt):
            mi = img.member_image(last.index)
            stale = {s.name for s in todo if mi.directory.find(s.name) is not None}
            base = mi._copy_dir()
            base.sections = [x for x in base.sections if x.name not in stale]
            for s in todo:
                if extend(base, [*batch, s]).image_size <= limit:
                    batch.append(s)
                else:
                    break
            where = img.member_path(last)
        if not batch:
            for s in todo:
                if layout([*batch, s]).image_size <= limit:
                    batch.append(s)
                else:
                    break
            if not batch:
                s = todo[0]
                raise NoSpaceError(
                    f"section {s.name} ({s.capacity:,} bytes) does not fit an image of at most "
                    f"{limit:,} bytes (the domain's max-image-size), even alone in a member",
                    image=img.path, section=s.name)
            where = into or member_location(img, free_index(img), beside, fmt)
        out.append(_place(img, batch, where, {s.name: contents[s.name] for s in batch
                                              if contents and s.name in contents}, fmt))
        todo = todo[len(batch):]
    return out


def _place(img: Image, specs: list[SectionSpec], into: str,
           contents: Mapping[str, Buffer], fmt: str | None = None) -> MemberResult:
    mi, record, created = _open_target(img, into, fmt, specs, contents)
    with _new_member_cleanup(mi, created) as committing:
        new = img._copy_dir()
        if created:  # with the generation it has now (older ones are refused)
            new.members = [*(new.members or []),
                           dataclasses.replace(record, generation=mi.directory.generation)]
        for s in specs:
            ms = mi._find(mi.directory, s.name)
            new.sections.append(_stub(Section(s.name, s.binding, s.capacity, s.reserved, 0,
                                              encrypted=s.encrypted, device=s.device),
                                      ms, record.index))
        committing.append(True)
        img._commit(new)
    img.adopt_member(record.index, mi)
    log.info("%s: placed %s in member %s", img.path, ", ".join(s.name for s in specs), mi.path)
    return MemberResult(img.path, mi.path, record.index, [s.name for s in specs],
                        created=created)
