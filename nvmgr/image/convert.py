"""Copy an image into another container format with ``qemu-img convert``."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from nvmgr.errors import ExternalError, UsageError
from nvmgr.image.image import Image
from nvmgr.storage import FORMATS, create_container, open_container, probe_format, qemu
from nvmgr.storage.rbd import RbdLocation, is_rbd


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
        for _m, _path, out_m in members:
            if is_rbd(dst) or os.path.lexists(out_m):
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
                if not is_rbd(f):
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
    qemu.img_convert(src_name, "raw" if src_fmt == "rbd" else src_fmt, dst_name, fmt)


#: Bytes copied at a time by :func:`_copy_through_containers`.
COPY_CHUNK = 1 << 20


def _copy_through_containers(src: str, dst: str, fmt: str) -> None:
    with open_container(src) as s:
        size = s.size()
        out = create_container(dst, "raw" if is_rbd(dst) else fmt, size)
        try:
            for off in range(0, size, COPY_CHUNK):
                data = s.read(off, min(COPY_CHUNK, size - off))
                if data.count(0) != len(data):
                    out.write(off, data)
            out.flush()
        finally:
            out.close()


def member_copy_path(dst: str, index: int) -> str:
    """Where a copy of image *dst* keeps its member *index*: ``DST-BASE.mINDEX.EXT``."""
    base, ext = os.path.splitext(dst)
    return f"{base}.m{index}{ext or '.nvram'}"
