"""Copy an image into another container format with ``qemu-img convert``."""

from __future__ import annotations

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
        dst_name = RbdLocation.parse(dst).qemu_filename()
    elif os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    else:
        dst_name = dst
    src_fmt = probe_format(src)
    src_name = RbdLocation.parse(src).qemu_filename() if is_rbd(src) else src
    with Image.open(src):
        try:
            qemu.img_convert(src_name, "raw" if src_fmt == "rbd" else src_fmt, dst_name, fmt)
        except ExternalError as e:
            if is_rbd(dst) and "exists" in str(e).lower():
                raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)",
                                 image=dst) from e
            raise
    with Image.open(dst) as out:
        out.check()
