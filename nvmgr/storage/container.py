"""Containers: the file format an nvmgr image lives in.

One small API over every format QEMU can open: :class:`Container` reads and
writes bytes at offsets of the *guest-visible* image (the payload QEMU's
``raw`` slices see), flushes, and resizes.

- :class:`RawContainer`: ``pread``/``pwrite``/``fsync`` on the file itself.
- :class:`nvmgr.storage.qcow2.Qcow2Container`: through a ``qemu-storage-daemon`` NBD
  export on a unix socket, so QEMU's own qcow2 code does every write.

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
from collections.abc import Callable

from nvmgr.errors import BusyError, NotFoundError, UsageError

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")

#: QEMU's image-locking byte for "some process holds the write permission"
#: (raw-posix: 100 + bit index of BLK_PERM_WRITE).
_QEMU_LOCK_WRITE_BYTE = 101

#: A hook for fault injection: called as fault(kind, offset, length) before
#: every write ("write") and flush ("flush"); tests raise from it to simulate a
#: crash at that point.  None in normal operation.
FaultHook = Callable[[str, int, int], None]


class Container:
    """Bytes at offsets, durable after :meth:`flush`.  Use as a context manager."""

    path: str
    fmt: str
    writable: bool
    fault: FaultHook | None = None

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

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

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fault(self, kind: str, offset: int, length: int) -> None:
        if self.fault is not None:
            self.fault(kind, offset, length)


def probe_format(path: str) -> str:
    """``qcow2`` if the file starts with QCOW2's magic, else ``raw``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise NotFoundError(f"no such image: {path}", image=path) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an image", image=path) from None
    return "qcow2" if head == QCOW2_MAGIC else "raw"


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
                ) from None
            time.sleep(0.05)


def qemu_holds_write(path: str) -> bool:
    """True when a running QEMU holds *path* with the write permission."""
    try:
        fd = os.open(path, os.O_RDONLY)
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


class RawContainer(Container):
    """A raw file read and written with pread/pwrite, made durable with fsync."""

    fmt = "raw"

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"no such image: {path}", image=path) from None
        except PermissionError as e:
            raise UsageError(f"cannot open {path}: {e.strerror}", image=path) from None
        try:
            lock_file(self.fd, path, writable, wait)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> RawContainer:
        """Create a sparse raw file of *size* bytes; refuse to overwrite."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"{path} already exists (nvmgr never overwrites an image)") from None
        os.ftruncate(fd, size)
        os.close(fd)
        return cls(path, writable=True, wait=wait)

    def read(self, offset: int, length: int) -> bytes:
        first = os.pread(self.fd, length, offset)
        if len(first) == length:  # the usual case for a regular file: no copies
            return first
        out = bytearray(first)
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        if len(out) < length:
            out += bytes(length - len(out))  # past EOF reads as zeros, as in QEMU
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._fault("write", offset, len(data))
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def flush(self) -> None:
        self._fault("flush", 0, 0)
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def resize(self, size: int) -> None:
        self._fault("write", size, 0)
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


def open_container(
    path: str, *, writable: bool = False, wait: float = 0, fmt: str | None = None
) -> Container:
    """Open an existing image in its own format (probed when *fmt* is None)."""
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        return RawContainer(path, writable=writable, wait=wait)
    if fmt == "qcow2":
        from nvmgr.storage.qcow2 import Qcow2Container

        return Qcow2Container(path, writable=writable, wait=wait)
    raise UsageError(f"unknown image format {fmt!r} (one of: {', '.join(FORMATS)})")


def create_container(path: str, fmt: str, size: int, *, wait: float = 0) -> Container:
    """Create a new, zero-filled image of *size* bytes and open it for writing."""
    if fmt == "raw":
        return RawContainer.create(path, size, wait=wait)
    if fmt == "qcow2":
        from nvmgr.storage.qcow2 import Qcow2Container

        return Qcow2Container.create(path, size, wait=wait)
    raise UsageError(f"unknown image format {fmt!r} (one of: {', '.join(FORMATS)})")
