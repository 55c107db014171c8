"""What the containers named by a network location share (:mod:`~nvmgr.storage.rbd`,
:mod:`~nvmgr.storage.nbd`): the per-host lock file that stands in for an image
file's ``flock``, and the opening of a private ``qemu-storage-daemon`` export.

An image in Ceph RBD or on an NBD server has no local file to ``flock``: nvmgr
writers on one host exclude each other with ``flock`` on a lock file per
location, in a directory of the user's under ``/run/lock``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from nvmgr.storage.base import Piece, lock_file
from nvmgr.storage.nbdread import REUSE_PIECE, NbdReader
from nvmgr.storage.qcow2 import Qcow2Container


def lock_location(directory: str, name: str, *, writable: bool, wait: float,
                  location: str) -> int:
    """flock ``DIRECTORY/NAME.lock`` (created 0600, *directory* 0700): the stand-in
    for the image file's own lock.

    :return: the locked descriptor (close-on-exec).
    :raise BusyError: another nvmgr on this host holds it past *wait* seconds.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, f"{name}.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_file(fd, location, writable, wait)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocationContainer(Qcow2Container):
    """An nvmgr image at a network location, through a private ``qemu-storage-daemon``
    FUSE export of QEMU's driver for it (read and written with the raw-file code).
    A read-only container's daemon also exports the image over NBD on a unix
    socket (``FuseExport(nbd=True)``): :meth:`pieces` of more than one piece go
    there, with several requests in flight (:mod:`nvmgr.storage.nbdread`).  A
    writable one has none: QEMU's NBD export pins the image's size, which a
    writable container may change.

    Subclasses give :meth:`_parse` (the location, or :class:`UsageError`),
    :meth:`_lock` (this host's lock on it) and :meth:`_open_locked` (the export).
    """

    @staticmethod
    def probe(head: bytes) -> bool:
        del head
        return False  # named by its location, never probed

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self.location = self._parse(path)
        self._init_state(path, writable)
        self._abs = path
        try:
            self._lock_fd = self._lock(path, writable=writable, wait=wait)
            self._open_locked()
        except BaseException:
            self.close()
            raise

    _reader: NbdReader | None = None

    @property
    def parallel_reads(self) -> bool:
        return self._export is not None and self._export.nbd_socket is not None

    def pieces(self, offset: int, length: int, piece: int, *,
               reuse: bool = False) -> Iterator[Piece]:
        """As :meth:`Container.pieces`; more than one piece is read over NBD with
        requests in flight (QEMU 7.2's FUSE export serves one at a time), in
        pieces of at most :data:`~nvmgr.storage.nbdread.REUSE_PIECE` with *reuse*."""
        export = self._export
        if length <= piece or export is None or export.nbd_socket is None:
            yield from super().pieces(offset, length, piece, reuse=reuse)
            return
        self._opened()
        if self._reader is None:
            self._reader = export.reader()
        reader = self._reader
        try:
            yield from reader.pieces(offset, length, min(piece, REUSE_PIECE) if reuse else piece,
                                     reuse=reuse)
        finally:
            if reader.closed:  # failed or left early: the next call connects again
                self._reader = None

    def _stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        super()._stop()

    @staticmethod
    def _parse(path: str) -> object:
        raise NotImplementedError

    @classmethod
    def _lock(cls, path: str, *, writable: bool, wait: float) -> int:
        raise NotImplementedError
