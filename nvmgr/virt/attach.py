"""``nvmgr attach`` and ``nvmgr detach``: a device and its sections, after define.

The flags are ``virsh attach-device``'s (:func:`affect`): ``--live`` changes
the running VM, ``--config`` the persistent definition (the next boot),
``--persistent`` both (the live part only when it runs), ``--current``
whichever the VM's state says; no flag at all is ``--live``.

attach, in this order, so that a failure leaves nothing half done:

1. plan the domain with the device (:mod:`nvmgr.domain.device`): the
   sections it brings; refuse ``--live`` for what QEMU cannot hot-plug
   (``fwcfg``, ``pflash``, ``tpm``, a ``<tpm>``: exit 13) before any I/O;
2. grow the image (:func:`nvmgr.provision.prepare.grow`: first-fit, nothing
   moves, first bytes and sections in one commit), the VM running or not; a
   section the image still holds (a detach kept it) is used as it is; a
   qcow2 image the running QEMU holds is written through QEMU for
   ``--live`` (:func:`_qcow2_lent`: its NBD export of the image's qcow2
   node), within the size it has, new sections past it in a raw member;
3. ``--live``: the libvirt device through libvirt, a ``block`` section
   through QMP (:mod:`nvmgr.virt.hotplug`), the live metadata;
4. ``--config``: the metadata and QEMU arguments of the persistent
   definition, redefined (through :func:`nvmgr.virt.define._define` when
   the VM is off, as ``nvmgr define`` does it).

detach undoes it: the device out of the running VM and/or the definition;
the section's bytes stay in the image (a later attach of the same section
finds them) unless ``--remove-section`` (one crash-safe commit; its space is
reused by the next growth; a qcow2 image the running QEMU holds is written
through QEMU's export of it, as for a live attach).  ``--config --data`` on
such an image, too, writes the new sections' bytes now through that export
(the device reaches the guest at the next boot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from nvmgr.domain.device import Device, parse_device
from nvmgr.domain.elements import Domain, parse_domain
from nvmgr.domain.metadata import NvmgrMetadata, SectionDecl, from_text, to_text
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.domain.plan import Plan, PlannedSection, plan_for
from nvmgr.domain.qemuargs import FORMAT_NODE, apply_plan, node_name
from nvmgr.errors import (
    BusyError,
    ExternalError,
    NotFoundError,
    NotHotpluggableError,
    NotWiredError,
    NvmgrError,
    UsageError,
)
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image
from nvmgr.provision import staging
from nvmgr.provision.prepare import grow, plan_with_offsets
from nvmgr.storage import is_location
from nvmgr.storage.nbd import lock_dir as nbd_lock_dir
from nvmgr.storage.network import lock_location
from nvmgr.virt import conn as virt
from nvmgr.virt import hotplug, secrets
from nvmgr.virt.define import LOCK_WAIT, _define, image_held, placed_from_args

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek

log = logging.getLogger(__name__)

#: Why QEMU cannot take a section of each binding while it runs.
_NOT_LIVE: Mapping[Binding, str] = {
    Binding.FWCFG: "QEMU reads fw_cfg files only when it starts",
    Binding.PFLASH: "QEMU maps pflash only when it starts",
    Binding.TPM: "swtpm gets its state before QEMU starts, and QEMU has no TPM hot-plug",
}


def affect(active: bool, persistent_domain: bool, *, live: bool, config: bool,
           current: bool, persistent: bool) -> tuple[bool, bool]:
    """(change the running VM, change the persistent definition), as virsh reads the flags.

    :raise UsageError: flags that exclude each other, ``--live`` (or no flag)
        on a VM that is not running, ``--config`` on a transient one.
    """
    if current and (live or config or persistent):
        raise UsageError("--current excludes --live, --config and --persistent")
    if current:
        do_live, do_config = active, not active
    else:
        do_config = config or persistent
        do_live = live or (persistent and active) or not (config or persistent)
    if do_live and not active:
        raise UsageError("the domain is not running: " + (
            "--live needs a running VM" if live else "without --config, --persistent or "
            "--current the change is to the running VM (as virsh's)") + "; use --config")
    if do_config and not persistent_domain:
        raise UsageError("the domain is transient: it has no persistent definition for "
                         "--config or --persistent")
    return do_live, do_config


def _meta(dom: Domain, name: str) -> NvmgrMetadata:
    meta = dom.nvmgr
    if meta is None:
        raise NotFoundError("the domain has no nvmgr metadata: define it with nvmgr define",
                            domain=name)
    if not meta.image:
        raise NotWiredError(f"the domain is not wired for nvmgr yet: run 'nvmgr reconcile "
                            f"{name}'", domain=name)
    return meta


def _refuse_live(sections: list[tuple[str, Binding]], device: Device | None, name: str) -> None:
    """:raise NotHotpluggableError: a device or section binding QEMU takes only at start."""
    if device is not None and device.tag == "tpm":
        raise NotHotpluggableError(
            "a <tpm> cannot be hot-plugged: QEMU adds a TPM only when it starts; attach it "
            "with --config (its state sections are added now, the TPM is there at the next "
            "boot)", domain=name)
    for sname, binding in sections:
        why = _NOT_LIVE.get(binding)
        if why is not None:
            raise NotHotpluggableError(
                f"section {sname} (binding {binding.name.lower()}) cannot be "
                f"hot-plugged or unplugged: {why}; use --config (the change reaches the "
                "guest at the next boot)", section=sname, domain=name)


@dataclasses.dataclass
class _Run:
    """What attach and detach both start from: the domain, which parts the
    flags change, its persistent definition and nvmgr metadata, its key."""

    dom: Any
    active: bool
    do_live: bool
    do_config: bool
    pers: Domain
    meta: NvmgrMetadata
    kek: Kek | None
    path: str
    fmt: str


def _begin(conn: Any, name: str, uri: str | None, *, live: bool, config: bool,
           current: bool, persistent: bool) -> _Run:
    """Look the domain up and read the flags against its state (:func:`affect`)."""
    lv = virt._libvirt()
    d = virt.lookup(conn, name)
    active = bool(d.isActive())
    do_live, do_config = affect(active, bool(d.isPersistent()), live=live, config=config,
                                current=current, persistent=persistent)
    pers = parse_domain(d.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
    meta = _meta(pers, name)
    return _Run(d, active, do_live, do_config, pers, meta, secrets.domain_kek(meta, uri),
                str(meta.image), meta.format or "raw")


def _libvirt_device(run: _Run, dev: Device, name: str, *, plug: bool) -> None:
    """Hot-plug (*plug*) or unplug *dev*'s libvirt device in the running VM."""
    if dev.element is None:
        return
    lv = virt._libvirt()
    try:
        if plug:
            run.dom.attachDeviceFlags(dev.libvirt_xml(), lv.VIR_DOMAIN_AFFECT_LIVE)
        else:
            run.dom.detachDeviceFlags(dev.libvirt_xml(), lv.VIR_DOMAIN_AFFECT_LIVE)
    except lv.libvirtError as e:
        raise ExternalError(f"libvirt could not {'hot-plug' if plug else 'unplug'} "
                            f"{dev.describe()}", detail=str(e), domain=name) from e


