"""``nvmgr backup`` and ``nvmgr restore``: every section of a VM at one instant.

A backup is an nvmgr image of its own (same sections, same layout, same key
slots, a new image UUID, the same owner domain) that ``nvmgr check`` passes.
It is one file: the sections a split image keeps in member images are
copied with the image and merged into the backup (after the image's own
sections); ``restore`` puts each back where the domain keeps it, member or not.

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
from typing import TYPE_CHECKING

from nvmgr import paths
from nvmgr.domain.elements import Domain, parse_domain
from nvmgr.errors import CorruptError, NoSpaceError, NotFoundError, UsageError
from nvmgr.image import members
from nvmgr.image.image import Image
from nvmgr.provision import staging
from nvmgr.storage import FORMATS, is_location, probe_format, qcow2, qemu, rbd
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
    """swtpm's staged state files of *dom*: section name -> (file path, bytes)."""
    files = staging.tpm_state_files(
        dom, [s.name for s in staging.tpm_sections(img.directory.sections)], swtpm_root)
    got = staging.read_files(files)
    return {n: (str(files[n]), data) for n, data in got.items()}


def _capture(path: str, dom: Domain,
             swtpm_root: str) -> tuple[dict[str, bytes], dict[str, tuple[str, bytes]]]:
    """The live slices' bytes (all the slice QEMU sees, in the image's file
    or its member's) and swtpm's staged files, read now."""
    with Image.open(path) as img:
        live = {}
        for s in img.directory.sections:
            if s.live:
                holder = img if s.member is None else img.member_image(s.member)
                at = holder.directory.find(s.name) if s.member is not None else s
                if at is None:  # member_image checked it is there
                    raise CorruptError(f"section {s.name} is missing from its member",
                                       image=path, section=s.name)
                live[s.name] = holder.container.read(at.offset, at.capacity)
        return live, _tpm_state(dom, img, swtpm_root)


def _copy(path: str, fmt: str, dst: str, dst_fmt: str | None, running: bool) -> None:
    """An image copied into the new file *dst* (*dst_fmt*, else its own format; an
    RBD image's layout is raw, and it is read through the storage seam, which
    hands QEMU the cephx key)."""
    if fmt == rbd.RbdContainer.fmt:
        rbd.copy_out(path, dst, dst_fmt or "raw", force_share=running)
    else:
        qemu.img_convert(path, fmt, dst, dst_fmt or fmt, force_share=running)


def _copy_members(held: Image, tmp: str, running: bool) -> dict[int, str]:
    """Copy every member of *held* beside the copy *tmp* (``TMP.mINDEX``, raw
    or qcow2 as the member is), read past a running QEMU's lock.

    :return: member index -> its copy
    """
    out: dict[int, str] = {}
    try:
        for m, mi in held.members():  # each checked: UUID, parent, generation
            m_fmt = probe_format(mi.path)
            copy = f"{tmp}.m{m.index}"
            _copy(mi.path, m_fmt, copy, None, running)
            out[m.index] = copy
    except BaseException:
        for f in out.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        raise
    return out


def _flatten(img: Image, copies: dict[int, str]) -> None:
    """Bring the copied members' sections into the copy *img* (one file: a
    backup restores by section name, into wherever the domain keeps each).

    The copy's member records are pointed at the member copies first, then
    each is merged (crash-safe as ``nvmgr merge``; a member copy is removed
    once merged).  Live sections are taken as they are (in-use marks of the
    running VM included): the captured bytes replace them afterwards.
    """
    if not copies:
        return
    new = img._copy_dir()
    new.members = [dataclasses.replace(m, path=copies[m.index]) for m in new.members or []]
    img._commit(new)
    for index in sorted(copies):
        members.merge(img, copies[index], force=True)


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
        copies: dict[int, str] = {}
        try:
            with Image.open(path) as held:  # nvmgr's shared lock: no nvmgr writer until done
                _copy(path, src_fmt, tmp, fmt, running)
                copies = _copy_members(held, tmp, running)
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
            new_uuid = _seal_copy(tmp, live, {k: v[1] for k, v in tpm.items()}, kek, copies)
            os.link(tmp, out)  # never replaces a file that appeared meanwhile
        finally:
            for f in [tmp, *copies.values()]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
    return BackupResult(name, path, out, str(new_uuid), running, paused_ms,
                        sorted(live), sorted(v[0] for v in tpm.values()))


def _seal_copy(tmp: str, live: dict[str, bytes], tpm: dict[str, bytes],
               kek: Kek | None, copies: dict[int, str] | None = None) -> uuid.UUID:
    """Bring the members' sections in, write the captured bytes into the
    copy, give it its own UUID, check it."""
    new_uuid = uuid.uuid4()
    with Image.open(tmp, writable=True, kek=kek) as img:
        _flatten(img, copies or {})
        img.set_in_use([s.name for s in img.directory.sections if s.live], False)
        for name, data in live.items():  # a LUKS volume is the slice's bytes as they are
            img.put(name, data, volume=img.section(name).luks)
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
            if len(blob) > target.payload:
                raise NoSpaceError(f"section {sname} of the backup ({len(blob)} bytes) no longer "
                                   f"fits the domain's section (capacity {target.payload})",
                                   image=path, section=sname)
            data[sname] = blob
        # The VM is stopped: an in-use mark is a crash's leftover, and it is overwritten.
        img.set_in_use([n for n in data if img.section(n).live], False)
        for sname, blob in data.items():
            img.put(sname, blob)
        # Staged TPM state would be taken over the restored one at the next start.
        files = staging.tpm_state_files(
            dom, [s.name for s in staging.tpm_sections(img.directory.sections)], swtpm_root)
        restored = {n: f for n, f in files.items() if n in data}
        wiped = [str(f) for f in restored.values() if f.is_file()]
        staging.wipe_files(restored)
    return RestoreResult(name, path, os.path.abspath(src), sorted(data), skipped, wiped)


