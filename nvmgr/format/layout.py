"""Layout: where each section's bytes go, and how large the image is.

A :class:`SectionSpec` says what a section needs (name, worst-case size,
binding, encryption); :func:`layout` places specs in a new directory and
:func:`extend` places more specs in an existing one without moving anything.

:func:`extend` allocates first-fit: each new slot goes into the first hole
big enough (space a removed section, a moved section or an old scratch area
left free, :func:`holes`), and after everything in use only when none is.
A hole is only ever space the directory gives to nobody, so a new slot never
overlaps a section, a live slice QEMU reads in place, the scratch area or a
header copy.

Placement (all offsets 4 KiB aligned)::

    [header A][header B][live sections ...][scratch][other sections, 2 slots each]

- Live sections (``pflash``, ``block``) are read in place by QEMU through a
  raw slice whose offset is fixed in the domain's QEMU arguments, so they
  have one slot.  A crash-safe offline write stages the new bytes in the
  shared *scratch* area (as large as the largest live section), commits, then
  copies them home and commits again.
- Every other section has two slots and alternates between them: a write
  fills the unused slot, then one header commit switches over.

So the image costs ``2 x headers + live + max(live) + 2 x other`` bytes of
address space; raw files are sparse and qcow2 allocates on write, so unused
slots cost no disk.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from nvmgr.errors import NoSpaceError, UsageError
from nvmgr.format.model import (
    ALIGN,
    CIPHER_OVERHEAD,
    MAX_DEVICE,
    MAX_IMAGE_SIZE,
    MAX_SECTION_SIZE,
    MAX_SECTIONS,
    Binding,
    Directory,
    Section,
    align_up,
    check_name,
    header_area_for,
)

__all__ = ["MAX_SECTION_SIZE", "SectionSpec", "extend", "holes", "layout"]

#: A byte range of the image: (offset, length).
Extent = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    """What one section needs.  Plain data; see :func:`layout`."""

    name: str
    capacity: int
    binding: Binding = Binding.OPAQUE
    encrypted: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.capacity, int) or not 0 < self.capacity <= MAX_SECTION_SIZE:
            raise UsageError(
                f"section {self.name}: size {self.capacity} is outside 1 byte .. 1 TiB",
                section=self.name,
            )
        if self.binding.live and self.capacity % 512:
            raise UsageError(
                f"section {self.name}: a {self.binding.name.lower()} section must be a "
                f"multiple of 512 bytes (QEMU slices), not {self.capacity}",
                section=self.name,
            )
        if self.device is not None and not 1 <= len(self.device) <= MAX_DEVICE:
            raise UsageError(
                f"section {self.name}: its device alias is {len(self.device)} characters "
                f"({self.device[:40]!r}...); the directory holds 1..{MAX_DEVICE}",
                section=self.name,
            )
        if self.encrypted and self.binding.live:
            raise UsageError(
                f"section {self.name}: QEMU reads {self.binding.name.lower()} sections "
                "live, so they cannot be encrypted by nvmgr (use a qcow2+LUKS container)",
                section=self.name,
            )

    @property
    def reserved(self) -> int:
        return align_up(self.capacity + (CIPHER_OVERHEAD if self.encrypted else 0), ALIGN)


def _check_unique(specs: list[SectionSpec], taken: set[str]) -> None:
    seen = set(taken)
    for s in specs:
        if s.name in seen:
            raise UsageError(f"section {s.name} is named twice", section=s.name)
        seen.add(s.name)


def layout(
    specs: list[SectionSpec],
    *,
    image_uuid: uuid.UUID | None = None,
    domain_uuid: uuid.UUID | None = None,
    header_area: int | None = None,
) -> Directory:
    """Place *specs* in a new directory (generation 0, all sections empty)."""
    if len(specs) > MAX_SECTIONS:
        raise UsageError(f"{len(specs)} sections exceed the limit of {MAX_SECTIONS}")
    _check_unique(specs, set())
    d = Directory(
        image_uuid=image_uuid or uuid.uuid4(),
        domain_uuid=domain_uuid,
        header_area=header_area or header_area_for(len(specs)),
        image_size=0,
    )
    d.image_size = d.data_start
    _place(d, specs)
    return d


def holes(d: Directory, keep: Sequence[Extent] = ()) -> list[Extent]:
    """The free byte ranges between the header copies and the end of *d*'s data.

    Every extent the directory names (header copies, scratch, each section's
    slots, a pending live copy's home) and every extent in *keep* is taken;
    what lies between them is a hole (4 KiB aligned, as everything placed is).
    Space after the last extent in use is not a hole: it is the tail.
    """
    taken = sorted([(off, n) for off, n, _what in d.extents()] + list(keep))
    out: list[Extent] = []
    pos = d.data_start
    for off, n in taken:
        if off > pos:
            start = align_up(pos)
            if off - start > 0:
                out.append((start, off - start))
        pos = max(pos, off + n)
    return out


def extend(d: Directory, specs: list[SectionSpec], *,
           keep: Sequence[Extent] = ()) -> Directory:
    """A copy of *d* with *specs* added, first-fit in its holes, then at the end.

    Existing sections keep their offsets (QEMU arguments point at live ones).
    A new live section larger than the scratch area gets a new, larger
    scratch area (first-fit too).

    :param keep: extents that count as taken though *d* does not name them
        (a section being moved still owns its old slots until the commit).
    """
    if len(d.sections) + len(specs) > MAX_SECTIONS:
        raise NoSpaceError(f"the directory is limited to {MAX_SECTIONS} sections")
    _check_unique(specs, {s.name for s in d.sections})
    new = dataclasses.replace(d, sections=[dataclasses.replace(s) for s in d.sections])
    new.image_size = max([new.end_of_data(), new.data_start, *(o + n for o, n in keep)])
    _place(new, specs, holes(d, keep))
    return new


def _place(d: Directory, specs: list[SectionSpec], free: list[Extent] | None = None) -> None:
    free = list(free or [])
    tail = [align_up(d.image_size)]

    def take(n: int) -> int:
        """First fit: the lowest hole of at least *n* bytes, else the tail."""
        for i, (off, room) in enumerate(free):
            if room >= n:
                free[i] = (off + n, room - n)
                return off
        off = tail[0]
        tail[0] += n
        return off

    live = [s for s in specs if s.binding.live]
    other = [s for s in specs if not s.binding.live]
    for s in live:
        d.sections.append(_section(s, take(s.reserved)))
    need = max((s.reserved for s in live), default=0)
    if need > d.scratch_length:
        d.scratch_offset, d.scratch_length = take(need), need
    for s in other:
        sec = _section(s, take(s.reserved))
        sec.spare = take(s.reserved)
        d.sections.append(sec)
    off = tail[0]
    if off > MAX_IMAGE_SIZE:
        raise NoSpaceError(f"the sections need an image of {off:,} bytes, beyond the limit "
                           f"of {MAX_IMAGE_SIZE:,} (256 TiB)")
    d.image_size = off


def _section(s: SectionSpec, offset: int) -> Section:
    return Section(
        name=s.name,
        binding=s.binding,
        capacity=s.capacity,
        reserved=s.reserved,
        offset=offset,
        encrypted=s.encrypted,
        device=s.device,
    )
