"""``nvmgr images``: every image under the managed directories, its owner and state.

libvirt says which domains exist (persistent or running, with the image
their metadata names); :func:`nvmgr.provision.orphans.survey` reads each
image's directory.  An image whose owner UUID no libvirt domain has is
orphaned, whether or not the watcher recorded it (then with the time).
"""

from __future__ import annotations

from collections.abc import Iterable

from nvmgr.domain.elements import parse_domain
from nvmgr.errors import NvmgrError
from nvmgr.paths import IMAGE_DIR
from nvmgr.provision.orphans import ImageEntry, candidates, survey
from nvmgr.virt import conn as virt


def domains(uri: str | None = None) -> tuple[dict[str, tuple[str, bool]], list[str]]:
    """(domain UUID -> (name, running) for every domain, the images their metadata names)."""
    out: dict[str, tuple[str, bool]] = {}
    images: list[str] = []
    lv = virt._libvirt()
    with virt.connect(uri, readonly=True) as c:
        for d in c.listAllDomains(0):
            try:
                out[d.UUIDString()] = (d.name(), bool(d.isActive()))
                meta = parse_domain(d.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)).nvmgr
            except (lv.libvirtError, NvmgrError):
                continue  # undefined meanwhile, or XML nvmgr cannot read: no image of ours
            if meta is not None and meta.image:
                images.append(meta.image)
    return out, images


def images(dirs: Iterable[str] = (IMAGE_DIR,), uri: str | None = None, *,
           orphans_only: bool = False, extra: Iterable[str] = ()) -> list[ImageEntry]:
    """Every nvmgr image in *dirs*, every image a domain names and the *extra* images
    (files or network locations), with owner and state."""
    known, named = domains(uri)
    found = survey(candidates(dirs, [*named, *extra]), known)
    return [e for e in found if e.state == "orphaned"] if orphans_only else found
