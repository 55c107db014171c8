"""Copy an image into another container format with ``qemu-img convert``."""

from __future__ import annotations

import os

from nvmgr.errors import UsageError
from nvmgr.image.image import Image
from nvmgr.storage import FORMATS, probe_format, qemu


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
    if os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    with Image.open(src):
        qemu.img_convert(src, probe_format(src), dst, fmt)
    with Image.open(dst) as out:
        out.check()
