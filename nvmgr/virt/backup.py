"""``nvmgr backup`` and ``nvmgr restore``: every section of a VM at one instant.

A backup is an nvmgr image of its own (same sections, same layout, same key
slots, a new image UUID, the same owner domain) that ``nvmgr check`` passes.

Of a running VM, three kinds of state change while it runs: the live slices
QEMU writes (UEFI variables in the pflash slice, ``block`` sections), and the
TPM's state files that swtpm writes in libvirt's state directory (the image
gets them back at ``release``).  The rest (stored blobs) changes only through
nvmgr, whose writers wait while the backup holds the image's shared lock.
So a backup of a running VM:

1. opens the image (nvmgr's shared lock: no nvmgr writer until the end) and
   copies the whole file to a temporary file beside OUT, the guest running
   (live slices in that copy may be torn: they are replaced in step 3);
2. pauses the guest (``virDomainSuspend``: QEMU stops the vCPUs, drains and
   flushes every block node, so the image file holds all it wrote), reads
   the live slices (opening the image again: a qcow2 image's metadata may
   have changed since step 1) and swtpm's state files, and resumes it;
3. writes what step 2 read into the copy, seals it (fresh crc32s, no in-use
   marks), gives it a new image UUID, checks it, and renames it to OUT.

The pause holds only reads: a few hundred KiB of varstore, a few KiB of
TPM state.  A VM that was already paused is left paused.  A stopped VM is
copied without a pause (staged TPM state a crash left behind included, as
the next start would recover it).

``restore`` writes a backup's sections back into a stopped VM's image, each
one crash-safely (the old or the new content, never a mix), after checking
the whole backup and that every section fits: a corrupt backup or a section
that no longer fits changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from nvmgr import paths
from nvmgr.domain.elements import Domain, parse_domain
from nvmgr.domain.profiles import tpm_version
from nvmgr.errors import CorruptError, NoSpaceError, NotFoundError, UsageError
from nvmgr.image.image import Image
from nvmgr.provision import staging
from nvmgr.storage import FORMATS, probe_format, qemu
from nvmgr.virt import conn as virt

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek


#: libvirt's virDomainState for a paused guest (VIR_DOMAIN_PAUSED).
_PAUSED = 3


@dataclasses.dataclass
class BackupResult:
    domain: str
    image: str
    backup: str
    image_uuid: str
    running: bool
    #: Milliseconds from asking libvirt to pause the guest to its resume returning
    #: (None: the VM was not running, or was paused already).
    paused_ms: float | None
    sections: list[str]
    tpm_files: list[str]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RestoreResult:
    domain: str
    image: str
    backup: str
    restored: list[str]
    skipped: list[str]
    tpm_wiped: list[str]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _domain(name: str, uri: str | None, *, live: bool) -> tuple[Domain, str]:
    dom = parse_domain(virt.domain_xml(name, uri, inactive=not live))
    meta = dom.nvmgr
    if meta is None or not meta.image:
        raise UsageError(f"domain {name} has no nvmgr image (no nvmgr metadata)", domain=name)
    return dom, meta.image


def _tpm_state(dom: Domain, img: Image, swtpm_root: str) -> dict[str, tuple[str, bytes]]:
    """swtpm's staged state files of *dom*: section name -> (file name, bytes)."""
    version = next((tpm_version(t.model, t.version) for t in dom.tpms), "2.0")
    state_dir = staging.tpm_state_dir(str(dom.uuid), version, swtpm_root)
    out = {}
    for s in staging.tpm_sections(img.directory.sections):
        fname = staging.tpm_file_name(s.name, version)
        got = staging.read_tpm(state_dir, [fname])
        if fname in got:
            out[s.name] = (str(state_dir / fname), got[fname])
    return out


def _capture(path: str, dom: Domain,
             swtpm_root: str) -> tuple[dict[str, bytes], dict[str, tuple[str, bytes]]]:
    """The live slices' bytes (all the slice QEMU sees) and swtpm's staged files, read now."""
    with Image.open(path) as img:
        live = {s.name: img.container.read(s.offset, s.capacity)
                for s in img.directory.sections if s.live and s.member is None}
        return live, _tpm_state(dom, img, swtpm_root)


