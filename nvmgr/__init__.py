"""nvmgr: one file of persistent device state per libvirt/QEMU virtual machine.

UEFI variables, vTPM state, NIC EEPROM, PCI VPD and FRU data live as named
sections in one image per VM (raw or qcow2), listed by a DER directory with
each section's worst-case size, actual size, crc32 and encryption.

The public API, most important first::

    Image           open/create an image; get, put, check, grow, rekey
    SectionSpec     what a new section needs (name, size, binding)
    Binding         how a device consumes its section
    NvmgrError      root of every error nvmgr raises (see nvmgr.errors)

The package's layers, top to bottom (``ARCHITECTURE.md`` draws them)::

    cli, hook       the two entries: argv in, exit code out
    virt            the only libvirt-python user: define, undefine, reconcile
    provision       a domain's image from its plan (shared by define and hook)
    domain          domain XML -> devices -> profiles -> plan -> QEMU arguments
    image           the commit protocols over one container
    format          the image format: model, layout, DER directory codec
    storage         bytes at offsets: raw files, qcow2 through QEMU's tools
    crypto          section encryption and key sources
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["Image", "SectionSpec", "Binding", "NvmgrError", "__version__"]

# Neither typing nor logging here: the ``nvmgr`` command's client imports this
# package first, and both cost more than its whole call (nvmgr.errors gives the
# "nvmgr" logger its NullHandler).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from nvmgr.errors import NvmgrError
    from nvmgr.format.layout import SectionSpec
    from nvmgr.format.model import Binding
    from nvmgr.image.image import Image


def __getattr__(name: str) -> Any:
    """Load the public names on first use: the hook and the CLI start faster."""
    if name == "Image":
        from nvmgr.image.image import Image

        return Image
    if name == "SectionSpec":
        from nvmgr.format.layout import SectionSpec

        return SectionSpec
    if name == "Binding":
        from nvmgr.format.model import Binding

        return Binding
    if name == "NvmgrError":
        from nvmgr.errors import NvmgrError

        return NvmgrError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
