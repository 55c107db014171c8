"""QCOW2 containers, through QEMU's own qcow2 code.

:class:`Qcow2Container` never parses qcow2 itself: a private
``qemu-storage-daemon`` opens the image (``file`` node + ``qcow2`` node) and
exports it as one regular file through FUSE (:class:`nvmgr.storage.fuse.FuseExport`);
nvmgr then reads, writes, fsyncs and truncates that file with the very same
code as a raw image (:class:`nvmgr.storage.raw.PosixFile`).  Every write,
flush and allocation is therefore done by QEMU exactly as a VM would do it:
fsync on the exported file is QEMU's ``blk_flush`` (qcow2 metadata written,
the image file fdatasync'ed), ftruncate is ``blk_truncate``.

The daemon is nvmgr's child, holds nvmgr's flock'd fd of the image, and gets
SIGTERM (a clean shutdown) when nvmgr dies (:func:`nvmgr.storage.qemu.start_storage_daemon`);
:meth:`Qcow2Container.close` stops and reaps it.  A daemon killed by SIGKILL
leaves a dead mount, which ``close`` (or, if nvmgr died too, the next
export's sweep) detaches.

Locking, in order:

1. ``flock`` on an fd of the image (:func:`nvmgr.storage.base.open_locked`):
   shared for readers, exclusive for writers, against other nvmgr processes.
2. QEMU's own OFD byte-range image locks, taken by the daemon: a writable open
   fails while a running VM holds the image, and is reported as
   :class:`BusyError`.  Read-only opens use ``force-share=on`` so they can
   read an image that a running VM has open.

The offline snapshot functions (:func:`snapshot_create`, :func:`snapshot_list`,
:func:`snapshot_apply`, :func:`snapshot_delete`) use ``qemu-img snapshot``
and require that neither nvmgr nor QEMU has the image open.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from nvmgr.errors import ExternalError, NoSpaceError, NotFoundError, UsageError
from nvmgr.storage import qemu
from nvmgr.storage.base import Container, Piece, create_exclusive, open_locked, read_head
from nvmgr.storage.fuse import FuseExport, set_readahead
from nvmgr.storage.raw import PosixFile, check_io

MAGIC = b"QFI\xfb"

#: qcow2 virtual sizes are whole 512-byte sectors.
SECTOR = 512

MAX_SNAPSHOT_NAME = 64


def _json_target(path: str) -> str:
    """A ``json:`` filename pinning the qcow2 driver, for commands without ``-f``.

    ``qemu-img snapshot`` has no ``-f``; this keeps QEMU from probing the format
    and from opening any backing file named in the image.
    """
    spec = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": os.path.abspath(path)},
    }
    return "json:" + json.dumps(spec)


def _check_size(size: int, path: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UsageError(f"bad image size {size!r}", image=path)
    if size % SECTOR:
        raise UsageError(
            f"a qcow2 image size must be a multiple of {SECTOR} bytes, not {size}", image=path
        )


class Qcow2Container(Container):
    """A qcow2 image read and written through a private ``qemu-storage-daemon``.

    :param path: the image file.
    :param writable: open for writing (exclusive flock, writable export).
    :param wait: seconds to wait for another nvmgr process to release the
        image (0: fail at once).
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* cannot be opened or is not a qcow2 image.
    :raise CorruptError: QEMU's qcow2 driver refuses the file.
    :raise BusyError: another nvmgr holds the image (past *wait*), or a running
        QEMU holds it with a conflicting lock.
    :raise ExternalError: ``qemu-storage-daemon`` failed to start or serve.
    """

    fmt = "qcow2"

    @staticmethod
    def probe(head: bytes) -> bool:
        """True when *head* starts with QCOW2's magic."""
        return head[: len(MAGIC)] == MAGIC

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self._init_state(path, writable)
        try:
            self._lock_fd = open_locked(path, writable=writable, wait=wait)
            self._open_locked()
        except BaseException:
            self.close()
            raise

    def _init_state(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._abs = os.path.abspath(path)
        self._lock_fd = -1
        self._export: FuseExport | None = None
        self._file: PosixFile | None = None
        self._size = 0

    def _open_locked(self) -> None:
        """Check the magic, start the export, open its file; the flock is held."""
        if not self.probe(os.pread(self._lock_fd, len(MAGIC), 0)):
            raise UsageError(f"{self.path} is not a qcow2 image", image=self.path)
        self._export = FuseExport(
            self._abs,
            driver="qcow2",
            writable=self.writable,
            pass_fds=(self._lock_fd,),
            image=self.path,
        )
        self._open_export(self._export)

    def _open_export(self, export: FuseExport) -> None:
        """Open the export's file (the daemon is up): the one I/O path of raw files."""
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC
        with self._io("open"):
            self._file = PosixFile(os.open(export.mountpoint, flags), self.path)
            st = os.fstat(self._file.fd)
        self._size = st.st_size
        if set_readahead(st.st_dev):
            # An open file keeps the read-ahead its device had at open():
            # POSIX_FADV_NORMAL takes the device's new one.
            os.posix_fadvise(self._file.fd, 0, 0, os.POSIX_FADV_NORMAL)

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> Qcow2Container:
        """Create a new qcow2 image of *size* bytes (mode 0600) and open it writable.

        The name is reserved with ``O_CREAT|O_EXCL`` (mode 0600) and locked before
        ``qemu-img create`` formats it, so no other process can slip in.

        :param path: the new image; must not exist.
        :param size: virtual size in bytes, a multiple of 512.
        :param wait: unused (the new file is locked at once); kept for symmetry.
        :raise UsageError: *path* exists, or *size* is not a multiple of 512.
        :raise ExternalError: ``qemu-img create`` or the daemon failed.
        """
        del wait  # nobody else can hold a file this call just created
        _check_size(size, path)
        fd = create_exclusive(path)
        self = cls.__new__(cls)
        self._init_state(path, True)
        self._lock_fd = fd
        try:
            qemu.img_create(path, "qcow2", size, options=["preallocation=off"])
            self._open_locked()
        except BaseException:
            # The file is ours (O_EXCL): remove it while still holding the lock.
            self._stop()
            with contextlib.suppress(OSError):
                os.unlink(path)
            self.close()
            raise
        return self

    # -- the export ----------------------------------------------------------

    @property
    def start_latency(self) -> float:
        """Seconds from starting the daemon to a mounted export."""
        return self._export.start_latency if self._export is not None else 0.0

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the daemon serving this container (None once closed)."""
        return self._export.pid if self._export is not None else None

    def _stop(self) -> None:
        """Close the exported file (QEMU flushes), stop the daemon, remove the mountpoint."""
        f, self._file = self._file, None
        export, self._export = self._export, None
        try:
            if f is not None:
                with contextlib.suppress(OSError):  # ENOTCONN: the daemon died
                    f.close()
        finally:
            if export is not None:
                export.close()

    def _opened(self) -> PosixFile:
        if self._file is None:
            raise UsageError(f"{self.path} is closed", image=self.path)
        return self._file

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """OSError from the exported file as ExternalError, with the daemon's fate."""
        try:
            yield
        except OSError as e:
            status = self._export.exit_status() if self._export is not None else None
            died = (
                f" ({qemu.QEMU_STORAGE_DAEMON} exited with status {status})"
                if status is not None
                else ""
            )
            raise ExternalError(
                f"{what} through {qemu.QEMU_STORAGE_DAEMON} failed: {e.strerror or e}{died}",
                image=self.path,
            ) from e

    # -- Container -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read *length* bytes at *offset*; past the end reads as zeros (as raw).

        :raise UsageError: negative offset or length, or the container is closed.
        :raise ExternalError: the daemon failed the read.
        """
        f = self._opened()
        check_io(self, offset, length, write=False)
        with self._io("read"):
            return f.read(offset, length)

    def pieces(self, offset: int, length: int, piece: int, *,
               reuse: bool = False) -> Iterator[Piece]:
        """As :meth:`Container.pieces`; with *reuse*, into one buffer (:meth:`PosixFile.pieces`)."""
        if not reuse:
            yield from super().pieces(offset, length, piece)
            return
        f = self._opened()
        check_io(self, offset, length, write=False)
        with self._io("read"):
            yield from f.pieces(offset, length, piece)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write *data* at *offset* (calls the fault hook first).

        :raise UsageError: read-only container, negative offset, or closed.
        :raise NoSpaceError: the write ends past the image's size (qcow2 does
            not grow on write; :meth:`resize` first).
        :raise ExternalError: the daemon failed the write.
        """
        n = memoryview(data).nbytes
        self._fault("write", offset, n)
        f = self._opened()
        check_io(self, offset, n, write=True)
        if offset + n > self._size:
            raise NoSpaceError(
                f"write of {n} bytes at {offset} ends past the image's {self._size} bytes",
                image=self.path,
            )
        with self._io("write"):
            f.write(offset, data)

    def flush(self) -> None:
        """Make all writes durable: fsync, i.e. qcow2 metadata and data flushed by QEMU.

        :raise ExternalError: the daemon failed the flush.
        """
        self._fault("flush", 0, 0)
        f = self._opened()
        if self.writable:
            with self._io("flush"):
                f.sync()

    def size(self) -> int:
        """The image's virtual (guest-visible) size in bytes."""
        self._opened()
        return self._size

    def resize(self, size: int) -> None:
        """Grow the image to *size* bytes (flushed); new space reads as zeros.

        ftruncate on the exported file: QEMU grows the qcow2 image in place.

        :param size: the new virtual size, a multiple of 512, not smaller.
        :raise UsageError: read-only, shrinking, or a bad size.
        :raise ExternalError: the daemon failed the resize.
        """
        f = self._opened()
        if not self.writable:
            raise UsageError(f"{self.path} is open read-only", image=self.path)
        _check_size(size, self.path)
        if size < self._size:
            raise UsageError(
                f"cannot shrink a qcow2 image ({self._size} -> {size} bytes)", image=self.path
            )
        self._fault("write", size, 0)
        if size == self._size:
            return
        with self._io("resize"):
            f.truncate(size)
            f.sync()
            now = f.size()
        if now != size:
            raise ExternalError(
                f"resize to {size} bytes left the image at {now} bytes", image=self.path
            )
        self._size = size

    def close(self) -> None:
        """Close the file, stop the daemon (waiting for it), release the flock.

        Idempotent; safe on a half-initialised container.
        """
        try:
            self._stop()
        finally:
            fd, self._lock_fd = self._lock_fd, -1
            if fd >= 0:
                os.close(fd)  # releases the flock, after the daemon is gone

    def __enter__(self) -> Qcow2Container:
        return self

    def __del__(self) -> None:
        # Last resort against a leaked daemon when close() was never called.
        with contextlib.suppress(Exception):
            if getattr(self, "_export", None) is not None or getattr(self, "_lock_fd", -1) >= 0:
                self.close()


# -- offline tools -------------------------------------------------------------


def qemu_img_info(path: str, *, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of *path*, with ``-U`` (force-share).

    Works while a VM has the image open (the result may then be slightly stale).

    :param path: the image.
    :param fmt: ``raw`` or ``qcow2``; probed from the magic when None (never by QEMU).
    :raise NotFoundError: *path* does not exist.
    :raise ExternalError: ``qemu-img`` failed or printed no JSON object.
    """
    if fmt is None:
        fmt = "qcow2" if Qcow2Container.probe(read_head(path, len(MAGIC))) else "raw"
    if not os.path.exists(path):
        raise NotFoundError(f"no such image: {path}", image=path)
    return qemu.img_info(path, fmt)


def check_snapshot_name(name: str) -> None:
    """Validate a snapshot name: 1-64 printable characters, not starting with ``-``.

    :raise UsageError: the name is not acceptable.
    """
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_SNAPSHOT_NAME
        or not name.isprintable()
        or name.startswith("-")
        or name != name.strip()
    ):
        raise UsageError(
            f"bad snapshot name {name!r}: 1-{MAX_SNAPSHOT_NAME} printable characters, "
            "no leading '-' or surrounding spaces"
        )


@contextlib.contextmanager
def _offline(path: str, exclusive: bool, wait: float) -> Iterator[None]:
    """Hold nvmgr's flock on the qcow2 image *path* while qemu-img works on it."""
    if not Qcow2Container.probe(read_head(path, len(MAGIC))):
        raise UsageError(f"{path} is not a qcow2 image (snapshots need qcow2)", image=path)
    fd = open_locked(path, writable=False, wait=wait, exclusive=exclusive)
    try:
        yield
    finally:
        os.close(fd)


def snapshot_list(path: str, *, wait: float = 0) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 image, oldest first.

    Each entry is QEMU's own record: ``id``, ``name``, ``vm-state-size``,
    ``date-sec``, ``date-nsec``, ``vm-clock-sec``, ``vm-clock-nsec`` (and
    ``icount`` on newer QEMU).

    :param path: the image.
    :param wait: seconds to wait for an nvmgr writer to release the image.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: not a qcow2 image.
    :raise BusyError: an nvmgr writer holds the image.
    :raise ExternalError: ``qemu-img`` failed.
    """
    with _offline(path, False, wait):
        snaps = qemu.img_info(path, "qcow2").get("snapshots", [])
    if not isinstance(snaps, list):
        raise ExternalError("qemu-img info: 'snapshots' is not a list", image=path)
    return [s for s in snaps if isinstance(s, dict)]


def _snapshots(path: str) -> list[dict[str, Any]]:
    snaps = qemu.img_info(path, "qcow2").get("snapshots", [])
    return [s for s in snaps if isinstance(s, dict)] if isinstance(snaps, list) else []


def _snapshot_id(path: str, name: str) -> str:
    """The id of the one snapshot called *name*.

    QEMU allows several snapshots of one name, and ``qemu-img snapshot -a``
    looks its argument up as an *id* before trying names; resolving the name
    here (and refusing duplicates) makes every operation hit exactly one
    snapshot.

    :raise NotFoundError: no snapshot has that name.
    :raise UsageError: several snapshots have that name.
    """
    matches = [s for s in _snapshots(path) if s.get("name") == name]
    if not matches:
        raise NotFoundError(f"no snapshot named {name!r}", image=path)
    if len(matches) > 1:
        ids = ", ".join(str(s.get("id")) for s in matches)
        raise UsageError(f"{len(matches)} snapshots are named {name!r} (ids {ids})", image=path)
    return str(matches[0]["id"])


def snapshot_create(path: str, name: str, *, wait: float = 0) -> None:
    """Take an internal snapshot called *name* of an image nobody has open.

    :param path: the qcow2 image.
    :param name: the new snapshot's name (see :func:`check_snapshot_name`).
    :param wait: seconds to wait for another nvmgr process to release the image.
    :raise UsageError: bad name, a snapshot of that name exists, not qcow2.
    :raise NotFoundError: *path* does not exist.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    check_snapshot_name(name)
    with _offline(path, True, wait):
        if any(s.get("name") == name for s in _snapshots(path)):
            raise UsageError(f"a snapshot named {name!r} already exists", image=path)
        qemu.qemu_img(
            ["snapshot", "-q", "-c", name, _json_target(path)],
            f"qemu-img snapshot -c {name!r}",
            image=path,
        )


def snapshot_apply(path: str, name: str, *, wait: float = 0) -> None:
    """Revert an image nobody has open to its snapshot *name*.

    :raise UsageError: bad name, the name is ambiguous, not qcow2.
    :raise NotFoundError: no such image or snapshot.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    _snapshot_op(path, name, "-a", wait)


def snapshot_delete(path: str, name: str, *, wait: float = 0) -> None:
    """Delete the snapshot *name* of an image nobody has open.

    :raise UsageError: bad name, the name is ambiguous, not qcow2.
    :raise NotFoundError: no such image or snapshot.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    _snapshot_op(path, name, "-d", wait)


def _snapshot_op(path: str, name: str, op: str, wait: float) -> None:
    check_snapshot_name(name)
    with _offline(path, True, wait):
        sid = _snapshot_id(path, name)
        # qemu-img 7.2 looks "-a ARG" up as an id first, then as a name, but
        # "-d ARG" as a name only: give each the key it matches exactly.
        arg = sid if op == "-a" else name
        qemu.qemu_img(
            ["snapshot", "-q", op, arg, _json_target(path)],
            f"qemu-img snapshot {op} {name!r}",
            image=path,
        )
