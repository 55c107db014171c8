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

from .errors import NvmgrError  # noqa: E402
from .image import Image  # noqa: E402
from .layout import SectionSpec  # noqa: E402
from .model import Binding  # noqa: E402

__all__ = ["Image", "SectionSpec", "Binding", "NvmgrError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