def _save_config(run: _Run, new: Domain, placed: Plan | None, image_uuid: Any,
                 uri: str | None, retry: str) -> None:
    """Make *new* the persistent definition: of a running VM with the QEMU
    arguments of *placed* as they are; of a stopped one through define (the
    image grown and checked as ``nvmgr define`` does it)."""
    if not run.active:
        _define(new, new.to_xml(), uri=uri, kek=run.kek, retry=retry)
        return
    if placed is None:
        raise NvmgrError("no placement of the sections for the running VM's definition")
    apply_plan(new, placed, run.path, run.fmt, image_uuid or "")
    virt.define(new.to_xml(), uri)


def _copy(dom: Domain) -> Domain:
    return parse_domain(dom.to_xml())


def _set_live_metadata(d: Any, add: tuple[SectionDecl, ...] = (),
                       remove: frozenset[str] = frozenset()) -> None:
    """The running VM's nvmgr metadata, with *add* declared and *remove* gone
    (``virsh dumpxml`` shows what runs; a migration's prepare sees it)."""
    lv = virt._libvirt()
    try:  # the metadata element alone: no whole live XML to fetch and parse
        text = d.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NVMGR_NS, lv.VIR_DOMAIN_AFFECT_LIVE)
    except lv.libvirtError:
        return  # the running VM has none
    live = from_text(text)
    have = {s.name for s in live.sections}
    secs = tuple(s for s in live.sections if s.name not in remove) + tuple(
        s for s in add if s.name not in have)
    try:
        d.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, to_text(dataclasses.replace(
            live, sections=secs)), "nvmgr", NVMGR_NS, lv.VIR_DOMAIN_AFFECT_LIVE)
    except lv.libvirtError as e:
        raise ExternalError("libvirt could not update the running VM's metadata",
                            detail=str(e)) from e