# ---------------------------------------------------------------- snapshots of a domain

#: Where a domain's stored snapshots live: a directory beside its image.
SNAPSHOT_SUFFIX = ".snapshots"


def snapshot_dir(image: str) -> str:
    return image + SNAPSHOT_SUFFIX


def _snapshot_file(image: str, name: str) -> str:
    """The stored snapshot *name* of *image* (the name checked: it becomes a file name).

    :raise UsageError: a name QEMU would refuse, or one that is no plain file name.
    """
    qcow2.check_snapshot_name(name)
    if "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"bad snapshot name {name!r}: no '/' and no leading '.'")
    return os.path.join(snapshot_dir(image), name + ".nvram")


def snapshot_create(domain: str, name: str, *, uri: str | None = None,
                    kek: Kek | None = None) -> dict[str, object]:
    """Snapshot every section of *domain*, running or stopped, into its snapshot directory.

    The snapshot is a backup (see :func:`backup`): the guest is paused only
    while its live state is read.

    :raise UsageError: a snapshot of that name exists, or a bad name.
    """
    _dom, image = _domain(domain, uri, live=False)
    if is_location(image):  # no directory beside it: never one named after it in the cwd
        raise UsageError(
            f"domain {domain}'s image is at a network location ({image}): stored snapshots "
            f"go beside an image file; take the storage's own (nvmgr snapshot IMAGE create "
            f"NAME: Ceph's snapshots of an RBD image) or a backup (nvmgr backup --domain "
            f"{domain} FILE)", domain=domain)
    path = _snapshot_file(image, name)
    if os.path.lexists(path):
        raise UsageError(f"domain {domain} has a snapshot named {name!r} already", domain=domain)
    os.makedirs(snapshot_dir(image), mode=0o700, exist_ok=True)
    r = backup(domain, path, uri=uri, kek=kek)
    return {"action": "create", "name": name, "domain": domain, "image": image,
            "snapshot": path, "running": r.running, "paused_ms": r.paused_ms}


def snapshot_list(domain: str, *, uri: str | None = None) -> list[dict[str, object]]:
    """The domain's snapshots: stored ones (any format, taken running or not) and,
    for a qcow2 image of a stopped VM, the image's internal ones."""
    _dom, image = _domain(domain, uri, live=False)
    out: list[dict[str, object]] = []
    d = snapshot_dir(image)
    if not is_location(image) and os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".nvram") and not f.startswith("."):
                st = os.stat(os.path.join(d, f))
                out.append({"name": f[: -len(".nvram")], "kind": "stored",
                            "path": os.path.join(d, f), "size": st.st_size,
                            "date": time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(st.st_mtime))})
    if probe_format(image) == "qcow2" and not virt.is_active(domain, uri):
        for s in qcow2.snapshot_list(image):
            out.append({"name": s.get("name"), "kind": "internal", "id": s.get("id"),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S",
                                              time.localtime(int(s.get("date-sec", 0))))})
    return out


def _stored(domain: str, name: str, uri: str | None) -> tuple[str, str | None]:
    """(image, the stored snapshot's file or None when there is none of that name)."""
    _dom, image = _domain(domain, uri, live=False)
    if is_location(image):  # none stored (see snapshot_create)
        _snapshot_file(image, name)  # a bad name still refused
        return image, None
    path = _snapshot_file(image, name)
    return image, path if os.path.isfile(path) else None


def snapshot_revert(domain: str, name: str, *, uri: str | None = None,
                    kek: Kek | None = None) -> dict[str, object]:
    """Put the snapshot *name* back (the VM stopped): a stored one is restored
    section by section, crash-safely; a qcow2 internal one is applied by QEMU.

    :raise BusyError: the domain is running.
    :raise NotFoundError: no snapshot of that name.
    """
    virt.require_inactive(domain, uri, what="reverting it to a snapshot")
    image, path = _stored(domain, name, uri)
    if path is not None:
        r = restore(domain, path, uri=uri, kek=kek)
        return {"action": "revert", "name": name, "domain": domain, "image": image,
                "kind": "stored", "restored": r.restored}
    if probe_format(image) == "qcow2":
        qcow2.snapshot_apply(image, name)
        return {"action": "revert", "name": name, "domain": domain, "image": image,
                "kind": "internal"}
    raise NotFoundError(f"domain {domain} has no snapshot named {name!r}", domain=domain)


def snapshot_delete(domain: str, name: str, *, uri: str | None = None) -> dict[str, object]:
    """Delete the snapshot *name* (a stored one at any time; an internal one, VM stopped).

    :raise NotFoundError: no snapshot of that name.
    """
    image, path = _stored(domain, name, uri)
    if path is not None:
        os.unlink(path)
        return {"action": "delete", "name": name, "domain": domain, "image": image,
                "kind": "stored"}
    if probe_format(image) == "qcow2":
        virt.require_inactive(domain, uri, what="deleting an internal snapshot")
        qcow2.snapshot_delete(image, name)
        return {"action": "delete", "name": name, "domain": domain, "image": image,
                "kind": "internal"}
    raise NotFoundError(f"domain {domain} has no snapshot named {name!r}", domain=domain)
