"""Plan: from a domain to the sections its image needs, placed.

::

    domain XML --parse--> Domain --profiles--> [SectionSpec] --layout()--> Plan

Where each section comes from:

- ``uefi-vars`` (binding ``pflash``): a ``<loader type='pflash'>`` that keeps
  vars (not ``stateless='yes'`` unless nvmgr made it so, recorded in the
  metadata's ``libvirt-nvram``), or ``<os firmware='efi'>``; sized by
  :func:`nvmgr.domain.profiles.uefi_vars_size`.
- ``tpm-permall``, ``tpm-volatilestate`` [, ``tpm-savestate``] (binding
  ``tpm``): each ``<tpm><backend type='emulator'>``, per its version's profile.
- every ``<nvmgr:section>`` in the metadata: a new section (``size`` or a
  ``kind`` from :data:`nvmgr.domain.profiles.PROFILES`), or, under the name of a
  section above, a larger or smaller worst-case size for it.

:func:`plan_domain` is what ``nvmgr plan DOMAIN.xml`` calls; the result is
plain data (:class:`Plan`), rendered by :func:`plan_to_json` and
:func:`render_text`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from nvmgr import paths
from nvmgr.domain import profiles
from nvmgr.domain.elements import Domain, check_domain_name, parse_domain
from nvmgr.domain.metadata import NvmgrMetadata, SectionDecl
from nvmgr.errors import InvalidInputError, UsageError
from nvmgr.format.layout import SectionSpec, layout
from nvmgr.format.model import Binding, Directory
from nvmgr.units import format_size

#: Where ``nvmgr define`` puts a domain's image unless the metadata says otherwise.
DEFAULT_IMAGE_DIR = paths.IMAGE_DIR


@dataclasses.dataclass(frozen=True)
class PlannedSection:
    """One section as placed: what it is for, where it lives, why this size."""

    name: str
    binding: Binding
    capacity: int
    reserved: int
    offset: int
    spare: int | None
    encrypted: bool
    source: str
    device: str | None = None
    driver: str | None = None
    fwcfg_name: str | None = None
    template: str | None = None
    #: Stored in a member image: its file and format (set from the image,
    #: :func:`nvmgr.provision.prepare.plan_with_offsets`); QEMU's slice of a
    #: live section then points into that file.
    member_path: str | None = None
    member_format: str | None = None

    @property
    def live(self) -> bool:
        """QEMU reads and writes it in place (a raw slice at :attr:`offset`)."""
        return self.binding.live

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "binding": self.binding.name.lower(),
            "live": self.live,
            "capacity": self.capacity,
            "reserved": self.reserved,
            "offset": self.offset,
            "spare": self.spare,
            "encrypted": self.encrypted,
            "device": self.device,
            "driver": self.driver,
            "fwcfg_name": self.fwcfg_name,
            "template": self.template,
            "source": self.source,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """The image a domain needs: sections with offsets, header area, total size.

    ``directory`` is the generation-0 :class:`~nvmgr.format.model.Directory` that
    :func:`nvmgr.format.layout.layout` produced; an image created from this plan
    starts from it.
    """

    domain: str | None
    domain_uuid: uuid.UUID | None
    image: str
    format: str
    image_uuid: uuid.UUID | None
    encrypted: bool
    header_area: int
    scratch_offset: int
    scratch_length: int
    image_size: int
    sections: tuple[PlannedSection, ...]
    directory: Directory = dataclasses.field(compare=False, repr=False)

    @property
    def data_start(self) -> int:
        return 2 * self.header_area

    def find(self, name: str) -> PlannedSection | None:
        return next((s for s in self.sections if s.name == name), None)

    @property
    def live_sections(self) -> tuple[PlannedSection, ...]:
        return tuple(s for s in self.sections if s.live)


@dataclasses.dataclass
class _Want:
    """A section before layout: accumulated from the domain, then the metadata."""

    name: str
    size: int
    binding: Binding
    source: str
    device: str | None = None
    driver: str | None = None
    fwcfg_name: str | None = None
    template: str | None = None


def _uefi_want(dom: Domain, meta: NvmgrMetadata | None) -> _Want | None:
    os_ = dom.os
    if os_ is None:
        return None
    loader = os_.loader
    record = meta.libvirt_nvram if meta else None
    firmware = os_.firmware or (record.firmware if record else None)
    if loader is not None and loader.stateless and record is None:
        return None  # the user asked for stateless firmware: no vars to keep
    loader_path = loader.path.strip() if loader is not None and loader.path else None
    nvram = os_.nvram
    template = (nvram.template if nvram else None) or (record.vars_template if record else None)
    if loader_path is None and firmware == "efi":
        fw = profiles.select_firmware(
            os_.arch or "x86_64",
            os_.machine or "pc",
            os_.firmware_features(),
            smm=dom.smm,
        )
        loader_path, template = fw.loader, template or fw.template
    elif loader is None or loader.type != "pflash":
        return None  # BIOS, or a ROM loader: nothing persistent
    if loader_path is None:
        raise InvalidInputError(
            "<os><loader type='pflash'> names no firmware file: give its path, or "
            "<os firmware='efi'> for libvirt to pick one"
        )
    override = next(
        (d.size for d in (meta.sections if meta else ()) if d.name == profiles.UEFI_SECTION),
        None,
    )
    if template:  # a FIFO, device or oversized file is refused before anything is created
        profiles.check_flash_file(template)
    if override is not None:  # no need to know the firmware: _apply_decl sets the size
        return _Want(profiles.UEFI_SECTION, override, Binding.PFLASH, "", template=template)
    vs = profiles.uefi_vars_size(template, loader_path)
    return _Want(profiles.UEFI_SECTION, vs.size, Binding.PFLASH, vs.source, template=template)


def _tpm_wants(dom: Domain) -> list[_Want]:
    out: list[_Want] = []
    for i, tpm in enumerate(dom.tpms):
        if tpm.backend_type != "emulator":
            continue  # passthrough/external: the state is not libvirt's (or ours)
        version = profiles.tpm_version(tpm.model, tpm.version)
        prof = profiles.device_profile(f"tpm-{version}")
        prefix = profiles.tpm_prefix(i)
        for sp in prof.sections:
            out.append(
                _Want(
                    prefix + sp.suffix,
                    sp.size,
                    sp.binding,
                    f"TPM {version} profile ({tpm.model or profiles.TPM_DEFAULT_MODEL}, swtpm)",
                    device=tpm.alias or f"tpm{i}",
                )
            )
    return out


def _per_device_wants(dom: Domain, meta: NvmgrMetadata | None) -> list[_Want]:
    """One section per libvirt device of each ``<nvmgr:per-device kind>`` (a NIC's
    EEPROM per ``<interface>``); a device without its MAC yet (libvirt gives one at
    define) gets its section at the next reconcile or start."""
    out: list[_Want] = []
    for kind in meta.per_device if meta else ():
        prof = profiles.device_profile(kind)
        sp = prof.sections[0]
        if prof.libvirt_device == "interface":
            for nic in dom.interfaces:
                if nic.mac:
                    out.append(_Want(profiles.per_device_section(kind, nic.mac), sp.size,
                                     sp.binding, f"per-device {kind}: {sp.source}",
                                     device=nic.alias))
    return out


def _apply_decl(wants: dict[str, _Want], decl: SectionDecl) -> None:
    old = wants.get(decl.name)
    if old is not None:
        if decl.kind is not None or decl.driver is not None or decl.fwcfg_name is not None:
            raise InvalidInputError(
                f"section {decl.name} comes from the domain's devices; the metadata may "
                "only change its size"
            )
        if decl.binding is not None and decl.binding is not old.binding:
            raise InvalidInputError(
                f"section {decl.name} is bound {old.binding.name.lower()} by the domain, "
                f"not {decl.binding.name.lower()}"
            )
        if decl.size is not None:
            old.size, old.source = decl.size, "<nvmgr:section> size override"
        return
    if decl.binding in (Binding.PFLASH, Binding.TPM):
        raise InvalidInputError(
            f"section {decl.name}: binding {decl.binding.name.lower()} comes from the "
            "domain's <loader>/<tpm>; declared sections are opaque, block or fwcfg"
        )
    if decl.kind is not None:
        prof = profiles.device_profile(decl.kind)
        if len(prof.sections) != 1:
            raise InvalidInputError(
                f"section {decl.name}: kind {decl.kind} comes from the domain's devices, "
                "not from a declared section"
            )
        sp = prof.sections[0]
        size = decl.size if decl.size is not None else sp.size
        binding = decl.binding or sp.binding
        driver = decl.driver or (prof.driver if binding is Binding.BLOCK else None)
        source = f"kind {decl.kind}: {sp.source}" if decl.size is None else "declared size"
    else:
        if decl.size is None:
            raise InvalidInputError(f"section {decl.name} needs a size or a kind")
        size, binding, driver = decl.size, decl.binding or Binding.OPAQUE, decl.driver
        source = "declared size"
    if binding is Binding.FWCFG and decl.fwcfg_name is None:
        raise InvalidInputError(f"section {decl.name}: binding fwcfg needs a fwcfg-name")
    wants[decl.name] = _Want(
        decl.name, size, binding, source, decl.device, driver, decl.fwcfg_name
    )


def default_image_path(name: str) -> str:
    """``/var/lib/libvirt/nvmgr/NAME.nvram``."""
    return os.path.join(DEFAULT_IMAGE_DIR, check_domain_name(name) + ".nvram")


def plan_for(dom: Domain, *, encrypted: bool = False) -> Plan:
    """Plan the image for a parsed domain (see :func:`plan_domain`)."""
    meta = dom.nvmgr
    wants: dict[str, _Want] = {}
    uefi = _uefi_want(dom, meta)
    for w in ([uefi] if uefi else []) + _tpm_wants(dom) + _per_device_wants(dom, meta):
        wants[w.name] = w
    for decl in meta.sections if meta else ():
        _apply_decl(wants, decl)
    encrypted = encrypted or bool(meta and meta.encrypted)
    for w in wants.values():
        if w.binding.live and w.size % 512:
            raise InvalidInputError(
                f"section {w.name}: QEMU reads {w.binding.name.lower()} sections through a "
                f"raw slice whose size must be a multiple of 512 bytes, not {w.size:,}"
            )
    try:
        specs = [
            SectionSpec(w.name, w.size, w.binding, encrypted and not w.binding.live, w.device)
            for w in wants.values()
        ]
    except UsageError as e:
        raise InvalidInputError(e.message, section=e.section) from e
    image_uuid = meta.uuid if meta else None
    d = layout(specs, image_uuid=image_uuid, domain_uuid=dom.uuid)
    sections = []
    for s in d.sections:  # layout order: live first, then the rest
        w = wants[s.name]
        sections.append(
            PlannedSection(
                name=s.name,
                binding=s.binding,
                capacity=s.capacity,
                reserved=s.reserved,
                offset=s.offset,
                spare=s.spare,
                encrypted=s.encrypted,
                source=w.source,
                device=w.device,
                driver=w.driver,
                fwcfg_name=w.fwcfg_name,
                template=w.template,
            )
        )
    name = dom.name
    image = (meta.image if meta else None) or (default_image_path(name) if name else "")
    if not image:
        raise InvalidInputError("the domain has no <name> and its metadata names no image")
    return Plan(
        domain=name,
        domain_uuid=dom.uuid,
        image=image,
        format=(meta.format if meta else None) or "raw",
        image_uuid=image_uuid,
        encrypted=encrypted,
        header_area=d.header_area,
        scratch_offset=d.scratch_offset,
        scratch_length=d.scratch_length,
        image_size=d.image_size,
        sections=tuple(sections),
        directory=d,
    )


def plan_domain(xml_text: str | bytes, encrypted: bool = False) -> Plan:
    """Parse a domain XML and plan its image.

    :param encrypted: encrypt the non-live sections (also implied by a key
        named in the domain's nvmgr metadata).
    :raise InvalidInputError: hostile or malformed XML or metadata, sizes
        out of bounds, sections that contradict the devices.
    :raise NotFoundError: ``<os firmware='efi'>`` and no firmware descriptor fits.
    """
    return plan_for(parse_domain(xml_text), encrypted=encrypted)


def plan_to_json(plan: Plan) -> dict[str, object]:
    """The plan as JSON-ready data (``nvmgr plan --output json``)."""
    return {
        "domain": plan.domain,
        "domain_uuid": str(plan.domain_uuid) if plan.domain_uuid else None,
        "image": {
            "path": plan.image,
            "format": plan.format,
            "uuid": str(plan.image_uuid) if plan.image_uuid else None,
            "size": plan.image_size,
            "encrypted": plan.encrypted,
            "header_area": plan.header_area,
            "data_start": plan.data_start,
            "scratch": {"offset": plan.scratch_offset, "length": plan.scratch_length},
        },
        "sections": [s.to_json() for s in plan.sections],
    }


def render_text(plan: Plan) -> str:
    """The plan for people: one line per extent, in image order."""
    head = [
        f"domain   {plan.domain or '-'}"
        + (f" ({plan.domain_uuid})" if plan.domain_uuid else ""),
        f"image    {plan.image} ({plan.format}"
        + (", encrypted" if plan.encrypted else "")
        + f"), {plan.image_size:,} bytes ({format_size(plan.image_size)}) of address space",
        "",
    ]
    rows: list[tuple[int, str, str, str, str, str]] = [
        (0, "header A", "-", format_size(plan.header_area), "", "directory, copy A"),
        (plan.header_area, "header B", "-", format_size(plan.header_area), "", "directory, copy B"),
    ]
    if plan.scratch_length:
        rows.append(
            (plan.scratch_offset, "scratch", "-", format_size(plan.scratch_length), "",
             "staging for crash-safe writes of live sections")
        )
    for s in plan.sections:
        note = s.source + (f"; device {s.device}" if s.device else "")
        if s.fwcfg_name:
            note += f"; fw_cfg {s.fwcfg_name}"
        if s.driver:
            note += f"; -device {s.driver}"
        cap = format_size(s.capacity) + (" enc" if s.encrypted else "")
        rows.append((s.offset, s.name, s.binding.name.lower(), format_size(s.reserved), cap, note))
        if s.spare is not None:
            rows.append((s.spare, f"{s.name} (2nd slot)", s.binding.name.lower(),
                         format_size(s.reserved), "", "alternate slot for atomic rewrites"))
    rows.sort(key=lambda r: r[0])
    width = max(len(r[1]) for r in rows)
    lines = [f"{'OFFSET':>12}  {'NAME':<{width}}  {'BINDING':<7}  {'SLOT':>9}  {'CAPACITY':>12}  SOURCE"]
    for off, name, binding, slot, cap, note in rows:
        lines.append(f"{off:>#12x}  {name:<{width}}  {binding:<7}  {slot:>9}  {cap:>12}  {note}")
    return "\n".join(head + lines) + "\n"