def _live_metadata(d: Any, name: str, *, add: tuple[SectionDecl, ...] = (),
                   remove: frozenset[str] = frozenset()) -> None:
    """:func:`_set_live_metadata`, after the device is in or out: a failure is
    logged, not raised (the change itself is done; only ``virsh dumpxml``
    of the running VM lags)."""
    try:
        _set_live_metadata(d, add, remove)
    except NvmgrError as e:
        log.warning("%s: the running VM's metadata was not updated: %s", name, e)


def _kept(img: Image, brought: list[PlannedSection],
          contents: Mapping[str, bytes]) -> list[str]:
    """The sections the image holds already (a detach kept them): used as they are.

    :raise UsageError: one that differs from what the device asks for, or
        one given new contents.
    """
    kept = []
    for ps in brought:
        s = img.directory.find(ps.name)
        if s is None:
            continue
        if s.binding is not ps.binding or s.capacity != ps.capacity or s.member is not None:
            raise UsageError(
                f"the image holds a section {ps.name} ({s.binding.name.lower()}, "
                f"{s.capacity:,} bytes) that this device cannot use ({ps.binding.name.lower()}, "
                f"{ps.capacity:,} bytes): remove it first (nvmgr detach --section {ps.name} "
                "--remove-section)", image=img.path, section=ps.name)
        if ps.name in contents:
            raise UsageError(
                f"section {ps.name} is in the image already, with the bytes a detach kept; "
                "it is used as it is: leave out its --data, or remove it first",
                image=img.path, section=ps.name)
        kept.append(ps.name)
    return kept


def _through_qemu(d: Any, path: str, fmt: str) -> bool:
    """Whether the image is a qcow2 file the running QEMU has open as its
    ``nvmgr-image`` node (the image's live sections sit on it): nvmgr writes
    it through QEMU (:func:`_qcow2_lent`)."""
    return fmt == "qcow2" and not is_location(path) and FORMAT_NODE in hotplug.block_nodes(d)


@contextlib.contextmanager
def _qcow2_lent(d: Any, name: str, path: str, kek: Kek | None) -> Iterator[Image]:
    """The qcow2 image *path* the running QEMU of *d* holds, opened writable
    through QEMU itself (:func:`nvmgr.virt.hotplug.exported`: its NBD export
    of ``nvmgr-image``, on a socket in the domain's runtime directory); the
    export gone after.  One nvmgr at a time per domain (a lock on this host).

    :raise NotHotpluggableError: a member recorded with a relative path
        (taken relative to the image file, which this way nvmgr does not open).
    """
    dom_uuid = str(d.UUIDString())
    fd = lock_location(nbd_lock_dir(), f"lent-{dom_uuid}", writable=True, wait=LOCK_WAIT,
                       location=path)
    try:
        users = staging.Users.from_qemu_conf()
        staging.stage_runtime(dom_uuid, {}, users)  # QEMU's user creates the socket there
        sock = os.path.join(staging.runtime_dir(dom_uuid), "lent-image.sock")
        with hotplug.exported(d, FORMAT_NODE, sock) as uri, \
                Image.open(uri, writable=True, kek=kek, wait=LOCK_WAIT) as img:
            relative = [m.path for m in img.directory.members or []
                        if not os.path.isabs(m.path) and not is_location(m.path)]
            if relative:
                raise NotHotpluggableError(
                    f"the image {path} records member {relative[0]} by a relative path, which "
                    "nvmgr cannot resolve while it writes the image through the running QEMU: "
                    "attach with --config (the image grows at the next start)", image=path,
                    domain=name)
            before = {m.index for m in img.directory.members or []}
            yield img
            for m in img.directory.members or []:  # QEMU opens a new member for its slices
                if m.index not in before and not is_location(m.path):
                    staging.hand_to_qemu(img.member_path(m), users)
    finally:
        os.close(fd)


