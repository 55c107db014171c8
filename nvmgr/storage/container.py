"""Compatibility names: the storage API as it was imported before the split
into :mod:`~nvmgr.storage.base`, :mod:`~nvmgr.storage.raw` and
:mod:`~nvmgr.storage.formats`.  New code imports from those (or from
:mod:`nvmgr.storage`); nothing inside ``nvmgr.storage`` imports this module.
"""

from nvmgr.storage.base import Container, FaultHook, lock_file, qemu_holds_write
from nvmgr.storage.formats import FORMATS, create_container, open_container, probe_format
from nvmgr.storage.qcow2 import MAGIC as QCOW2_MAGIC
from nvmgr.storage.raw import RawContainer

__all__ = [
    "FORMATS",
    "QCOW2_MAGIC",
    "Container",
    "FaultHook",
    "RawContainer",
    "create_container",
    "lock_file",
    "open_container",
    "probe_format",
    "qemu_holds_write",
]
