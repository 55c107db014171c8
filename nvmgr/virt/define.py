"""``nvmgr define`` and ``nvmgr undefine``: a domain and its image, together.

define: plan the domain's sections, create the image (or open and grow the
one it already has), fill empty sections from what the domain already owns
(its libvirt ``<nvram>`` file, its swtpm state, else the firmware's vars
template), rewrite the XML so QEMU sees each section, and define it through
libvirt.  Running it again on the same domain changes nothing: sections that
hold data are never overwritten, offsets never move.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import uuid
from typing import TYPE_CHECKING

from nvmgr.domain.elements import Domain, parse_domain
from nvmgr.domain.metadata import NvmgrMetadata
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.domain.plan import Plan, default_image_path, plan_for
from nvmgr.domain.qemuargs import (
    apply_plan,
    missing_ports,
    node_name,
    slice_offsets,
    swtpm_tpms,
    wiring_problems,
)
from nvmgr.errors import (
    BusyError,
    CorruptError,
    InvalidInputError,
    KeyRequiredError,
    NotFoundError,
    NvmgrError,
    UsageError,
)
from nvmgr.format.layout import SectionSpec
from nvmgr.image.image import Image
from nvmgr.provision import orphans
from nvmgr.provision.prepare import (
    check_live_encryption,
    copy_for_clone,
    fill_empty,
    grow,
    owner_of,
    plan_with_offsets,
    prepare_image,
    refuse_luks,
)
from nvmgr.storage import absolute, image_exists, is_location, nbd, rbd
from nvmgr.storage.container import probe_format
from nvmgr.storage.nbd import is_nbd
from nvmgr.storage.rbd import is_rbd
from nvmgr.virt import conn as virt
from nvmgr.virt import secrets
from nvmgr.virt.backup import snapshot_dir

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek

log = logging.getLogger(__name__)

#: Seconds a write to a domain's image waits for another nvmgr writer (the hook's).
LOCK_WAIT = 30.0


@dataclasses.dataclass
class DefineResult:
    domain: str
    image: str
    image_uuid: str
    created: bool
    added: list[str]
    imported: dict[str, str]
    xml: str
    adopted: bool = False  # an orphan's state taken (--adopt)
    moved_aside: str | None = None  # where an orphan went (--fresh)
    #: New sections placed in member images (the domain's max-image-size): name -> member.
    in_members: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The libvirt secret (usage vtpm) swtpm encrypts the TPM state with (a key and a TPM).
    vtpm_secret: str | None = None

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "xml"}


def define(xml_text: str, *, uri: str | None = None, fmt: str | None = None,
           image: str | None = None, kek: Kek | None = None,
           key_file: str | None = None, key_secret: str | None = None,
           dry_run: bool = False, orphan: str | None = None,
           retry: str = "nvmgr define DOMAIN.xml") -> DefineResult:
    """Plan, create or grow the image, rewrite and define the domain.

    The XML is parsed once; every change (a UUID, the key source, a clone's
    own image, nvmgr's QEMU arguments) is made to that one tree, written out
    once for libvirt.

    :raise InvalidInputError: hostile or malformed XML; libvirt refuses it.
    :raise BusyError: the domain is running (its image would change under it).
    :raise OrphanedImageError: the image path holds the state of a domain
        that no longer exists and *orphan* does not say what to do with it.
    :param orphan: ``"adopt"`` (take that state: same vars and TPM) or
        ``"fresh"`` (move it aside, kept, and start anew).
    :param retry: the command the refusal tells to run again with a choice.
    """
    return _define(parse_domain(xml_text), xml_text, uri=uri, fmt=fmt, image=image, kek=kek,
                   key_file=key_file, key_secret=key_secret, dry_run=dry_run,
                   orphan=orphan, retry=retry)


def _define(dom: Domain, xml_text: str, *, uri: str | None, fmt: str | None = None,
            image: str | None = None, kek: Kek | None, key_file: str | None = None,
            key_secret: str | None = None, dry_run: bool = False,
            orphan: str | None = None, retry: str = "nvmgr define DOMAIN.xml") -> DefineResult:
    """:func:`define` on the parsed *dom* (*xml_text* is its source, for ``dry_run``)."""
    name = dom.name
    if not name:
        raise InvalidInputError("the domain XML has no <name>")
    edited = False
    dom_uuid = dom.uuid
    if dom_uuid is None:
        # libvirt would invent one at define; nvmgr needs it before (swtpm, fw_cfg paths).
        dom_uuid = dom.uuid = uuid.uuid4()
        edited = True
    if key_file or key_secret:
        _set_key_source(dom, key_file, key_secret)
        edited = True
    meta = dom.nvmgr
    refuse_luks(meta)
    cloned_from = moved_aside = None
    adopted = False
    target = absolute(image or (meta.image if meta and meta.image
                                       else default_image_path(name)))
    owner = owner_of(target)
    if owner is not None and owner != dom_uuid and not virt.uuid_exists(str(owner), uri):
        # Its domain is gone (undefined by virsh or virt-manager): an orphan.
        # Neither copied (a clone's way) nor taken silently: the user chooses.
        if orphan is None:
            raise orphans.refusal(target, owner, orphans.record_of(target), name, retry)
        if virt.exists(name, uri):
            virt.require_inactive(name, uri, what="redefining it with nvmgr")
        if not dry_run and orphan == "adopt":
            orphans.adopt(target, dom_uuid)
            adopted = True
        elif not dry_run:
            moved_aside = orphans.move_aside(target, owner)
            if os.path.isdir(snapshot_dir(target)):  # its snapshots are its own: along
                os.rename(snapshot_dir(target), snapshot_dir(moved_aside))
            if meta and meta.uuid:  # the new image is a new image
                dom.set_nvmgr(dataclasses.replace(meta, uuid=None))
                meta = dom.nvmgr
    elif meta and meta.image and image is None:
        if owner is not None and owner != dom_uuid:
            # The XML is a clone's (virt-clone, or copied by hand): give it its own image.
            own = default_image_path(name)
            if os.path.abspath(own) == absolute(meta.image):
                raise UsageError(f"{meta.image} belongs to domain {owner}; give this domain "
                                 "its own image with --image PATH", domain=name)
            if not dry_run:
                new_uuid = copy_for_clone(meta.image, own, dom_uuid, kek)
                cloned_from = meta.image
                dom.set_nvmgr(dataclasses.replace(meta, image=own, uuid=new_uuid))
                meta = dom.nvmgr
    plan = plan_for(dom, encrypted=kek is not None)
    path = absolute(image or (meta.image if meta and meta.image else plan.image))
    fmt = fmt or (meta.format if meta and meta.format else None) or (
        "raw" if is_location(path) else probe_format(path) if os.path.exists(path) else "raw")
    if dry_run:
        return DefineResult(name, path, "", not image_exists(path), [], {},
                            dom.to_xml() if edited else xml_text)
    if virt.exists(name, uri):
        virt.require_inactive(name, uri, what="redefining it with nvmgr")
    img, created, added = prepare_image(plan, kek=kek, fmt=fmt, path=path,
                                        max_image_size=meta.max_image_size if meta else None)
    imported: dict[str, str] = {}
    try:
        if img.directory.encrypted and not (meta and meta.encrypted):
            # Defining it without a key source would leave a domain that cannot start.
            raise KeyRequiredError(
                f"{path} is encrypted: define the domain with --key-file or --key-secret "
                "(the domain's nvmgr metadata names no key)", image=path)
        check_live_encryption(img, plan)
        # libvirt says the domain is not running: an in-use mark is stale.
        imported = fill_empty(img, dom, plan)
        # swtpm encrypts the TPM state with this (apply_plan names the secret).
        vtpm_phrase = (img.vtpm_passphrase() if img.directory.encrypted and swtpm_tpms(dom)
                       else None)
        placed = plan_with_offsets(plan, img.directory, img)
        image_uuid = img.directory.image_uuid
        in_members = {n: img.image_path_of(n) for n in added
                      if img.directory.find(n) is not None
                      and img.image_path_of(n) != img.path}
    finally:
        img.close()
    defined = False
    try:
        if missing_ports(dom, placed):
            # libvirt gives a device without an address the lowest free root
            # port, nvmgr's too (it knows nothing behind it): its devices get
            # theirs first, then nvmgr's ports come after every controller.
            apply_plan(dom, placed, path, fmt, image_uuid, ports=False)
            name = virt.define(dom.to_xml(), uri)
            defined = True  # a working domain (its devices on the root bus): image kept
            dom = parse_domain(virt.domain_xml(name, uri))
        apply_plan(dom, placed, path, fmt, image_uuid)
        new_xml = dom.to_xml()
        name = virt.define(new_xml, uri)
    except BaseException:
        if created and not defined:  # nothing written when the domain is refused
            with contextlib.suppress(OSError, NvmgrError):
                if is_nbd(path):  # the server's export: blank again, as it was given
                    nbd.blank_out(path, placed.image_size)
                else:
                    os.unlink(path)
        raise
    vtpm_secret = None
    if vtpm_phrase is not None:
        vtpm_secret = secrets.set_vtpm_secret(str(dom_uuid), vtpm_phrase, uri)
    log.info("defined %s with image %s (%s)", name, path, ", ".join(added) or "no new sections")
    if cloned_from:
        imported["*"] = f"copied from {cloned_from} (a clone: fresh TPM)"
    if adopted:
        imported["*"] = f"adopted the orphaned image {path} (its vars and TPM)"
    return DefineResult(name, path, str(image_uuid), created or bool(cloned_from), added,
                        imported, new_xml, adopted=adopted, moved_aside=moved_aside,
                        in_members=in_members, vtpm_secret=vtpm_secret)


def member_files(image: str) -> list[str]:
    """The member images of *image* that name it as their parent: files, and RBD
    images (an NBD export is its server's, and is left out); none when it cannot
    be read.

    :raise BusyError: a member is busy (held by an nvmgr writer).
    """
    out = []
    with contextlib.suppress(CorruptError, NotFoundError), Image.open(image) as img:
        for m in img.directory.members or []:
            path = img.member_path(m)
            if is_location(path) and not is_rbd(path):
                continue
            with contextlib.suppress(CorruptError):
                img.member_image(m.index)  # its parent link checked: never another's file
                out.append(path)
    return out


def _nbd_extent(image: str, dom_uuid: uuid.UUID | None, name: str) -> int | None:
    """The bytes the domain's image takes in its NBD export, which ``undefine
    --remove-nvram`` writes zeros over (the export is the server's: nvmgr wrote its
    image into it blank and gives it back blank); None when the export holds no
    image (blank, or the server has no such export).

    :raise UsageError: the export holds another domain's image.
    :raise CorruptError: it holds something that is not an nvmgr image (left alone).
    :raise ExternalError: the server cannot be reached (nothing changed: say
        --keep-nvram to undefine all the same).
    """
    try:
        if nbd.export_blank(image):
            return None
    except NotFoundError:
        return None
    with Image.open(image) as img:
        owner = img.directory.domain_uuid
        if owner is not None and dom_uuid is not None and owner != dom_uuid:
            raise UsageError(f"{image} holds the image of another domain ({owner}): "
                             "nothing was removed", domain=name, image=image)
        return img.directory.image_size


def _set_key_source(dom: Domain, key_file: str | None, key_secret: str | None) -> None:
    """Record the key source in the domain's metadata (checked like read metadata).

    :raise UsageError: *key_secret* is not a UUID.
    :raise InvalidInputError: the metadata this gives is not valid (both sources, say).
    """
    try:
        secret = uuid.UUID(key_secret) if key_secret else None
    except ValueError as e:
        raise UsageError(f"--key-secret {key_secret!r} is not a UUID") from e
    meta = dom.nvmgr or NvmgrMetadata()
    dom.set_nvmgr(dataclasses.replace(
        meta,
        key_file=os.path.abspath(key_file) if key_file else None,
        key_secret=secret,
    ))


def undefine(name: str, *, uri: str | None = None, keep_nvram: bool = False,
             remove_nvram: bool = False) -> dict[str, object]:
    """Undefine a domain; keep or remove its nvmgr image, as virsh does for ``<nvram>``.

    :raise UsageError: the domain has an image and neither flag was given.
    :raise BusyError: removing the image of a running domain.
    """
    if keep_nvram and remove_nvram:
        raise UsageError("--keep-nvram and --remove-nvram exclude each other")
    xml = virt.domain_xml(name, uri)
    dom = parse_domain(xml)
    meta = dom.nvmgr
    image = meta.image if meta else None
    if not (keep_nvram or remove_nvram) and image and image_exists(image):
        raise UsageError(
            f"the domain's state is in {image}: undefine with --keep-nvram or --remove-nvram",
            domain=name)
    members: list[str] = []
    nbd_extent: int | None = None
    if remove_nvram and image:
        virt.require_inactive(name, uri, what="removing its image")
        if is_nbd(image):  # checked before anything changes
            nbd_extent = _nbd_extent(image, dom.uuid, name)
        members = member_files(image)
        if is_rbd(image) and image_exists(image):  # refused before anything changes
            for loc in (image, *(m for m in members if is_rbd(m))):
                rbd.require_unopened(loc)
    # The image holds the TPM; libvirt's swtpm directory only stages it.  It
    # goes with the image, and stays (as virsh's --keep-tpm) otherwise.
    virt.undefine(name, uri, remove_tpm=remove_nvram)
    vtpm_removed = False
    if dom.uuid is not None and not virt.uuid_exists(str(dom.uuid), uri):
        # Its vTPM secret (a domain with a key) goes with the definition.
        vtpm_removed = secrets.remove_vtpm_secret(str(dom.uuid), uri)
    removed = False
    if remove_nvram and image and is_rbd(image):
        # Through the storage seam: refused (nothing removed) while a client has it open.
        with contextlib.suppress(NotFoundError):
            rbd.remove(image)
            removed = True
    elif nbd_extent is not None and image:
        # The export is the server's: given blank, it goes back blank.
        nbd.blank_out(image, nbd_extent)
        removed = True
    elif remove_nvram and image and not is_location(image) and os.path.exists(image):
        os.unlink(image)
        removed = True
    if removed:
        for m in members:  # the image is gone: its members hold nothing anyone reads
            with contextlib.suppress(FileNotFoundError, NotFoundError):
                if is_rbd(m):
                    rbd.remove(m)
                else:
                    os.unlink(m)
    # Its stored snapshots go with it: a new domain of the same name must not revert
    # into another machine's variables and TPM.
    snapshots = snapshot_dir(image) if remove_nvram and image and not is_location(image) \
        else None
    if snapshots and os.path.isdir(snapshots):
        shutil.rmtree(snapshots)
    else:
        snapshots = None
    orphaned = False
    if image and not removed and dom.uuid is not None and not virt.uuid_exists(str(dom.uuid), uri):
        # Kept, its domain gone: recorded as such (a running domain, now
        # transient, is recorded by the watcher when it stops).  A network
        # location that cannot be asked now (its cluster, server or key) keeps
        # the undefine: the image still names its owner, so nvmgr images
        # --orphans --image LOCATION lists it, unrecorded.
        try:
            orphaned = orphans.mark_orphaned(image, str(dom.uuid), name)
        except NvmgrError as e:
            if not is_location(image):
                raise
            log.warning("%s: undefined; could not record %s as orphaned: %s", name, image, e)
    return {"domain": name, "image": image, "image_removed": removed,
            "members_removed": members if removed else [],
            "snapshots_removed": snapshots, "orphaned": orphaned,
            "vtpm_secret_removed": vtpm_removed}


@dataclasses.dataclass
class ReconcileResult:
    domain: str
    status: str  # reconciled | unchanged | running | grown (running) | not-nvmgr
    added: list[str] = dataclasses.field(default_factory=list)
    adopted: bool = False  # an orphan's state taken (--adopt)
    moved_aside: str | None = None  # where an orphan went (--fresh)
    #: New sections placed in member images (max-image-size): name -> member.
    in_members: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def reconcile(name: str, *, uri: str | None = None,
              orphan: str | None = None) -> ReconcileResult:
    """Bring a domain changed elsewhere (``virsh edit``, virt-manager) back in line.

    Re-runs :func:`define` on the domain's persistent XML: sections a new
    device or metadata entry needs are added, QEMU arguments and the
    stateless loader restored.  Running domains are left alone (their image
    is in use); domains without nvmgr metadata are not touched.
    """
    before = virt.domain_xml(name, uri)
    dom = parse_domain(before)
    meta = dom.nvmgr
    if meta is None:  # <nvmgr:nvram/> alone asks for nvmgr: define wires it
        return ReconcileResult(name, "not-nvmgr")
    if virt.is_active(name, uri):
        return grow_running(name, dom, uri=uri)
    res = _define(dom, before, uri=uri, kek=secrets.domain_kek(meta, uri), orphan=orphan,
                  retry=f"nvmgr reconcile {name}")
    after = virt.domain_xml(name, uri)
    changed = res.added or after != before
    return ReconcileResult(name, "reconciled" if changed else "unchanged", res.added,
                           res.adopted, res.moved_aside, res.in_members)


def image_held(path: str, fmt: str, active: bool) -> bool:
    """Whether a running QEMU holds *path* so that nvmgr cannot open it beside it:
    qcow2 goes through a qemu-storage-daemon, which QEMU's lock keeps out; RBD
    images are locked by librbd, and an NBD export never grows (its server may take
    one client only).  Raw files are read and grown beside QEMU."""
    return active and (fmt != "raw" or is_location(path))


def placed_from_args(plan: Plan, dom: Domain) -> Plan:
    """*plan* with its live sections where the domain's QEMU arguments put them
    (the image itself cannot be read: :func:`image_held`).

    :raise BusyError: a live section the arguments do not place yet.
    """
    offsets = slice_offsets(dom.qemu_args)
    placed = []
    for ps in plan.sections:
        if ps.live:
            off = offsets.get(node_name(ps.name))
            if off is None:
                raise BusyError(
                    f"section {ps.name} is live and the image of the running VM is "
                    f"{'on RBD' if is_rbd(plan.image) else 'qcow2'}: nvmgr places it once the VM "
                    "has stopped (do it then)", section=ps.name, domain=plan.domain)
            ps = dataclasses.replace(ps, offset=off)
        placed.append(ps)
    return dataclasses.replace(plan, sections=tuple(placed))


def grow_running(name: str, dom: Domain, *, uri: str | None = None) -> ReconcileResult:
    """Reconcile a running domain's persistent definition without stopping it.

    A device added to it by another tool (``virsh attach-device --persistent``,
    virt-manager) whose profile needs a section: the image grows now, beside
    the running QEMU (:func:`nvmgr.provision.prepare.grow`: nothing existing
    moves, no live slice is written), and the persistent definition gets the
    QEMU arguments for it; the next start uses it.  Nothing else of a running
    domain is touched ("running": nothing to do).  A qcow2 or RBD image
    grows at the next start instead (the prepare hook).
    """
    meta = dom.nvmgr
    if meta is None or not meta.image:
        return ReconcileResult(name, "running")
    kek = secrets.domain_kek(meta, uri)
    plan = plan_for(dom, encrypted=kek is not None)
    path, fmt = meta.image, meta.format or "raw"
    if image_held(path, fmt, True):
        return ReconcileResult(name, "running")
    with Image.open(path, writable=True, kek=kek, wait=LOCK_WAIT) as img:
        if img.directory.encrypted and swtpm_tpms(dom) and dom.uuid is not None:
            # The next start (or a migration) needs it: libvirtd may have restarted.
            secrets.set_vtpm_secret(str(dom.uuid), img.vtpm_passphrase(), uri)
        missing = [SectionSpec(ps.name, ps.capacity, ps.binding, ps.encrypted, ps.device)
                   for ps in plan.sections if img.directory.find(ps.name) is None]
        grow(img, missing, max_image_size=meta.max_image_size)
        placed = plan_with_offsets(plan, img.directory, img)
        image_uuid = img.directory.image_uuid
    if not missing and not wiring_problems(dom, placed):
        return ReconcileResult(name, "running")
    apply_plan(dom, placed, path, fmt, image_uuid)
    virt.define(dom.to_xml(), uri)
    log.info("%s (running): grew %s for the next start", name,
             ", ".join(s.name for s in missing) or "nothing")
    return ReconcileResult(name, "grown", [s.name for s in missing])


def restore_vtpm_secret(name: str, uri: str | None = None) -> str | None:
    """Give libvirt the vTPM secret of domain *name* again (after a libvirtd
    restart: an ephemeral secret is gone then), when it has a key and a TPM.

    :return: the secret's UUID; None when the domain needs none.
    :raise KeyRequiredError, WrongKeyError: the domain's key cannot open its image.
    """
    dom = parse_domain(virt.domain_xml(name, uri))
    meta = dom.nvmgr
    if (meta is None or not meta.image or not meta.encrypted or dom.uuid is None
            or not swtpm_tpms(dom) or not image_exists(meta.image)):
        return None
    kek = secrets.domain_kek(meta, uri)
    if image_held(meta.image, meta.format or "raw", virt.is_active(name, uri)):
        return None  # the next start's reconcile (the stop event) gives it
    with Image.open(meta.image, kek=kek, wait=LOCK_WAIT) as img:
        phrase = img.vtpm_passphrase()
    return secrets.set_vtpm_secret(str(dom.uuid), phrase, uri)


def vtpm_secret_of_image(image: str, kek: Kek, uri: str | None = None) -> dict[str, object]:
    """Give libvirt the vTPM secret of the domain that owns *image* (its
    directory records the domain's UUID), for a host where that domain is not
    defined yet: a live migration's destination needs it before the migration
    (libvirt starts the destination's swtpm with it).

    :raise UsageError: the image records no domain, or is not encrypted.
    """
    with Image.open(image, kek=kek, wait=LOCK_WAIT) as img:
        owner = img.directory.domain_uuid
        if owner is None:
            raise UsageError(f"{image} records no domain UUID: give --domain", image=image)
        if not img.directory.encrypted:
            raise UsageError(f"{image} is not encrypted: its TPM state needs no vTPM secret",
                             image=image)
        phrase = img.vtpm_passphrase()
    su = secrets.set_vtpm_secret(str(owner), phrase, uri)
    return {"domain_uuid": str(owner), "secret": su}


def nvmgr_domains(uri: str | None = None) -> list[str]:
    """Names of the persistent domains that carry nvmgr metadata."""
    out = []
    for name in virt.defined_domains(uri):
        try:
            if NVMGR_NS in virt.domain_xml(name, uri):
                out.append(name)
        except NvmgrError:
            continue
    return out


def encrypt_domain(name: str, *, uri: str | None = None, kek: Kek | None,
                   key_file: str | None = None,
                   key_secret: str | None = None) -> dict[str, object]:
    """``nvmgr encrypt --domain NAME``: encrypt a stopped domain's image (every
    section; live ones as LUKS volumes, :func:`nvmgr.image.convert.encrypt`),
    then define the domain again with its key source and QEMU arguments for
    the encrypted image.  Running it again after a crash finishes the job:
    an image already encrypted under the key is only rewired.

    :raise UsageError: no key given nor named by the domain, no nvmgr image.
    :raise BusyError: the domain runs.
    """
    from nvmgr.image.convert import encrypt

    dom = parse_domain(virt.domain_xml(name, uri))
    meta = dom.nvmgr
    if meta is None or not meta.image:
        raise UsageError("the domain has no nvmgr image: define it with nvmgr first",
                         domain=name)
    if kek is None:
        from nvmgr.virt import secrets

        kek = secrets.domain_kek(meta, uri)
    if kek is None:
        raise UsageError("give the key to encrypt with: --key-file or --key-secret",
                         domain=name)
    if (key_file or key_secret) is None and not meta.encrypted:
        raise UsageError("--key-stdin encrypts, but the domain must name its key to start: "
                         "give --key-file or --key-secret", domain=name)
    virt.require_inactive(name, uri, what="encrypting its image")
    xml = dom.to_xml()
    res = encrypt(absolute(meta.image), kek)
    out = _define(dom, xml, uri=uri, kek=kek, key_file=key_file, key_secret=key_secret,
                  retry=f"nvmgr encrypt --domain {name}")
    # With a TPM: swtpm's own encryption is configured now (<encryption secret>, the
    # secret given to libvirt); the next start re-encrypts the state swtpm left plain.
    return {**res, "domain": out.domain, "added": out.added, "vtpm_secret": out.vtpm_secret}