def backup(name: str, out: str, *, uri: str | None = None, kek: Kek | None = None,
           fmt: str | None = None, swtpm_root: str = paths.SWTPM_STATE_ROOT) -> BackupResult:
    """Back up domain *name*'s image into the new file *out*.

    :raise UsageError: *out* exists, or an unknown *fmt*.
    :raise KeyRequiredError: TPM state to store in an encrypted section and no key.
    :raise CorruptError: the copy does not check (nothing is left at *out*).
    """
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists (nvmgr never overwrites an image)")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    with virt.connect(uri) as conn:
        vdom = virt.lookup(conn, name)
        running = bool(vdom.isActive())
        dom, path = _domain(name, uri, live=running)
        src_fmt = probe_format(path)
        tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex}")
        try:
            with Image.open(path):  # nvmgr's shared lock: no nvmgr writer until we are done
                qemu.img_convert(path, src_fmt, tmp, fmt or src_fmt, force_share=running)
                paused_ms = None
                if running and vdom.state()[0] != _PAUSED:
                    t0 = time.monotonic()
                    vdom.suspend()
                    try:
                        live, tpm = _capture(path, dom, swtpm_root)
                    finally:
                        vdom.resume()
                        paused_ms = (time.monotonic() - t0) * 1000
                else:
                    live, tpm = _capture(path, dom, swtpm_root)
            new_uuid = _seal_copy(tmp, live, {k: v[1] for k, v in tpm.items()}, kek)
            os.link(tmp, out)  # never replaces a file that appeared meanwhile
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return BackupResult(name, path, out, str(new_uuid), running, paused_ms,
                        sorted(live), sorted(v[0] for v in tpm.values()))


def _seal_copy(tmp: str, live: dict[str, bytes], tpm: dict[str, bytes],
               kek: Kek | None) -> uuid.UUID:
    """Write the captured bytes into the copy, give it its own UUID, check it."""
    new_uuid = uuid.uuid4()
    with Image.open(tmp, writable=True, kek=kek) as img:
        img.set_in_use([s.name for s in img.directory.sections if s.live], False)
        for name, data in live.items():
            img.put(name, data)
        for name, data in tpm.items():
            img.put(name, data)
        img.reassign(image_uuid=new_uuid, domain_uuid=img.directory.domain_uuid)
        report = img.check()
        if not report.ok:
            raise CorruptError("the backup copy does not check: " + "; ".join(report.errors),
                               image=tmp)
        img.container.flush()
    return new_uuid


def restore(name: str, src: str, *, uri: str | None = None, kek: Kek | None = None,
            sections: list[str] | None = None,
            swtpm_root: str = paths.SWTPM_STATE_ROOT) -> RestoreResult:
    """Write backup *src*'s sections into stopped domain *name*'s image.

    :raise BusyError: the domain is running.
    :raise CorruptError: the backup does not check (nothing is written).
    :raise NoSpaceError: a section of the backup no longer fits (nothing is written).
    :raise NotFoundError: a section named in *sections* is not in the backup.
    """
    virt.require_inactive(name, uri, what="restoring its state")
    dom, path = _domain(name, uri, live=False)
    if not os.path.exists(src):
        raise NotFoundError(f"no backup at {src}")
    with Image.open(src, kek=kek) as bk, Image.open(path, writable=True, kek=kek) as img:
        report = bk.check()
        if not report.ok:
            raise CorruptError("the backup does not check: " + "; ".join(report.errors),
                               image=src)
        wanted = sections or [s.name for s in bk.directory.sections]
        data: dict[str, bytes] = {}
        skipped = []
        for sname in wanted:
            bs = bk.directory.find(sname)
            if bs is None:
                raise NotFoundError(f"no section named {sname!r} in the backup",
                                    image=src, section=sname)
            target = img.directory.find(sname)
            if target is None:
                skipped.append(sname)
                continue
            blob = bk.get(sname)
            if len(blob) > target.capacity:
                raise NoSpaceError(f"section {sname} of the backup ({len(blob)} bytes) no longer "
                                   f"fits the domain's section (capacity {target.capacity})",
                                   image=path, section=sname)
            data[sname] = blob
        # The VM is stopped: an in-use mark is a crash's leftover, and it is overwritten.
        img.set_in_use([n for n in data if img.section(n).live], False)
        for sname, blob in data.items():
            img.put(sname, blob)
        # Staged TPM state would be taken over the restored one at the next start.
        tpm_names = {s.name for s in staging.tpm_sections(img.directory.sections)}
        wiped = [p for n, (p, _b) in _tpm_state(dom, img, swtpm_root).items()
                 if n in data and n in tpm_names]
        for p in wiped:
            staging.wipe_tpm(Path(p).parent, [Path(p).name])
    return RestoreResult(name, path, os.path.abspath(src), sorted(data), skipped, wiped)
