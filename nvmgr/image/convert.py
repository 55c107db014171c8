"""Copy an image into another container format with ``qemu-img convert``."""

from __future__ import annotations

import os
import subprocess

from nvmgr.errors import ExternalError, UsageError
from nvmgr.image.image import Image
from nvmgr.storage.container import probe_format


def convert(src: str, dst: str, fmt: str) -> None:
    """Convert *src* (an nvmgr image) to *dst* in *fmt*; *dst* must not exist.

    The source is opened read-only first, which checks it is an nvmgr image
    and holds nvmgr's shared lock so no nvmgr writer changes it meanwhile.

    :raise UsageError: *dst* exists or *fmt* is unknown.
    :raise ExternalError: qemu-img failed.
    """
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"unknown format {fmt!r} (raw or qcow2)")
    if os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    with Image.open(src):
        cmd = ["qemu-img", "convert", "-f", probe_format(src), "-O", fmt, src, dst]
        old = os.umask(0o077)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            os.umask(old)
        if p.returncode:
            if os.path.exists(dst):
                os.unlink(dst)
            raise ExternalError("qemu-img convert failed", detail=p.stderr, image=src)
    with Image.open(dst) as out:
        out.check()
