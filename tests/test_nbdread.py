"""NbdReader: long reads of a storage daemon's NBD export with requests in flight.

Against a real ``qemu-storage-daemon`` (``FuseExport(nbd=True)`` on a raw file)
for what QEMU does, and against a small scripted server for what a real one
rarely does on demand: replies out of order, an error reply, a connection cut
in the middle of a reply.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nvmgr.errors import ExternalError
from nvmgr.storage.fuse import NBD_EXPORT, FuseExport
from nvmgr.storage.nbdread import NbdReader

needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                               reason="needs qemu-storage-daemon")
MiB = 1 << 20


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run / f"nvmgr-fuse-{os.geteuid()}"


@pytest.fixture
def served(tmp_path: Path, runtime: Path) -> Iterator[tuple[FuseExport, bytes]]:
    """A 5 MiB + 1 KiB raw file of random bytes (QEMU sees whole sectors), exported
    read-only with NBD."""
    data = os.urandom(5 * MiB + 1024)
    path = tmp_path / "img.raw"
    path.write_bytes(data)
    export = FuseExport(str(path), driver="raw", writable=False, image=str(path), nbd=True)
    try:
        yield export, data
    finally:
        export.close()


@needs_qsd
@pytest.mark.parametrize(("piece", "depth", "reuse"), [
    (MiB, 8, False), (MiB, 8, True), (64 << 10, 3, True), (3 * MiB, 1, False),
    (4096, 16, True)])
def test_pieces_come_in_order_and_whole(served: tuple[FuseExport, bytes], piece: int,
                                        depth: int, reuse: bool) -> None:
    export, data = served
    reader = export.reader()
    try:
        assert reader.size == len(data)
        for offset, length in [(0, len(data)), (4095, 2 * MiB + 3), (len(data) - 1, 1),
                               (MiB, 0)]:
            got = [bytes(p) for p in reader.pieces(offset, length, piece, depth, reuse=reuse)]
            assert b"".join(got) == data[offset:offset + length]
            assert all(len(p) == piece for p in got[:-1])
            assert len(got) == -(-length // piece)
    finally:
        reader.close()


@needs_qsd
def test_the_socket_sits_next_to_the_mountpoint_and_goes_with_it(
        served: tuple[FuseExport, bytes], runtime: Path) -> None:
    export, _data = served
    assert export.nbd_socket == export.mountpoint + ".nbd"
    assert sorted(p.name for p in runtime.iterdir()) == sorted(
        os.path.basename(export.mountpoint) + s for s in ("", ".lock", ".nbd"))
    export.close()
    assert list(runtime.iterdir()) == []


@needs_qsd
def test_a_read_outside_the_export_is_refused(served: tuple[FuseExport, bytes]) -> None:
    export, data = served
    reader = export.reader()
    with pytest.raises(ExternalError, match=r"outside the \d+-byte export") as e:
        list(reader.pieces(len(data) - 10, 11, MiB))
    assert e.value.image == export.image
    with pytest.raises(ExternalError, match="outside"):
        list(reader.pieces(-1, 2, MiB))
    assert b"".join(reader.pieces(0, 10, 4)) == data[:10]  # still usable
    reader.close()


@needs_qsd
def test_stopping_early_closes_and_a_new_reader_reads_on(
        served: tuple[FuseExport, bytes]) -> None:
    export, data = served
    reader = export.reader()
    gen = reader.pieces(0, len(data), 64 << 10, 8)
    assert next(gen) == data[:64 << 10]
    gen.close()  # seven replies still on their way
    assert reader.closed
    again = export.reader()
    assert b"".join(again.pieces(0, len(data), MiB)) == data
    again.close()


@needs_qsd
def test_a_wrong_export_name_and_no_server_are_named(
        served: tuple[FuseExport, bytes], tmp_path: Path) -> None:
    export, _data = served
    assert export.nbd_socket is not None
    with pytest.raises(ExternalError, match=r"export 'nope' refused") as e:
        NbdReader(export.nbd_socket, "nope", image="vm.nvram")
    assert e.value.image == "vm.nvram"
    with pytest.raises(ExternalError, match="connecting to the storage daemon's NBD export "
                       "failed: No such file or directory"):
        NbdReader(str(tmp_path / "none.sock"), NBD_EXPORT, image="vm.nvram")


# -- a scripted server ---------------------------------------------------------------


Script = Callable[[socket.socket, Callable[[], tuple[int, int, int]]], None]


def _serve(script: Script, data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A one-connection NBD server on one end of a socketpair (the client gets the
    other): the handshake, then *script* with a function that reads the next read
    request ``(handle, offset, length)``; then it reads until the client is gone."""
    a, b = socket.socketpair()

    def request() -> tuple[int, int, int]:
        _m, _f, _t, handle, off, length = struct.unpack(">IHHQQI", _exact(b, 28))
        return handle, off, length

    def run() -> None:
        with b:
            b.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
            _exact(b, 4)
            _magic, _opt, n = struct.unpack(">QII", _exact(b, 16))
            _exact(b, n)
            info = struct.pack(">HQH", 0, len(data), 1)
            b.sendall(struct.pack(">QIII", 0x3E889045565A9, 7, 3, len(info)) + info)
            b.sendall(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0))
            script(b, request)
            b.settimeout(2)
            try:
                while b.recv(1 << 16):
                    pass
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return a, t