def _grow_open(img: Image, plan: Plan, brought: list[PlannedSection],
               contents: Mapping[str, bytes], result: AttachResult, meta: NvmgrMetadata,
               do_live: bool, **grow_args: Any) -> tuple[Plan, Any]:
    """Grow the open image *img* by the sections *brought* (those it holds already
    kept as they are); :return: the plan placed in it, and the image's UUID."""
    result.image_size_before = img.directory.image_size
    result.kept = _kept(img, brought, contents)
    specs = [SectionSpec(ps.name, ps.capacity, ps.binding, ps.encrypted, ps.device)
             for ps in brought if ps.name not in result.kept]
    going_live = [ps.name for ps in brought if do_live and ps.live]
    # New sections are marked in use in the commit that adds them.
    grow(img, specs, max_image_size=meta.max_image_size, contents=contents,
         in_use=going_live, **grow_args)
    result.added = [s.name for s in specs]
    kept_live = [n for n in going_live if n in result.kept]
    if kept_live:
        img.set_in_use(kept_live, True)
    result.image_size = img.directory.image_size
    return plan_with_offsets(plan, img.directory, img), img.directory.image_uuid


@dataclasses.dataclass
class AttachResult:
    domain: str
    device: str
    live: bool
    config: bool
    image: str
    sections: list[str]
    added: list[str]
    kept: list[str]
    plugged: list[str]
    deferred: bool = False
    image_size_before: int | None = None
    image_size: int | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def attach(name: str, device_xml: str, *, uri: str | None = None, live: bool = False,
           config: bool = False, current: bool = False, persistent: bool = False,
           contents: Mapping[str, bytes] | None = None) -> AttachResult:
    """Attach the device of *device_xml* to domain *name* (see the module's description).

    :param contents: first bytes of new sections (name -> bytes), in the
        image before the device reaches the guest.
    :raise NotHotpluggableError: ``--live`` for what QEMU cannot hot-plug;
        nothing was changed.
    :raise UsageError: bad flags, a section attached already, contents for
        a section the device does not bring.
    """
    dev = parse_device(device_xml)
    contents = dict(contents or {})
    with virt.connect(uri) as conn:
        run = _begin(conn, name, uri, live=live, config=config, current=current,
                     persistent=persistent)
        d, active, do_live, do_config = run.dom, run.active, run.do_live, run.do_config
        pers, meta, kek, path, fmt = run.pers, run.meta, run.kek, run.path, run.fmt
        declared = {s.name for s in meta.sections}
        for decl in dev.sections:
            if decl.name in declared:
                raise UsageError(f"section {decl.name} is attached already (the domain's nvmgr "
                                 "metadata declares it)", section=decl.name, domain=name)
        new = _copy(pers)
        if dev.element is not None:
            new.add_device(dev.element)
        new.set_nvmgr(dataclasses.replace(meta, sections=meta.sections + dev.sections))
        before = {s.name for s in plan_for(pers, encrypted=kek is not None).sections}
        plan = plan_for(new, encrypted=kek is not None)
        brought = [ps for ps in plan.sections if ps.name not in before]
        names = {ps.name for ps in brought}
        stray = sorted(set(contents) - names)
        if stray:
            raise UsageError(f"--data for {', '.join(stray)}: the device brings no such section "
                             f"(it brings {', '.join(sorted(names)) or 'none'})", domain=name)
        if do_live:
            _refuse_live([(ps.name, ps.binding) for ps in brought], dev, name)
        result = AttachResult(name, dev.describe(), do_live, do_config, path,
                              [ps.name for ps in brought], [], [], [])
        base: str | None = None
        if (image_held(path, fmt, active) and (do_live or contents) and brought
                and _through_qemu(d, path, fmt)):
            # qcow2 held by the running QEMU: written through it (its NBD export of the
            # image's format node), grown into raw members beside it; for --live, and
            # for --config --data (the bytes go in now; the device at the next boot).
            with _qcow2_lent(d, name, path, kek) as img:
                placed, image_uuid = _grow_open(img, plan, brought, contents, result, meta,
                                                do_live, in_place_limit=img.container.size(),
                                                member_fmt="raw", beside=path)
            base = FORMAT_NODE
        elif image_held(path, fmt, active):
            if do_live and brought:
                raise NotHotpluggableError(
                    f"the running QEMU holds the {fmt if fmt != 'raw' else 'RBD'} image {path}: "
                    "nvmgr grows only raw files beside it; attach with --config (the image "
                    "grows at the next start)", domain=name)
            if contents:
                raise UsageError("--data needs the image now, and the running QEMU holds it "
                                 "(qcow2 or RBD): attach after the VM stops", domain=name)
            placed = placed_from_args(plan, pers)
            image_uuid = meta.uuid
            result.deferred = True
        else:
            with Image.open(path, writable=True, kek=kek, wait=LOCK_WAIT) as img:
                placed, image_uuid = _grow_open(img, plan, brought, contents, result, meta,
                                                do_live)
        if do_live:
            _libvirt_device(run, dev, name, plug=True)
            for ps in placed.sections:
                if ps.name in names and ps.binding is Binding.BLOCK:
                    result.plugged += hotplug.plug(d, path, ps, base=base)
            _live_metadata(d, name, add=dev.sections)
    if do_config:
        _save_config(run, new, placed, image_uuid, uri, f"nvmgr attach {name} DEVICE.xml")
    return result


