"""The container formats nvmgr knows, listed once.

Each format is a :class:`~nvmgr.storage.base.Container` class with a
``fmt`` name, a ``probe(head)`` that recognises the first bytes of a file of
that format, ``create(path, size)`` and an opening constructor.  Probing asks
each format in :data:`REGISTRY` order; ``raw`` comes last and takes anything.
"""

from __future__ import annotations

import os
from typing import Protocol

from nvmgr.errors import UsageError
from nvmgr.storage.base import Container, read_head
from nvmgr.storage.nbd import NbdContainer, is_nbd, nbd_exists
from nvmgr.storage.qcow2 import Qcow2Container
from nvmgr.storage.raw import RawContainer
from nvmgr.storage.rbd import RbdContainer, is_rbd, rbd_exists


class Format(Protocol):
    """What the registry needs of a container class."""

    fmt: str

    @staticmethod
    def probe(head: bytes) -> bool: ...

    def __call__(self, path: str, *, writable: bool = ..., wait: float = ...) -> Container: ...

    def create(self, path: str, size: int, *, wait: float = ...) -> Container: ...


#: Probe order: the most specific first, raw (anything) last.
REGISTRY: tuple[Format, ...] = (Qcow2Container, RawContainer)

#: The format names, for argument parsers and messages: ("raw", "qcow2").
FORMATS: tuple[str, ...] = tuple(sorted((f.fmt for f in REGISTRY), key=lambda n: n != "raw"))

#: Bytes of a file's head the probes look at.
PROBE_BYTES = 512


def format_named(fmt: str) -> Format:
    """The format called *fmt*.

    :raise UsageError: no such format.
    """
    for f in REGISTRY:
        if f.fmt == fmt:
            return f
    raise UsageError(f"unknown image format {fmt!r} (one of: {', '.join(FORMATS)})")


def probe_format(path: str) -> str:
    """The format of the existing file *path*, from its first bytes (never by QEMU).

    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* is a directory or cannot be read.
    """
    if is_rbd(path):  # a location, not a file: RBD images hold the layout raw
        return RbdContainer.fmt
    if is_nbd(path):  # an NBD export likewise
        return NbdContainer.fmt
    head = read_head(path, PROBE_BYTES)
    for f in REGISTRY:
        if f.probe(head):
            return f.fmt
    return "raw"


def is_location(name: str) -> bool:
    """A network location (``rbd:``, ``nbd://``, ``nbd+unix://``), not a file name."""
    return is_rbd(name) or is_nbd(name)


def absolute(location: str) -> str:
    """A file name made absolute; a network location as it is."""
    return location if is_location(location) else os.path.abspath(location)


def image_exists(location: str) -> bool:
    """Whether the image file, the RBD image or the NBD export exists.

    :raise ExternalError: the cluster or server cannot be asked (a network location).
    """
    if is_nbd(location):
        return nbd_exists(location)
    if not is_rbd(location):
        return os.path.exists(location)
    return rbd_exists(location)


def open_container(
    path: str, *, writable: bool = False, wait: float = 0, fmt: str | None = None
) -> Container:
    """Open an existing image in its own format (probed when *fmt* is None);
    an ``rbd:`` location opens its RBD image, an NBD URI its export."""
    if is_rbd(path):
        return RbdContainer(path, writable=writable, wait=wait)
    if is_nbd(path):
        return NbdContainer(path, writable=writable, wait=wait)
    return format_named(fmt or probe_format(path))(path, writable=writable, wait=wait)


def create_container(path: str, fmt: str, size: int, *, wait: float = 0) -> Container:
    """Create a new, zero-filled image of *size* bytes and open it for writing."""
    if is_rbd(path):
        if fmt not in ("raw", RbdContainer.fmt):
            raise UsageError(f"an RBD image holds nvmgr's layout raw, not as {fmt}", image=path)
        return RbdContainer.create(path, size, wait=wait)
    if is_nbd(path):
        return NbdContainer.create(path, size, wait=wait)
    return format_named(fmt).create(path, size, wait=wait)
