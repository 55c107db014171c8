"""Copy an image into another container format with ``qemu-img convert``; encrypt
a plaintext image (:func:`encrypt`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ExternalError,
    ForeignImageError,
    NoSpaceError,
    UsageError,
)
from nvmgr.format.layout import SectionSpec
from nvmgr.image.image import Image
from nvmgr.storage import FORMATS, create_container, is_location, open_container, probe_format, qemu
from nvmgr.storage.nbd import is_nbd
from nvmgr.storage.rbd import RbdLocation, is_rbd

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek


def convert(src: str, dst: str, fmt: str) -> None:
    """Convert *src* (an nvmgr image) to *dst* in *fmt*; *dst* must not exist.

    The source is opened read-only first, which checks it is an nvmgr image
    and holds nvmgr's shared lock so no nvmgr writer changes it meanwhile.
    The copy is then opened and checked (every crc32, both header copies).

    :raise UsageError: *dst* exists or *fmt* is unknown.
    :raise BusyError: a running QEMU holds *src* with a conflicting lock.
    :raise ExternalError: qemu-img is missing or failed (its words in the message).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    if is_rbd(dst):
        if fmt != "raw":
            raise UsageError(f"an RBD image holds nvmgr's layout raw, not as {fmt}", image=dst)
        dst_name = dst
    elif is_nbd(dst):
        if fmt != "raw":
            raise UsageError(f"an NBD export holds nvmgr's layout raw, not as {fmt}", image=dst)
        dst_name = dst
    elif os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    else:
        dst_name = dst
    src_fmt = probe_format(src)
    src_name = src
    copies: list[str] = []
    with Image.open(src) as img:
        # Members are copied beside the copy (DST.mN.EXT), never shared with the source:
        # each checked (UUID, parent link) and each target free before anything is copied.
        members = [(m, mi.path, member_copy_path(dst, m.index)) for m, mi in img.members()]
        if is_nbd(dst):
            _nbd_target(dst, img.container.size())
        for _m, _path, out_m in members:
            if is_location(dst) or os.path.lexists(out_m):
                raise UsageError(f"{out_m} (for member image {_m.index}) already exists or "
                                 "cannot be made: nvmgr never overwrites an image", image=dst)
        try:
            _convert_one(src_name, src_fmt, dst_name, fmt)
        except ExternalError as e:
            if is_rbd(dst) and "exists" in str(e).lower():
                raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)",
                                 image=dst) from e
            raise
        try:
            for _m, path, out_m in members:
                m_fmt = probe_format(path)
                _convert_one(path, m_fmt, out_m, fmt)
                copies.append(out_m)
            if members:
                with Image.open(dst, writable=True) as out:
                    new = out._copy_dir()
                    new.members = [dataclasses.replace(m, path=out_m, fmt=fmt)
                                   for m, _path, out_m in members]
                    out._commit(new)
        except BaseException:
            for f in [*copies, dst]:
                if not is_location(f):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            raise
    with Image.open(dst) as out:
        out.check()


def _secret_keyed(location: str) -> bool:
    """An RBD image whose key nvmgr reads from a libvirt secret."""
    if not is_rbd(location):
        return False
    loc = RbdLocation.parse(location)
    return bool(loc.secret or loc.secret_usage)


def _convert_one(src: str, src_fmt: str, dst: str, fmt: str) -> None:
    """Copy the guest-visible bytes of image *src* into the new image *dst* in *fmt*.

    ``qemu-img convert`` does it, naming an RBD image the way it takes it; an RBD
    image whose key comes from a libvirt secret is copied through nvmgr's own
    containers instead (they hand the key to QEMU as a secret object), block by
    block, leaving zero blocks unwritten (a new image reads zeros).
    """
    if _secret_keyed(src) or _secret_keyed(dst):
        _copy_through_containers(src, dst, fmt)
        return
    src_name = RbdLocation.parse(src).qemu_filename() if is_rbd(src) else src
    dst_name = RbdLocation.parse(dst).qemu_filename() if is_rbd(dst) else dst
    # An NBD export exists already (its server made it): written over, never created.
    qemu.img_convert(src_name, "raw" if src_fmt in ("rbd", "nbd") else src_fmt, dst_name, fmt,
                     existing=is_nbd(dst))


#: Bytes copied at a time by :func:`_copy_through_containers`.
COPY_CHUNK = 1 << 20


def _copy_through_containers(src: str, dst: str, fmt: str) -> None:
    with open_container(src) as s:
        size = s.size()
        existing = is_nbd(dst)  # an export holds what it held: every block written
        out = (open_container(dst, writable=True) if existing
               else create_container(dst, "raw" if is_rbd(dst) else fmt, size))
        try:
            for off in range(0, size, COPY_CHUNK):
                data = s.read(off, min(COPY_CHUNK, size - off))
                if existing or data.count(0) != len(data):
                    out.write(off, data)
            out.flush()
        finally:
            out.close()


