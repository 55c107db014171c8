"""The XML namespaces nvmgr reads and writes in a libvirt domain.

Plain names, no lxml: the hook's entry checks for :data:`NVMGR_NS` in the raw
bytes before it parses anything.
"""

from __future__ import annotations

#: nvmgr's domain metadata (``<metadata><nvmgr:nvram>``), schema ``nvmgr-metadata.rng``.
NVMGR_NS = "https://nvmgr.dev/schemas/metadata/1"
#: libvirt's QEMU namespace (``<qemu:commandline>``).
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: The prefixes nvmgr writes, and accepts in the paths of its descriptors.
NSMAP = {"nvmgr": NVMGR_NS, "qemu": QEMU_NS}


def clark(tag: str) -> str:
    """``nvmgr:section`` -> ``{https://nvmgr.dev/...}section``; ``name`` stays ``name``."""
    prefix, sep, local = tag.rpartition(":")
    if not sep:
        return local
    return f"{{{NSMAP[prefix]}}}{local}"