def _exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _reader_on(sock: socket.socket) -> NbdReader:
    """An NbdReader speaking over an already connected socket (the handshake runs)."""
    r = NbdReader.__new__(NbdReader)
    r.image = "vm.nvram"
    r.size = 0
    r._sock = sock
    r._handshake("img0")
    return r


def _reply(s: socket.socket, handle: int, data: bytes = b"", err: int = 0) -> None:
    s.sendall(struct.pack(">IIQ", 0x67446698, err, handle) + data)


@pytest.mark.parametrize("reuse", [False, True])
def test_replies_out_of_order_are_put_back_in_order(reuse: bool) -> None:
    """Each window of *depth* requests answered last first: with reused buffers,
    no reply lands in a buffer whose piece is still to be handed out."""
    data = os.urandom(8 * 4096)
    depth = 3

    def backwards(s: socket.socket, request: Callable[[], tuple[int, int, int]]) -> None:
        left = 8
        while left:
            window = [request() for _ in range(min(depth, left))]
            for handle, off, length in reversed(window):
                _reply(s, handle, data[off:off + length])
            left -= len(window)

    sock, t = _serve(backwards, data)
    reader = _reader_on(sock)
    assert reader.size == len(data)
    got = [bytes(p) for p in reader.pieces(0, len(data), 4096, depth=depth, reuse=reuse)]
    assert got == [data[i:i + 4096] for i in range(0, len(data), 4096)]
    reader.close()
    t.join(5)


def test_an_error_reply_is_named_and_closes() -> None:
    data = bytes(8192)

    def eio(s: socket.socket, request: Callable[[], tuple[int, int, int]]) -> None:
        first, second = request(), request()
        _reply(s, first[0], data[:4096])
        _reply(s, second[0], err=5)

    sock, t = _serve(eio, data)
    reader = _reader_on(sock)
    with pytest.raises(ExternalError, match=r"a read through the storage daemon's NBD "
                       r"export failed: the server answered EIO \(Input/output error\)") as e:
        list(reader.pieces(0, 8192, 4096, depth=2))
    assert e.value.image == "vm.nvram"
    assert reader.closed
    t.join(5)


def test_a_connection_cut_in_a_reply_is_named() -> None:
    data = os.urandom(8192)

    def cut(s: socket.socket, request: Callable[[], tuple[int, int, int]]) -> None:
        first, _second = request(), request()
        _reply(s, first[0], data[:100])  # 100 of 4096 bytes, then gone
        s.shutdown(socket.SHUT_RDWR)

    sock, t = _serve(cut, data)
    reader = _reader_on(sock)
    with pytest.raises(ExternalError, match="the server closed the connection"):
        list(reader.pieces(0, 8192, 4096, depth=2))
    t.join(5)


def test_a_reply_to_no_request_is_refused() -> None:
    data = bytes(4096)

    def stray(s: socket.socket, request: Callable[[], tuple[int, int, int]]) -> None:
        request()
        _reply(s, 99, data)

    sock, t = _serve(stray, data)
    reader = _reader_on(sock)
    with pytest.raises(ExternalError, match="bad reply"):
        list(reader.pieces(0, 4096, 4096))
    t.join(5)


@needs_qsd
def test_no_socket_where_its_path_would_be_too_long(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A unix socket's path has 107 bytes at most: under a deeper runtime directory
    the daemon gets no NBD export (the FUSE file serves every read) rather than fail."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    path = tmp_path / "img.raw"
    path.write_bytes(os.urandom(4096))
    export = FuseExport(str(path), driver="raw", writable=False, image=str(path), nbd=True)
    try:
        assert export.nbd_socket is None
        assert Path(export.mountpoint).read_bytes() == path.read_bytes()
        with pytest.raises(ValueError, match="no NBD socket"):
            export.reader()
    finally:
        export.close()
