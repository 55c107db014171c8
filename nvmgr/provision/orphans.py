"""Images whose domain is gone: recorded, listed, adopted or moved aside.

A domain undefined behind nvmgr's back (``virsh undefine``, virt-manager's
Delete) leaves its image, which still names the domain's UUID as its owner.
Nothing here calls libvirt: the caller says which domains exist.

- :func:`mark_orphaned` records, in the image's directory, that its owner was
  undefined, when, and its name then (the watcher, ``nvmgr undefine``);
- :func:`survey` lists the images under the managed directories (and those
  named: the images of domains, network locations given) with their owner and
  state (``nvmgr images``);
- :func:`adopt` gives an orphan to a new domain, state and all;
  :func:`move_aside` renames it out of a new domain's way, kept
  (``nvmgr define --adopt`` / ``--fresh``).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from nvmgr.errors import BusyError, ForeignImageError, NvmgrError, OrphanedImageError, UsageError
from nvmgr.format.model import Orphaned
from nvmgr.image.image import Image
from nvmgr.storage import image_exists, is_location, rbd

#: Seconds to wait for another nvmgr writer (a hook) holding the image.
LOCK_WAIT = 30.0


def iso(ts: int) -> str:
    """A record's time as ISO 8601 UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def mark_orphaned(path: str, domain_uuid: str, name: str | None,
                  when: float | None = None) -> bool:
    """Record in *path* that its owner *domain_uuid* (called *name*) was undefined.

    Nothing happens (False) when the image is gone, names another owner
    (adopted meanwhile), or is recorded already (the first time stays).

    :raise NvmgrError: the image cannot be opened (corrupt, busy too long), or a
        network location cannot be asked (its cluster or server, its key).
    """
    if not image_exists(path):
        return False
    with Image.open(path, writable=True, wait=LOCK_WAIT) as img:
        d = img.directory
        if d.domain_uuid is None or str(d.domain_uuid) != str(domain_uuid) or d.orphaned:
            return False
        img.set_orphaned(Orphaned(int(time.time() if when is None else when),
                                  (name or None) and name[:255]))
        return True


def record_of(path: str) -> Orphaned | None:
    """The orphan record of the image at *path* (None: none, or no image)."""
    if not image_exists(path):
        return None
    with Image.open(path) as img:
        return img.directory.orphaned


def refusal(path: str, owner: uuid.UUID, record: Orphaned | None, name: str | None,
            retry: str) -> OrphanedImageError:
    """The refusal to use an orphan without a choice; *retry* is the command to
    run again with ``--adopt`` or ``--fresh`` (never the bare command again)."""
    was = f"domain {record.domain_name or owner}" if record else f"domain {owner}"
    since = f", undefined at {iso(record.since)}." if record else ", which no longer exists."
    return OrphanedImageError(
        f"{path} holds the state of {was}{since} Choose: '{retry} --adopt' to take that "
        f"state (same UEFI vars and TPM), or '{retry} --fresh' to start with a new image "
        "(the old one is moved aside, kept, and its new path printed); "
        "'nvmgr images --orphans' lists every orphan", image=path, domain=name)


def adopt(path: str, new_owner: uuid.UUID) -> uuid.UUID:
    """Make *new_owner* the owner of the orphan at *path*, its state kept; return
    the image UUID (unchanged: the image stays the same image)."""
    with Image.open(path, writable=True, wait=LOCK_WAIT) as img:
        image_uuid = img.directory.image_uuid
        img.reassign(image_uuid=image_uuid, domain_uuid=new_owner)  # clears the record
        return image_uuid


def aside_path(path: str, when: float | None = None) -> str:
    """Where :func:`move_aside` puts *path*: ``NAME.orphan-YYYYmmddTHHMMSSZ.nvram``
    beside it (a counter added if taken); an RBD image gets the name
    ``IMAGE.orphan-YYYYmmddTHHMMSSZ`` in its pool (the location's options kept).

    :raise UsageError: an NBD export (its server names it: nvmgr cannot move it).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))
    if rbd.is_rbd(path):
        loc = rbd.RbdLocation.parse(path)
        for n in range(1000):
            name = f"{loc.image}.orphan-{stamp}{f'-{n}' if n else ''}"
            spec = dataclasses.replace(loc, image=name, snapshot=None).spec()
            if not image_exists(spec):
                return spec
        raise BusyError(f"no free name to move {path} aside", image=path)
    if is_location(path):
        raise UsageError(f"{path} is an NBD export, which nvmgr cannot move aside: take its "
                         "state with --adopt, or serve another export and name it", image=path)
    p = Path(path)
    stem, suffix = (p.stem, p.suffix) if p.suffix else (p.name, "")
    for n in range(1000):
        cand = p.with_name(f"{stem}.orphan-{stamp}{f'-{n}' if n else ''}{suffix}")
        if not cand.exists():
            return str(cand)
    raise BusyError(f"no free name to move {path} aside", image=path)


def move_aside(path: str, owner: uuid.UUID) -> str:
    """Rename the orphan at *path* out of the way, kept (recorded as orphaned
    first, if it was not); return its new path."""
    dst = aside_path(path)  # an NBD export: refused before anything is written
    mark_orphaned(path, str(owner), None)
    # Hold the image's lock while renaming: no hook or nvmgr writer is in it.
    with Image.open(path, writable=True, wait=LOCK_WAIT):
        if rbd.is_rbd(path):
            return rbd.rename(path, rbd.RbdLocation.parse(dst).image)  # never overwrites
        os.link(path, dst)  # never overwrites
        os.unlink(path)
    return dst


@dataclasses.dataclass
class ImageEntry:
    """One image under a managed directory, as ``nvmgr images`` shows it."""

    path: str
    state: str  # running | defined | orphaned | unowned | unreadable
    domain: str | None = None
    domain_uuid: str | None = None
    image_uuid: str | None = None
    orphaned_since: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def candidates(dirs: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Regular files directly under *dirs*, and the *extra* paths that exist (network
    locations, which no directory lists, as they are), sorted, once each."""
    out: set[str] = set()
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        out.update(os.path.abspath(e.path) for e in entries
                   if e.is_file(follow_symlinks=False) and not e.name.startswith("."))
    out.update(os.path.abspath(p) for p in extra if not is_location(p) and os.path.isfile(p))
    out.update(p for p in extra if is_location(p))
    return sorted(out)


def survey(paths: Iterable[str], domains: dict[str, tuple[str, bool]]) -> list[ImageEntry]:
    """Each nvmgr image among *paths* (other files are skipped) with its owner and state.

    :param domains: domain UUID (str) -> (name, running) for every domain libvirt knows.
    """
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                d = img.directory
        except ForeignImageError:
            continue
        except NvmgrError as e:
            out.append(ImageEntry(path, "unreadable", error=str(e)))
            continue
        except OSError as e:
            out.append(ImageEntry(path, "unreadable", error=e.strerror or str(e)))
            continue
        owner = str(d.domain_uuid) if d.domain_uuid else None
        entry = ImageEntry(path, "unowned", domain_uuid=owner, image_uuid=str(d.image_uuid))
        if owner in domains:
            entry.domain, running = domains[owner]
            entry.state = "running" if running else "defined"
        elif owner is not None:
            entry.state = "orphaned"
            if d.orphaned is not None:
                entry.domain = d.orphaned.domain_name
                entry.orphaned_since = iso(d.orphaned.since)
        out.append(entry)
    return out

