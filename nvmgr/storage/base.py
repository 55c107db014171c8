"""What every container format shares: the :class:`Container` API, the fault
hook, opening and locking an image file, and QEMU's image-lock probe.

A container reads and writes bytes at offsets of the *guest-visible* image
(the payload QEMU's ``raw`` slices see), flushes, and resizes.  The formats
live in their own modules (:mod:`nvmgr.storage.raw`, :mod:`nvmgr.storage.qcow2`)
and are listed once, in :mod:`nvmgr.storage.formats`.

Locking: every container takes ``flock`` on the image file, shared for
readers and exclusive for writers (``flock`` does not interact with QEMU's
own OFD byte-range locks).  A second writer gets :class:`BusyError` at once,
or waits up to ``wait`` seconds when asked to.  :func:`qemu_holds_write` tells
whether a running QEMU has the file open for writing (QEMU's image locking,
byte 101 of the file: the "write" permission).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable, Iterator

from nvmgr.errors import BusyError, NotFoundError, UsageError

#: A hook for fault injection: called as fault(kind, offset, length) before
#: every write ("write") and flush ("flush"); tests raise from it to simulate a
#: crash at that point.  None in normal operation.
FaultHook = Callable[[str, int, int], None]

#: A piece of a long read (:meth:`Container.pieces`).
Piece = bytes | bytearray | memoryview

#: QEMU's image-locking byte for "some process holds the write permission"
#: (raw-posix: 100 + bit index of BLK_PERM_WRITE).
_QEMU_LOCK_WRITE_BYTE = 101


class Container:
    """Bytes at offsets, durable after :meth:`flush`.  Use as a context manager.

    Every subclass calls :meth:`_fault` before each write, flush and resize
    and never overrides it (``tests/faultrun.py`` patches it here).
    """

    path: str
    fmt: str
    writable: bool
    fault: FaultHook | None = None

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    @property
    def parallel_reads(self) -> bool:
        """Whether :meth:`pieces` keeps several reads in flight (long reads are then
        faster in pieces than in one :meth:`read`)."""
        return False

    def pieces(self, offset: int, length: int, piece: int, *,
               reuse: bool = False) -> Iterator[Piece]:
        """The *length* bytes at *offset*, in order, in pieces of at most *piece*
        bytes: how long reads are made.  Here one :meth:`read` after the other; a
        network image's container keeps several in flight.  With *reuse* the
        caller is done with each piece before it asks for the next, and the
        container may hand out views of the same few buffers.
        """
        del reuse  # every read here is a new bytes object
        for off in range(offset, offset + length, piece):
            yield self.read(off, min(piece, offset + length - off))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def resize(self, size: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def running_holder(self) -> str | None:
        """Who holds the image for a running QEMU, as the storage tells it (QEMU's
        lock on a file, RBD's exclusive lock): a description, or None when nobody
        does or the storage cannot tell (then nvmgr's in-use mark alone counts)."""
        return None

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fault(self, kind: str, offset: int, length: int) -> None:
        if self.fault is not None:
            self.fault(kind, offset, length)


def read_head(path: str, n: int) -> bytes:
    """The first *n* bytes of *path* (fewer if it is shorter), for format probes.

    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* is a directory or cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError as e:
        raise NotFoundError(f"no such image: {path}", image=path) from e
    except IsADirectoryError as e:
        raise UsageError(f"{path} is a directory, not an image", image=path) from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}", image=path) from e


def lock_file(fd: int, path: str, exclusive: bool, wait: float) -> None:
    """flock *fd*; raise :class:`BusyError` if another nvmgr holds it past *wait* s."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise BusyError(
                    "another nvmgr process holds the image"
                    + (f" (waited {wait:g} s)" if wait else " (use --wait SECONDS to wait)"),
                    image=path,
                ) from e
            time.sleep(0.05)


def open_locked(path: str, *, writable: bool, wait: float, exclusive: bool | None = None) -> int:
    """Open the image file *path* and flock it; the one open + lock + errno translation.

    :param writable: open read-write (else read-only).
    :param exclusive: take the exclusive lock (default: when *writable*).
    :return: the file descriptor (close-on-exec), locked.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* is a directory or cannot be opened.
    :raise BusyError: another nvmgr process holds the lock past *wait* seconds.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise NotFoundError(f"no such image: {path}", image=path) from e
    except IsADirectoryError as e:
        raise UsageError(f"{path} is a directory, not an image", image=path) from e
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror or e}", image=path) from e
    try:
        lock_file(fd, path, writable if exclusive is None else exclusive, wait)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_exclusive(path: str) -> int:
    """Create *path* (mode 0600), refusing to overwrite, and lock it exclusively.

    Nobody else can hold a lock on a file this call just created, so the lock
    is taken without waiting.

    :return: the read-write file descriptor (close-on-exec), locked.
    :raise UsageError: *path* exists or cannot be created.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:
        raise UsageError(
            f"{path} already exists (nvmgr never overwrites an image)", image=path
        ) from e
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror or e}", image=path) from e
    try:
        lock_file(fd, path, True, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def qemu_holds_write(path: str) -> bool:
    """True when a running QEMU holds *path* with the write permission."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (Linux x86_64 layout)
        req = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_WRITE_BYTE, 1, 0)
        f_ofd_getlk = getattr(fcntl, "F_OFD_GETLK", 36)
        res = fcntl.fcntl(fd, f_ofd_getlk, req)
        lock_type: int = struct.unpack("hhqqi", res)[0]
        return lock_type != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)
