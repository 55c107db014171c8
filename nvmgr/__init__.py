"""nvmgr: one file of persistent device state per libvirt/QEMU virtual machine.

UEFI variables, vTPM state, NIC EEPROM, PCI VPD and FRU data live as named
sections in one image per VM (raw or qcow2), listed by a DER directory with
each section's worst-case size, actual size, crc32 and encryption.

The public API, most important first::

    Image           open/create an image; get, put, check, grow, rekey
    SectionSpec     what a new section needs (name, size, binding)
    Binding         how a device consumes its section
    NvmgrError      root of every error nvmgr raises (see nvmgr.errors)
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

__all__ = ["Image", "SectionSpec", "Binding", "NvmgrError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from .errors import NvmgrError
    from .image import Image
    from .layout import SectionSpec
    from .model import Binding

_LAZY = {"Image": "image", "SectionSpec": "layout", "Binding": "model", "NvmgrError": "errors"}


def __getattr__(name: str) -> Any:
    """Load the public names on first use: the hook and the CLI start faster."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
