"""A domain's image, provisioned from its plan: shared by define and the hook.

Nothing here calls libvirt: the hook (:mod:`nvmgr.hook`) runs inside
libvirtd's start of the domain and uses these as much as ``nvmgr define``
(:mod:`nvmgr.virt.define`) does.

- :func:`prepare_image` opens the image, creating it or growing it to hold
  the plan, and refuses an image that belongs to another domain (a clone).
- :func:`initial_content` says what an empty section starts with: the
  domain's libvirt varstore, its swtpm state, or the firmware's template.
- :func:`grow` is the one way an image gains sections.
- :func:`copy_for_clone` gives a clone its own image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nvmgr.domain.elements import Domain
from nvmgr.domain.metadata import NvmgrMetadata
from nvmgr.domain.plan import Plan, PlannedSection
from nvmgr.domain.profiles import MAX_FLASH, open_flash_file
from nvmgr.errors import BusyError, ForeignImageError, NotFoundError, UsageError
from nvmgr.format.layout import SectionSpec, extend, layout
from nvmgr.format.model import Binding, Directory
from nvmgr.image.convert import convert
from nvmgr.image.image import Buffer, Image
from nvmgr.image.members import MemberResult, place_in_member
from nvmgr.provision import orphans, staging
from nvmgr.storage import image_exists, is_location, nbd, qemu
from nvmgr.storage.container import open_container, probe_format
from nvmgr.storage.nbd import is_nbd

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek

log = logging.getLogger(__name__)


def refuse_luks(meta: NvmgrMetadata | None) -> None:
    """``luks='yes'`` asks for the live sections as LUKS volumes, which is what
    naming a key gives: without a key there is nothing to open them with."""
    if meta is not None and meta.luks and not meta.encrypted:
        raise UsageError("luks='yes': the live sections are LUKS volumes opened with the "
                         "image's key, and the domain's nvmgr metadata names none: give "
                         "--key-file or --key-secret")


def check_live_encryption(img: Image, plan: Plan) -> None:
    """Each live section is stored as the plan says: a LUKS volume when the
    domain names a key, plaintext when not.

    :raise UsageError: a live section in plaintext in the image of a domain
        that names a key (made before nvmgr encrypted live sections): it
        would stay plaintext at rest; the message names ``nvmgr encrypt``.
    """
    for ps in plan.live_sections:
        if img.directory.find(ps.name) is None:
            continue
        s = img.section(ps.name)
        if ps.luks and not s.luks:
            raise UsageError(
                f"section {ps.name} of {img.path} is stored in plaintext, but the domain "
                "names a key, so its live sections must be LUKS volumes: convert the "
                f"image with 'nvmgr encrypt --domain {plan.domain or 'DOMAIN'} --key-file "
                "KEY' while the VM is stopped", image=img.path, section=ps.name)


def fill_empty(img: Image, dom: Domain, plan: Plan) -> dict[str, str]:
    """Give each empty section of *plan* its first content (:func:`initial_content`);
    an empty LUKS section gets a LUKS volume of zeros (QEMU opens nothing else).

    :return: section name -> where its content came from.
    """
    filled: dict[str, str] = {}
    for ps in plan.sections:
        if img.directory.find(ps.name) is None or img.section(ps.name).length:
            continue
        got = initial_content(dom, plan, ps)
        if got is None and ps.luks:
            got = b"", "a LUKS volume of zeros"
        if got is not None:
            # The VM is not running (define) or only starting (prepare): an
            # in-use mark is stale.
            img.put(ps.name, got[0], force=True)
            filled[ps.name] = got[1]
    return filled


def plan_with_offsets(plan: Plan, d: Directory, img: Image | None = None) -> Plan:
    """The plan with each section's offsets as the image really has them;
    with *img*, a section in a member image names the member's file and
    format and its offset there (QEMU's slice of a live one points there)."""
    placed = []
    for ps in plan.sections:
        s = d.find(ps.name)
        if s is None:
            raise UsageError(f"section {ps.name} is planned but not in the image")
        member_path = member_format = None
        if s.member is not None and img is not None:
            m = d.member(s.member)
            if m is not None:
                member_path, member_format = img.member_path(m), img.member_image(m.index).fmt
                s = img.section(ps.name)
        placed.append(dataclasses.replace(ps, offset=s.home if s.home is not None else s.offset,
                                          spare=s.spare, reserved=s.reserved,
                                          member_path=member_path,
                                          member_format=member_format))
    return dataclasses.replace(plan, sections=tuple(placed), image_size=d.image_size,
                               header_area=d.header_area, image_uuid=d.image_uuid,
                               scratch_offset=d.scratch_offset, scratch_length=d.scratch_length,
                               directory=d)


def _read_firmware_file(path: str, fmt: str | None) -> bytes:
    """A varstore file's bytes; qcow2 files are converted through qemu-img.

    :raise InvalidInputError: not a regular file of at most 64 MiB
        (:func:`nvmgr.domain.profiles.open_flash_file`); never blocks on a FIFO.
    """
    fd = open_flash_file(path, "varstore")
    if fd is None:
        raise NotFoundError(f"varstore {path} does not exist")
    with os.fdopen(fd, "rb") as f:
        if (fmt or probe_format(path)) != "qcow2":
            return f.read(MAX_FLASH + 1)
    return qemu.read_image(path, "qcow2")


def initial_content(dom: Domain, plan: Plan, ps: PlannedSection) -> tuple[bytes, str] | None:
    """What an empty section should start with, and where it came from."""
    meta = dom.nvmgr
    if ps.binding is Binding.PFLASH:
        rec = meta.libvirt_nvram if meta else None
        os_ = dom.os
        nv = os_.nvram if os_ is not None else None
        candidates = [(nv.path, nv.format) if nv is not None else (None, None),
                      (rec.path, rec.format) if rec is not None else (None, None)]
        for path, fmt in candidates:
            if path and os.path.isfile(path):
                return _read_firmware_file(path, fmt), f"imported {path}"
        if ps.template and os.path.isfile(ps.template):
            return _read_firmware_file(ps.template, None), f"template {ps.template}"
        return None
    if ps.binding is Binding.TPM and plan.domain_uuid is not None and dom.uuid is not None:
        # The state libvirt's swtpm keeps for this TPM (its own version's file only).
        f = staging.tpm_state_files(dom, [ps.name]).get(ps.name)
        if f is not None and f.is_file() and not f.is_symlink():
            return f.read_bytes(), f"imported {f}"
    return None


def _creation_cut_short(path: str, size: int, wait: float) -> bool:
    """Whether *path* is the empty remains of this plan's image, its creation
    killed before the first header copy landed: exactly the *size* a creation
    gives it, and nothing but zeros (a file nothing can be lost from)."""
    with open_container(path, writable=True, wait=wait) as c:
        if c.size() != size:
            return False
        for off in range(0, size, 4 << 20):
            if c.read(off, min(4 << 20, size - off)).strip(b"\0"):
                return False
    return True


def _open_existing(path: str, specs: list[SectionSpec], kek: Kek | None,
                   wait: float) -> Image | None:
    """The image at *path*, opened for writing; None (and the file removed)
    when it is the empty remains of a creation of *specs* cut short, to be
    made again, or a blank NBD export (all zeros: a new image goes into it).

    :raise ForeignImageError: the file is something else than an nvmgr image.
    """
    try:
        return Image.open(path, writable=True, kek=kek, wait=wait)
    except ForeignImageError as e:
        if is_nbd(path):  # the server made it: written into only when blank
            if nbd.export_blank(path, wait=wait):
                return None
            raise _export_holds_data(e, path) from e
        if is_location(path):  # never removed by nvmgr: Ceph's
            raise
        made = [dataclasses.replace(s, encrypted=True) if kek and not s.binding.live else s
                for s in specs]  # as Image.create lays them out
        if not _creation_cut_short(path, layout(made).image_size, wait):
            raise
    os.unlink(path)
    return None


def grow(img: Image, specs: list[SectionSpec], *,
         max_image_size: int | None = None,
         contents: Mapping[str, Buffer] | None = None,
         in_use: Sequence[str] = (),
         in_place_limit: int | None = None,
         member_fmt: str | None = None,
         beside: str | None = None) -> list[MemberResult]:
    """Add *specs* to *img* (opened writable): the one growth path of define,
    prepare, attach (offline and live), reconcile (the watcher included) and
    ``nvmgr grow``, so a policy about growth has one place to live.

    In place while the image stays within *max_image_size* (a domain's
    ``max-image-size``; None: no limit), the others into member images (the
    last member while it has room, else new ones beside the image, each
    within the limit too).

    In place, whoever calls it, the VM running or not: nothing that exists
    moves (new slots go first-fit into space the directory gives to nobody,
    then at the end: :func:`nvmgr.format.layout.extend`); no byte of a
    section, of a live slice QEMU reads in place or of the current header
    copy is written; one directory commit adds the sections, after their
    *contents* are written and flushed, so a crash leaves the image as it was
    or with the new sections holding exactly those bytes
    (``tests/test_crash.py``, scenarios ``grow-live*``).  A section placed in
    a member holds its contents in the member before the image names it
    (``tests/test_crash_members.py``, ``grow-data-into*-member``).  A growth
    that puts some sections in place and others in members commits the image
    first, then each member's placement: a crash between leaves the first
    ones added; every section is either absent or there with its bytes.

    :param contents: section name -> the bytes a new section starts with (a
        device-state disk's image, an EEPROM blob); encrypted like any put
        when the section is.
    :param in_use: new live sections to mark in use by the running VM (a
        hot-plug): in the commit that adds them when they go in place.
    :param in_place_limit: a second bound on the image's size (the size it
        has, when it cannot grow: a qcow2 image written through the running
        QEMU, whose virtual size is fixed); members are still bounded by
        *max_image_size* alone.
    :param member_fmt: the format of new members (default: the image's).
    :param beside: the file new members are named after (default: the
        image's path; needed when *img* was opened through another location).
    :return: the placements in members (empty: the image grew in place).
    :raise NoSpaceError: a section alone does not fit within the limit, the
        directory is full, or contents do not fit their section.
    :raise UsageError: a name is taken, or contents name no new section.
    """
    if not specs:
        return []
    contents = dict(contents or {})
    if max_image_size is None and in_place_limit is None:
        img.add_sections(list(specs), contents, in_use)
        return []
    here_limit = min(x for x in (max_image_size, in_place_limit) if x is not None)
    d = img.directory
    enc = [dataclasses.replace(s, encrypted=True) if d.encrypted and not s.binding.live else s
           for s in specs]
    stray = sorted(set(contents) - {s.name for s in enc})
    if stray:
        raise UsageError(f"contents given for {', '.join(stray)}, which is not being added",
                         image=img.path, section=stray[0])
    here: list[SectionSpec] = []
    rest: list[SectionSpec] = []
    for s in enc:
        if not rest and extend(d, [*here, s]).image_size <= here_limit:
            here.append(s)
        else:
            rest.append(s)
    if here:
        img.add_sections(here, {k: v for k, v in contents.items()
                                if k in {s.name for s in here}}, in_use)
    member_limit = max_image_size if max_image_size is not None else sys.maxsize
    placed = place_in_member(img, rest, limit=member_limit,
                             contents={k: v for k, v in contents.items()
                                       if k in {s.name for s in rest}},
                             fmt=member_fmt, beside=beside) if rest else []
    if rest and in_use:
        img.set_in_use([s.name for s in rest if s.name in set(in_use)], True)
    for r in placed:
        log.warning("%s: the image may not grow past %s bytes (%s): sections %s "
                    "placed in member image %s", beside or img.path, f"{here_limit:,}",
                    "max-image-size" if here_limit == max_image_size else "its size now",
                    ", ".join(r.sections), r.member)
    return placed


def prepare_image(plan: Plan, *, kek: Kek | None, fmt: str,
                  path: str, wait: float = 0.0,
                  max_image_size: int | None = None) -> tuple[Image, bool, list[str]]:
    """Open the domain's image, creating or growing it to hold the plan.

    ``plan.image_uuid`` is the image UUID the domain's metadata records (if
    any): an existing image must have it, a recreated one gets it.

    :param wait: seconds to wait for another nvmgr writer holding the image.
    :param max_image_size: the largest the image may be; sections beyond it
        go into member images (:func:`grow`).
    """
    specs = [SectionSpec(s.name, s.capacity, s.binding, s.encrypted, s.device)
             for s in plan.sections]
    if image_exists(path) and (img := _open_existing(path, specs, kek, wait)) is not None:
        try:
            if plan.image_uuid and img.directory.image_uuid != plan.image_uuid:
                raise UsageError(
                    f"{path} belongs to another image ({img.directory.image_uuid}), "
                    f"the domain names {plan.image_uuid}", image=path)
            owner = img.directory.domain_uuid
            if owner is not None and plan.domain_uuid is not None and owner != plan.domain_uuid:
                # A clone (virt-clone copies the XML, not the image) must never
                # share its original's UEFI vars and TPM; nor may a new domain
                # take an orphan's state without being asked to.
                fix = f"nvmgr reconcile {plan.domain or plan.domain_uuid}"
                if img.directory.orphaned is not None:
                    raise orphans.refusal(path, owner, img.directory.orphaned, plan.domain,
                                          fix)
                raise BusyError(
                    f"the image belongs to domain {owner}, not {plan.domain_uuid} (a clone "
                    f"sharing its original's state?): run '{fix}' to give this domain its "
                    "own copy (or keep 'nvmgr reconcile --all --watch' running); if domain "
                    f"{owner} was undefined, '{fix}' offers --adopt or --fresh",
                    image=path, domain=plan.domain)
            if img.directory.orphaned is not None:  # its own domain is back
                img.set_orphaned(None)
            missing = [s for s in specs if img.directory.find(s.name) is None]
            grow(img, missing, max_image_size=max_image_size)
            return img, False, [s.name for s in missing]
        except BaseException:
            img.close()
            raise
    if not is_location(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    # Recreated for a domain that names its image (prepare found the file
    # missing): keep the UUID the metadata records, or the next start would
    # take its own image for a foreign one.
    first = specs
    if max_image_size is not None:  # what fits, in plan order; the rest into members
        made = [dataclasses.replace(s, encrypted=True) if kek and not s.binding.live else s
                for s in specs]
        n = 0
        while n < len(made) and layout(made[:n + 1]).image_size <= max_image_size:
            n += 1
        first = specs[:n]
    img = Image.create(path, first, fmt=fmt, kek=kek, domain_uuid=plan.domain_uuid,
                       image_uuid=plan.image_uuid)
    try:
        grow(img, specs[len(first):], max_image_size=max_image_size)
    except BaseException:
        img.close()
        raise
    return img, True, [s.name for s in specs]


def owner_of(path: str) -> uuid.UUID | None:
    """The domain UUID an existing image records (None: none, or no image: a blank
    NBD export holds none yet)."""
    if not image_exists(path) or (is_nbd(path) and nbd.export_blank(path)):
        return None
    try:
        with Image.open(path) as img:
            return img.directory.domain_uuid
    except ForeignImageError as e:
        if is_nbd(path):
            raise _export_holds_data(e, path) from e
        raise


def _export_holds_data(e: ForeignImageError, path: str) -> ForeignImageError:
    """*e*, an NBD export that is no nvmgr image and not blank, said so."""
    return ForeignImageError(f"{e.message}; the NBD export holds data, so nvmgr writes no "
                             "new image into it (serve a blank file: all zeros)", image=path)


def copy_for_clone(src: str, dst: str, domain_uuid: uuid.UUID, kek: Kek | None) -> uuid.UUID:
    """Copy *src* to *dst* as a new image owned by *domain_uuid*; return its image UUID.

    Everything is copied except the TPM: like libvirt, whose swtpm state is
    per domain UUID, a clone gets a fresh TPM (its own endorsement key) at
    first start instead of a second copy of its original's identity.
    """
    convert(src, dst, probe_format(src))  # members too, as DST.mN (convert's own names)
    with Image.open(dst) as made:
        copies = [made.member_path(m) for m in made.directory.members or []]
    new_uuid = uuid.uuid4()
    try:
        with Image.open(dst, writable=True, kek=kek) as img:
            for s in img.sections():
                if s.binding is Binding.TPM and s.length:
                    img.put(s.name, b"")
            members = [mi.path for _m, mi in img.members()]
            img.reassign(image_uuid=new_uuid, domain_uuid=domain_uuid)
    except BaseException:
        for f in [dst, *copies]:
            with contextlib.suppress(OSError):
                os.unlink(f)
        raise
    if members:
        log.info("%s: the clone's copy has its own member images %s", dst, members)
    return new_uuid