def _nbd_target(dst: str, size: int) -> None:
    """An NBD export may receive a copy of *size* bytes when it holds no nvmgr image
    (nvmgr never overwrites an image) and is large enough (its server sizes it).

    :raise UsageError: the export holds an nvmgr image.
    :raise NoSpaceError: the export is smaller than the copy.
    :raise NotFoundError: the server has no such export.
    """
    try:
        with Image.open(dst):
            pass
    except (ForeignImageError, CorruptError):
        pass  # not an nvmgr image (zeros, or anything else): it may be written
    else:
        raise UsageError(f"{dst} holds an nvmgr image already (nvmgr never overwrites an "
                         "image)", image=dst)
    with open_container(dst) as c:
        have = c.size()
    if have < size:
        raise NoSpaceError(f"the NBD export holds {have:,} bytes, the image {size:,}",
                           image=dst)


def member_copy_path(dst: str, index: int) -> str:
    """Where a copy of image *dst* keeps its member *index*: ``DST-BASE.mINDEX.EXT``."""
    base, ext = os.path.splitext(dst)
    return f"{base}.m{index}{ext or '.nvram'}"


def encrypt_path(path: str) -> str:
    """Where :func:`encrypt` builds the encrypted copy of *path* before it takes its place."""
    return f"{path}.nvmgr-encrypt"


def encrypt(path: str, kek: Kek) -> dict[str, object]:
    """Encrypt the image *path* under *kek*: every section, the live ones as
    LUKS volumes inside their slot (their capacity grows by the LUKS header,
    so they move: the domain's QEMU arguments must be made again).

    Crash-safe: the encrypted image is built beside it (:func:`encrypt_path`,
    same image and domain UUID, a new data key wrapped by *kek*) from the
    sections' verified payloads, flushed, then renamed over the original in
    one step.  Killed before the rename, the original is untouched (a
    leftover copy is removed by the next run); after it, the encrypted image
    is whole.  The original's bytes are then overwritten with zeros (a raw
    file: its plaintext does not linger in the freed blocks).

    An image already encrypted under *kek* whose live sections are LUKS
    volumes is left as it is (nothing to do: ``encrypted`` is empty).

    :raise UsageError: an RBD image, or one with member images (merge first).
    :raise BusyError: a VM runs on it (a live section in use, QEMU's lock).
    :raise WrongKeyError: the image is encrypted under another key.
    """
    from nvmgr.format.model import LUKS_HEADER_SIZE
    if is_location(path):
        raise UsageError("an image on RBD or an NBD server is not encrypted in place; convert "
                         "it to a file first (nvmgr convert), encrypt that, and convert it back",
                         image=path)
    tmp = encrypt_path(path)
    with Image.open(path, writable=True, kek=kek) as old:
        d = old.directory
        if d.members:
            raise UsageError("the image has member images: merge them back first "
                             "(nvmgr merge) and encrypt it then", image=path)
        if d.encrypted:
            old.authenticate()  # another key: WrongKeyError, before anything is made
        todo = [s.name for s in d.sections if not s.encrypted]
        if not todo:
            return {"image": path, "encrypted": [], "moved": []}
        busy = [s.name for s in d.sections if s.live and s.dirty]
        if busy or old.container.running_holder() is not None:
            raise BusyError(f"a VM runs on the image (live sections in use: "
                            f"{', '.join(busy) or 'none'}; or QEMU holds it): stop it first",
                            image=path)
        payloads = {s.name: old.get(s.name) for s in d.sections if s.length}
        specs = [SectionSpec(s.name, s.capacity + (LUKS_HEADER_SIZE if s.live and not s.luks
                                                   else 0),
                             s.binding, True, s.device) for s in d.sections]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a copy an earlier run left, killed before its rename
        try:
            with Image.create(tmp, specs, fmt=old.fmt, kek=kek, domain_uuid=d.domain_uuid,
                              image_uuid=d.image_uuid) as new:
                for name, data in payloads.items():
                    new.put(name, data)
                moved = [s.name for s in d.sections if s.live
                         and new.section(s.name).offset != s.offset]
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        wipe = os.open(path, os.O_RDWR | os.O_CLOEXEC) if old.fmt == "raw" else -1
        try:
            old.container._fault("rename", 0, 0)  # the commit point: counted as an I/O
            os.replace(tmp, path)
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if wipe >= 0:  # the original's inode, no longer named: its plaintext zeroed
                size = os.fstat(wipe).st_size
                old.container._fault("wipe", 0, size)
                for off in range(0, size, 4 << 20):
                    os.pwrite(wipe, bytes(min(4 << 20, size - off)), off)
                os.fsync(wipe)
        finally:
            if wipe >= 0:
                os.close(wipe)
    return {"image": path, "encrypted": todo, "moved": moved}
