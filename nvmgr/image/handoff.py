"""The image for a live migration without shared storage (``nvmgr migrate-image``).

The destination host needs the image at its path before ``virsh migrate``
starts the destination's QEMU; the migration stream then brings what the
running VM changed since: QEMU writes the pflash contents it received back to
the destination's copy when the guest resumes there, and swtpm's state
arrives in the stream and is collected by the destination's release.

So the copy is taken while the VM runs, as crash-consistent as a power loss
(two header copies and two slots per section make any instant readable),
and then made nobody's running image: live sections resealed over the bytes
copied, in-use marks, ``runner`` and ``incoming`` cleared.  The destination's
start takes it as an ordinary start; the source's release keeps to the
source's own image, which is stale once the migration completed.
"""

from __future__ import annotations

import os
import shutil

from nvmgr.errors import UsageError
from nvmgr.image.image import Image
from nvmgr.storage import probe_format, qemu


def copy_for_migration(src: str, dst: str) -> dict[str, object]:
    """Copy the image *src* (a running VM's or not) to *dst*, a new file.

    :return: what was copied: paths, format, the source's runner, the live
        sections resealed in the copy.
    :raise UsageError: *dst* exists (nvmgr never overwrites an image).
    :raise NotFoundError, ForeignImageError, CorruptError: *src* is no
        readable nvmgr image.
    :raise ExternalError: ``qemu-img`` failed copying a qcow2 image.
    """
    if os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    fmt = probe_format(src)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)),
                       f".{os.path.basename(dst)}.nvmgr-tmp")
    with Image.open(src) as img:  # an nvmgr image; no nvmgr writer meanwhile
        runner = img.directory.runner
        if img.directory.members:
            raise UsageError(f"{src} is split into member images; migrate-image copies one "
                             "file: merge the members back first (nvmgr merge, VM stopped) "
                             "or put the members on shared storage", image=src)
        try:
            if fmt == "raw":
                old = os.umask(0o077)
                try:
                    shutil.copyfile(src, tmp)
                finally:
                    os.umask(old)
            else:  # the guest-visible bytes, read past a running QEMU's lock
                qemu.img_convert(src, fmt, tmp, fmt, force_share=True)
        except BaseException:
            _unlink(tmp)
            raise
    try:
        with Image.open(tmp, writable=True) as copy:
            live = [s.name for s in copy.directory.sections if s.live]
            copy.reseal(live)
            # Both header copies, so the older one a torn write falls back to agrees.
            copy.reassign(image_uuid=copy.directory.image_uuid,
                          domain_uuid=copy.directory.domain_uuid)
            report = copy.check()
        if not report.ok:
            raise UsageError(f"the copy of {src} does not check: {'; '.join(report.errors)}")
        os.replace(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise
    return {"image": src, "output": dst, "format": fmt,
            "runner": runner.to_json() if runner else None, "resealed": live}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
