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

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable

from nvmgr.errors import CorruptError, ForeignImageError, NotFoundError, UsageError
from nvmgr.format.model import Member
from nvmgr.image.image import Image
from nvmgr.storage import probe_format, qemu
from nvmgr.storage.rbd import is_rbd

#: Fault injection for tests: called as ``fault(kind, path)`` before each
#: file-level step of :func:`copy_for_migration` (``copy`` of a whole file,
#: its ``fsync``, ``rename`` into place, ``fsync-dir``); the copy's own writes go through
#: its container (``Container._fault``).
fault: Callable[[str, str], None] | None = None


def _fault(kind: str, path: str) -> None:
    if fault is not None:
        fault(kind, path)


def _member_target(src: str, dst: str, m: Member, index_path: str) -> tuple[str, str | None]:
    """Where the copy of member *m* goes, and the path the copy's directory
    records for it (None: the recorded path, unchanged).

    A relative path stays relative: the member goes beside the copy.  An
    absolute one keeps its path on the destination when *dst* maps *src*
    under a prefix (``/mnt/dst`` + the image's own path: the member goes under
    the same prefix); otherwise the member goes beside the copy as
    ``DST-BASE.mINDEX.EXT`` and the copy records that name, relative.
    """
    if not os.path.isabs(m.path):
        return os.path.join(os.path.dirname(os.path.abspath(dst)), m.path), None
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    if dst_abs != src_abs and dst_abs.endswith(src_abs):
        return dst_abs[: -len(src_abs)] + m.path, None
    return index_path, os.path.basename(index_path)


def _ours(path: str, parent: object) -> bool:
    """Whether *path* is a member copy an interrupted migrate-image left:
    an nvmgr image whose parent is *parent* (anything else is never replaced)."""
    with contextlib.suppress(CorruptError, ForeignImageError, NotFoundError, OSError), \
            Image.open(path) as other:
        return other.directory.parent == parent
    return False


def _copy_file(src: str, fmt: str, dst: str) -> None:
    _fault("copy", dst)
    if fmt == "raw":
        old = os.umask(0o077)
        try:
            shutil.copyfile(src, dst)
        finally:
            os.umask(old)
    else:  # the guest-visible bytes, read past a running QEMU's lock
        qemu.img_convert(src, fmt, dst, fmt, force_share=True)
    # Durable before a rename can name it (a member copy is never written
    # through a container, whose flush would do it).
    _fault("fsync", dst)
    fd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: str) -> None:
    _fault("fsync-dir", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_for_migration(src: str, dst: str) -> dict[str, object]:
    """Copy the image *src* (a running VM's or not) to *dst*, a new file, and
    its members (a split image's) where the destination finds them
    (:func:`_member_target`).

    Crash-safe: every file is copied under a hidden temporary name beside its
    target and sealed there; the members are renamed into place first, the
    image last (its rename is the commit point: before it, *dst* does not
    exist, and a member copy left at its target names the source's image as
    its parent and is replaced by the next run).

    :return: what was copied: paths, format, the source's runner, the live
        sections resealed in the copy, each member copy.
    :raise UsageError: *dst* (or a member's target) exists (nvmgr never
        overwrites an image); a member on RBD (shared storage already: the
        copy would share it with the source's image).
    :raise NotFoundError, ForeignImageError, CorruptError: *src* is no
        readable nvmgr image.
    :raise MemberError: a member is missing, foreign or an older copy.
    :raise ExternalError: ``qemu-img`` failed copying a qcow2 image.
    """
    if os.path.lexists(dst):
        raise UsageError(f"{dst} already exists (nvmgr never overwrites an image)")
    fmt = probe_format(src)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)),
                       f".{os.path.basename(dst)}.nvmgr-tmp")
    made: list[str] = [tmp]
    moves: dict[int, tuple[str, str]] = {}  # member index -> (temporary copy, target)
    records: dict[int, str] = {}  # member index -> the path the copy records
    try:
        with Image.open(src) as img:  # an nvmgr image; no nvmgr writer meanwhile
            runner = img.directory.runner
            for m, mi in img.members():  # each checked: UUID, parent link, generation
                if is_rbd(mi.path):
                    raise UsageError(f"member image {m.index} of {src} is on RBD ({mi.path}): "
                                     "migrate-image copies files; merge it back first (nvmgr "
                                     "merge, VM stopped)", image=src)
                target, record = _member_target(src, dst, m, _beside(dst, m.index))
                if os.path.lexists(target) and not _ours(target, img.directory.image_uuid):
                    raise UsageError(f"{target} (for member image {m.index}) already exists "
                                     "(nvmgr never overwrites an image)", image=src)
                part = os.path.join(os.path.dirname(target),
                                    f".{os.path.basename(target)}.nvmgr-tmp")
                os.makedirs(os.path.dirname(target), mode=0o711, exist_ok=True)
                made.append(part)
                _copy_file(mi.path, probe_format(mi.path), part)
                moves[m.index] = (part, target)
                records[m.index] = record if record is not None else m.path
            _copy_file(src, fmt, tmp)
        with Image.open(tmp, writable=True) as copy:
            if moves:  # sealed against the member copies, where they are now
                new = copy._copy_dir()
                new.members = [dataclasses.replace(m, path=moves[m.index][0])
                               for m in new.members or []]
                copy._commit(new)
            live = [s.name for s in copy.directory.sections if s.live]
            copy.reseal(live)
            # Both header copies, so the older one a torn write falls back to agrees.
            copy.reassign(image_uuid=copy.directory.image_uuid,
                          domain_uuid=copy.directory.domain_uuid)
            report = copy.check()
            if moves:  # then the paths the destination finds them at
                new = copy._copy_dir()
                new.members = [dataclasses.replace(m, path=records[m.index])
                               for m in new.members or []]
                for _copy in "AB":
                    copy._commit(new)
                    new = copy._copy_dir()
        if not report.ok:
            raise UsageError(f"the copy of {src} does not check: {'; '.join(report.errors)}")
        for part, target in moves.values():
            _fault("rename", target)
            os.replace(part, target)
            made.append(target)  # removed again if the image's own rename does not follow
            _sync_dir(target)
        _fault("rename", dst)
        os.replace(tmp, dst)
        made.clear()  # the copy is there, its members with it
        _sync_dir(dst)
    except BaseException:
        for f in made:
            _unlink(f)
        raise
    return {"image": src, "output": dst, "format": fmt,
            "runner": runner.to_json() if runner else None, "resealed": live,
            "members": [{"index": i, "path": t, "recorded": records[i]}
                        for i, (_p, t) in sorted(moves.items())]}


def _beside(dst: str, index: int) -> str:
    """``DST-BASE.mINDEX.EXT``: a member copy beside the copy *dst*."""
    base, ext = os.path.splitext(os.path.abspath(dst))
    return f"{base}.m{index}{ext or '.nvram'}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
