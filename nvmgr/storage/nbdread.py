"""Reads of a private ``qemu-storage-daemon``'s NBD export, with requests in flight.

QEMU 7.2's FUSE export serves one request at a time: a 64 MiB section read
through it is 64 reads of 1 MiB, each waiting for the storage in turn (for an
RBD image, an OSD round trip).  QEMU's NBD server runs each request in its own
coroutine, so several reads of one export reach the storage at once, as
``rbd export`` does with its ten object reads in flight.  A network image's
daemon (:class:`nvmgr.storage.fuse.FuseExport` with ``nbd=True``) therefore
also exports its format node read-only over NBD on a unix socket next to its
mountpoint, and large reads go through :class:`NbdReader`; everything else
(small reads, writes, flushes, resizes) stays on the FUSE file.

This is the client side of the NBD protocol's smallest useful subset
(``doc/proto.md`` of the NBD project): the fixed newstyle handshake,
``NBD_OPT_GO`` for the export, ``NBD_CMD_READ`` with simple replies, and
``NBD_CMD_DISC``.  Structured replies are never asked for, so every reply is
a 16-byte header followed, when its error is 0, by exactly the bytes asked for.
Replies may come in any order; their handles tell them apart.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

from nvmgr.errors import ExternalError

_NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698

_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_REP_ERROR = 1 << 31
_INFO_EXPORT = 0
_CMD_READ = 0
_CMD_DISC = 2

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, handle

#: Requests one reader keeps in flight.  By hand on this machine kind (a 64 MiB
#: read of an RBD image of a single-node cluster, 5 rounds): FUSE 692 ms; NBD with
#: one 4 MiB request at a time 289 ms, four 192, eight 189, sixteen of 1 MiB 168.
DEPTH = 8

#: The pieces of a read with reused buffers (:meth:`NbdReader.pieces`): ``DEPTH``
#: of them are touched, so smaller ones cost less fresh memory; requests of 1 MiB
#: read as fast as 4 MiB ones here.
REUSE_PIECE = 1 << 20

#: NBD's error numbers (they are not the host's errno values).
_NBD_ERRORS = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
               75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}


class _Broken(Exception):
    """The connection ended or spoke something else than NBD."""


class NbdReader:
    """One connection to an NBD export, for reads with several requests in flight.

    :param socket_path: the server's unix socket.
    :param export: the export's name.
    :param image: the image's name in errors.
    :raise ExternalError: no server answers there, or it refuses the export.
    """

    def __init__(self, socket_path: str, export: str, *, image: str) -> None:
        self.image = image
        self.size = 0
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(socket_path)
            self._handshake(export)
        except (OSError, _Broken) as e:
            self.close()
            raise self._error("connecting to", e) from e

    def _error(self, what: str, e: BaseException) -> ExternalError:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return ExternalError(f"{what} the storage daemon's NBD export failed: {why}",
                             image=self.image)

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise _Broken("the connection is closed")
        return self._sock

    def _recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_into(self, view: memoryview) -> None:
        sock = self._live()
        got = 0
        while got < len(view):
            k = sock.recv_into(view[got:])
            if k == 0:
                raise _Broken("the server closed the connection")
            got += k

    def _handshake(self, export: str) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != _NBDMAGIC or opt != _IHAVEOPT:
            raise _Broken("not a newstyle NBD server")
        self._live().sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._live().sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        while True:
            magic, _opt, kind, length = struct.unpack(">QIII", self._recv(20))
            if magic != _OPT_REPLY_MAGIC:
                raise _Broken("bad option reply")
            body = bytes(self._recv(length))
            if kind & _REP_ERROR:
                text = body.decode("utf-8", "replace") or f"error {kind & ~_REP_ERROR}"
                raise _Broken(f"export {export!r} refused: {text}")
            if kind == _REP_INFO and len(body) >= 12 and body[:2] == b"\0\0":  # INFO_EXPORT
                self.size = struct.unpack(">Q", body[2:10])[0]
            elif kind == _REP_ACK:
                return

    def pieces(self, offset: int, length: int, piece: int, depth: int = DEPTH, *,
               reuse: bool = False) -> Iterator[bytearray | memoryview]:
        """The *length* bytes at *offset* in order, in pieces of *piece* bytes (the
        last may be shorter), with up to *depth* read requests in flight.

        With *reuse*, the pieces are views of *depth* buffers used in turn:
        each is valid until the next piece is asked for.  Fresh memory costs more
        than the copy here (the first touch of a page: ~1 ms per MiB measured on
        this machine kind, a third of a 64 MiB read); a few buffers touched again
        and again cost it once.

        A caller that stops early closes the connection (replies are still on
        their way); the reader cannot be used after that.

        :raise ExternalError: the range is outside the export, or a read failed.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ExternalError(f"read of {length} bytes at {offset} is outside the "
                                f"{self.size}-byte export", image=self.image)
        reqs = [(off, min(piece, offset + length - off))
                for off in range(offset, offset + length, piece)]
        pool = [bytearray(min(piece, length)) for _ in range(depth)] if reuse else []
        done: dict[int, bytearray | memoryview] = {}
        sent = want = 0
        try:
            while want < len(reqs):
                # Request *sent* takes pool buffer sent % depth: the one of request
                # sent - depth, before *want* (fewer than *depth* are out), so its
                # piece was handed out and the caller has asked for the next.
                while sent < len(reqs) and sent - want < depth:
                    self._send(_CMD_READ, sent, *reqs[sent])
                    sent += 1
                magic, err, handle = _REPLY.unpack(self._recv(_REPLY.size))
                if magic != _SIMPLE_REPLY_MAGIC or not want <= handle < sent or handle in done:
                    raise _Broken("bad reply")
                if err:  # NBD's numbers are Linux's for the errors it has
                    raise _Broken(f"the server answered {_NBD_ERRORS.get(err, err)} "
                                  f"({os.strerror(err)})")
                n = reqs[handle][1]
                if reuse:
                    view = memoryview(pool[handle % depth])[:n]
                    self._recv_into(view)
                    done[handle] = view
                else:
                    done[handle] = self._recv(n)
                while want in done:
                    yield done.pop(want)
                    want += 1
        except (OSError, _Broken) as e:
            self.close()
            raise self._error("a read through", e) from e
        finally:
            if want < sent:  # stopped early: replies would arrive on a reused connection
                self.close()

    def _send(self, kind: int, handle: int, offset: int, length: int) -> None:
        self._live().sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, kind, handle, offset, length))

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Say goodbye (``NBD_CMD_DISC``) and close.  Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        sock.close()
