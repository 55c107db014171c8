"""Raw containers, and the one I/O path every container format uses.

:class:`PosixFile` reads with ``pread``, writes with ``pwrite`` and makes
writes durable with ``fsync`` on one open file.  :class:`RawContainer` uses
it on the image file itself; :class:`nvmgr.storage.qcow2.Qcow2Container` uses
it on the file that QEMU's FUSE export of the image shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from nvmgr.errors import NoSpaceError, UsageError
from nvmgr.storage.base import Container, Piece, create_exclusive, open_locked, qemu_holds_write


class PosixFile:
    """pread / pwrite / fsync / ftruncate on one file descriptor, which it owns.

    Reads past the end read as zeros (as in QEMU).  OSError propagates.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

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

    def pieces(self, offset: int, length: int, piece: int) -> Iterator[memoryview]:
        """The *length* bytes at *offset* in pieces of *piece* bytes, each read into
        the same buffer (valid until the next is asked for): fresh memory costs more
        than the read on this machine kind (the first touch of each page), so a
        64 MiB section read this way touches 4 MiB of it.  Past EOF reads as zeros.
        """
        buf = memoryview(bytearray(min(piece, length)))
        for off in range(offset, offset + length, piece):
            view = buf[:min(piece, offset + length - off)]
            got = 0
            while got < len(view):
                n = os.preadv(self.fd, [view[got:]], off + got)
                if n == 0:
                    view[got:] = bytes(len(view) - got)  # past EOF reads as zeros
                    break
                got += n
            yield view

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of *data* at *offset*.

        :raise NoSpaceError: the file took no more bytes (a fixed-size export's end).
        """
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n == 0:
                raise NoSpaceError(
                    f"write of {len(view)} bytes at {offset} stopped after {done} bytes",
                    image=self.path,
                )
            done += n

    def sync(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def check_io(c: Container, offset: int, length: int, *, write: bool) -> None:
    """Refuse negative offsets and lengths, and writes to a read-only container.

    :raise UsageError: the request is not acceptable.
    """
    if offset < 0 or length < 0:
        raise UsageError(
            f"bad {'write' if write else 'read'} of {length} bytes at {offset}", image=c.path
        )
    if write and not c.writable:
        raise UsageError(f"{c.path} is open read-only", image=c.path)


class RawContainer(Container):
    """A raw file read and written with pread/pwrite, made durable with fsync.

    :param path: the image file.
    :param writable: open for writing (exclusive flock; shared otherwise).
    :param wait: seconds to wait for another nvmgr process to release the image.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* cannot be opened.
    :raise BusyError: another nvmgr holds the image past *wait*.
    """

    fmt = "raw"

    @staticmethod
    def probe(head: bytes) -> bool:
        """Any file is a raw image (the registry asks the other formats first)."""
        del head
        return True

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self.path = path
        self.writable = writable
        self._file = PosixFile(open_locked(path, writable=writable, wait=wait), path)

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> RawContainer:
        """Create a sparse raw file of *size* bytes (mode 0600) and open it writable.

        :raise UsageError: *path* exists or cannot be created.
        """
        del wait  # nobody else can hold a file this call just created
        fd = create_exclusive(path)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self = cls.__new__(cls)
        self.path = path
        self.writable = True
        self._file = PosixFile(fd, path)
        return self

    @property
    def fd(self) -> int:
        """The image file's descriptor (-1 once closed)."""
        return self._file.fd

    def read(self, offset: int, length: int) -> bytes:
        check_io(self, offset, length, write=False)
        return self._file.read(offset, length)

    def pieces(self, offset: int, length: int, piece: int, *,
               reuse: bool = False) -> Iterator[Piece]:
        """As :meth:`Container.pieces`; with *reuse*, into one buffer (:meth:`PosixFile.pieces`)."""
        if not reuse:
            yield from super().pieces(offset, length, piece)
            return
        check_io(self, offset, length, write=False)
        yield from self._file.pieces(offset, length, piece)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = memoryview(data).nbytes
        self._fault("write", offset, n)
        check_io(self, offset, n, write=True)
        self._file.write(offset, data)

    def flush(self) -> None:
        self._fault("flush", 0, 0)
        self._file.sync()

    def size(self) -> int:
        return self._file.size()

    def resize(self, size: int) -> None:
        self._fault("write", size, 0)
        check_io(self, size, 0, write=True)
        self._file.truncate(size)
        self._file.sync()

    def close(self) -> None:
        self._file.close()  # releases the flock

    def running_holder(self) -> str | None:
        """QEMU's own image lock on the file: a running QEMU holds the write permission."""
        return "a running QEMU holds the image" if qemu_holds_write(self.path) else None

    def __enter__(self) -> RawContainer:
        return self
