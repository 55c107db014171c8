"""Copy an image into another container format with ``qemu-img convert``."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from nvmgr.errors import ExternalError, UsageError
from nvmgr.image.image import Image
from nvmgr.storage import FORMATS, probe_format, qemu
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
        dst_name = _rbd_name(dst)
    elif os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    else:
        dst_name = dst
    src_fmt = probe_format(src)
    src_name = _rbd_name(src) if is_rbd(src) else src
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
            qemu.img_convert(src_name, "raw" if src_fmt == "rbd" else src_fmt, dst_name, fmt)
        except ExternalError as e:
            if is_rbd(dst) and "exists" in str(e).lower():
                raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)",
                                 image=dst) from e
            raise
        try:
            for _m, path, out_m in members:
                m_fmt = probe_format(path)
                name = _rbd_name(path) if is_rbd(path) else path
                qemu.img_convert(name, "raw" if m_fmt == "rbd" else m_fmt, out_m, fmt)
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


def _rbd_name(location: str) -> str:
    """qemu-img's name of an RBD image for ``qemu-img convert``.

    :raise UsageError: the key comes from a libvirt secret (``qemu-img convert``
        would need it as a secret object of both its images; not done yet).
    """
    loc = RbdLocation.parse(location)
    if loc.secret or loc.secret_usage:
        raise UsageError("convert of an RBD image whose key comes from a libvirt secret is "
                         "not supported yet: name the user's keyring (keyring=FILE) for it",
                         image=location)
    return loc.qemu_filename()


def member_copy_path(dst: str, index: int) -> str:
    """Where a copy of image *dst* keeps its member *index*: ``DST-BASE.mINDEX.EXT``."""
    base, ext = os.path.splitext(dst)
    return f"{base}.m{index}{ext or '.nvram'}"