@dataclasses.dataclass
class DetachResult:
    domain: str
    device: str
    live: bool
    config: bool
    image: str
    sections: list[str]
    unplugged: list[str]
    removed: list[str]
    kept: list[str]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _without(dom: Domain, dev: Device | None, names: set[str], name: str,
             require_device: bool) -> Domain:
    """A copy of *dom* without the device (the one element it names) and the
    declarations of *names*."""
    out = _copy(dom)
    if dev is not None and dev.element is not None:
        found = out.matching_devices(dev.element)
        if len(found) > 1:
            raise UsageError(f"{len(found)} devices match {dev.describe()}: give its "
                             "<alias name='ua-...'/>, <mac> or <target>", domain=name)
        if not found and require_device:
            raise NotFoundError(f"no device like {dev.describe()} in the domain", domain=name)
        for el in found:
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)
    meta = out.nvmgr
    if meta is not None:
        out.set_nvmgr(dataclasses.replace(
            meta, sections=tuple(s for s in meta.sections if s.name not in names)))
    return out


def _remove(img: Image, names: set[str], unplugged: set[str], active: bool,
            result: DetachResult) -> None:
    """``--remove-section``: each of *names* the image holds, one commit each."""
    for n in sorted(names):
        if img.directory.find(n) is None:
            continue
        img.remove(n, force=n in unplugged or not active, unplugged=n in unplugged)
        result.removed.append(n)


def detach(name: str, device_xml: str | None = None, *, section: str | None = None,
           uri: str | None = None, live: bool = False, config: bool = False,
           current: bool = False, persistent: bool = False,
           remove_section: bool = False) -> DetachResult:
    """Detach a device (DEVICE.xml) or a section (*section*) from domain *name*.

    The section's bytes stay in the image unless *remove_section*.

    :raise NotHotpluggableError: ``--live`` for what QEMU cannot unplug.
    :raise BusyError: ``--remove-section`` of a section the running VM still
        uses (live slice, swtpm state), or the guest did not release the device.
    :raise NotFoundError: no such device or section.
    """
    if (device_xml is None) == (section is None):
        raise UsageError("give DEVICE.xml or --section NAME (one of them)")
    dev = parse_device(device_xml) if device_xml is not None else None
    with virt.connect(uri) as conn:
        run = _begin(conn, name, uri, live=live, config=config, current=current,
                     persistent=persistent)
        d, active, do_live, do_config = run.dom, run.active, run.do_live, run.do_config
        pers, meta, kek, path, fmt = run.pers, run.meta, run.kek, run.path, run.fmt
        enc = kek is not None
        base = plan_for(pers, encrypted=enc)
        if section is not None:
            names = {section}
        elif dev is not None and dev.element is None:
            names = {dev.sections[0].name}
        else:
            names = {s.name for s in dev.sections} if dev is not None else set()
            rest = _without(pers, dev, names, name, require_device=do_config)
            names |= {s.name for s in base.sections} - {
                s.name for s in plan_for(rest, encrypted=enc).sections}
        new = _without(pers, dev, names, name, require_device=do_config)
        planned = {ps.name: ps for ps in base.sections}
        in_image: dict[str, Binding] = {}
        # A qcow2 image the running QEMU holds: --remove-section writes it through
        # QEMU's export of it (_qcow2_lent), as a live attach does.
        through = image_held(path, fmt, active) and _through_qemu(d, path, fmt)
        lent = remove_section and through
        if not image_held(path, fmt, active):
            with Image.open(path) as img:
                in_image = {s.name: s.binding for s in img.directory.sections}
        elif lent:
            with _qcow2_lent(d, name, path, kek) as img:
                in_image = {s.name: s.binding for s in img.directory.sections}
        missing = sorted(n for n in names if n not in planned and n not in in_image)
        if missing:
            raise NotFoundError(f"no section {', '.join(missing)} in the domain or its image",
                                section=missing[0], domain=name)
        bindings = {n: (planned[n].binding if n in planned else in_image[n]) for n in names}
        if do_live:
            _refuse_live(sorted(bindings.items()), dev, name)
        if remove_section and active:
            for n, b in sorted(bindings.items()):
                if b is Binding.TPM:
                    raise BusyError(f"section {n} is the running VM's TPM state (swtpm holds "
                                    "it until the VM stops): --remove-section after it stops",
                                    section=n, domain=name)
                if b.live and not do_live:
                    raise BusyError(f"section {n} is live and the running VM reads it: detach "
                                    "it with --live too, or remove it after the VM stops",
                                    section=n, domain=name)
            if image_held(path, fmt, active) and not lent:
                raise BusyError(f"the running QEMU holds the image {path} (qcow2 or RBD): "
                                "--remove-section after the VM stops", domain=name)
        result = DetachResult(name, dev.describe() if dev else f"section {section}", do_live,
                              do_config, path, sorted(names), [], [], [])
        unplugged: set[str] = set()
        if do_live:
            if dev is not None:
                _libvirt_device(run, dev, name, plug=False)
            for n in sorted(names):
                if bindings[n] is Binding.BLOCK:
                    ps = planned.get(n)
                    device = (ps.device or node_name(n)) if ps is not None and ps.driver else None
                    if device is None and ps is None:
                        device = next((s.device or node_name(n) for s in meta.sections
                                       if s.name == n and s.driver), None)
                    if hotplug.unplug(d, n, device):
                        unplugged.add(n)
            _live_metadata(d, name, remove=frozenset(names))
        result.unplugged = sorted(unplugged)
    if do_config:
        placed: Plan | None = None
        image_uuid: Any = None
        if through:  # where the sections are, member or not, only the image knows
            with virt.connect(uri) as conn, \
                    _qcow2_lent(virt.lookup(conn, name), name, path, kek) as img:
                placed = plan_with_offsets(plan_for(new, encrypted=enc), img.directory, img)
                image_uuid = img.directory.image_uuid
        elif active and image_held(path, fmt, active):
            placed = placed_from_args(plan_for(new, encrypted=enc), new)
            image_uuid = meta.uuid
        elif active:
            with Image.open(path) as img:
                placed = plan_with_offsets(plan_for(new, encrypted=enc), img.directory, img)
                image_uuid = img.directory.image_uuid
        _save_config(run, new, placed, image_uuid, uri, f"nvmgr detach {name}")
    if remove_section:
        if lent:
            with virt.connect(uri) as conn, \
                    _qcow2_lent(virt.lookup(conn, name), name, path, kek) as img:
                _remove(img, names, unplugged, active, result)
        else:
            with Image.open(path, writable=True, kek=kek, wait=LOCK_WAIT) as img:
                _remove(img, names, unplugged, active, result)
    result.kept = sorted(n for n in names if n in in_image and n not in result.removed)
    return result
