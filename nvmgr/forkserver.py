"""A resident process that runs calls in forks of itself, its imports done once.

Starting Python and importing nvmgr's dependencies (lxml, cryptography,
libvirt-python) costs more than most of what nvmgr then does.  Both of
nvmgr's entries -- the libvirt hook (:mod:`nvmgr.hook.server`) and the
command line (:mod:`nvmgr.cli.server`) -- can hand their call to a server
that has all of it imported: the server accepts the call on a unix socket
(root only) and forks a worker that runs it, with the caller's own file
descriptors.  Each call runs in a fresh fork of a process that never ran one,
so calls share nothing.  This module is the part both servers share: the
socket, the checks, the fork; what a worker does is the server's own.

A call is refused with ``fallback REASON`` -- the client then runs it itself,
as it would with no server at all -- when the server may not run it for the
caller:

- the caller is not root (or not the server's own user);
- the caller is in other namespaces (mount, UTS, network, PID) than the
  server: a process in a container sees other files under the same paths;
- the caller's nvmgr is another installation than the server's;
- the server's code changed on disk since it started (an upgrade): it then
  leaves once the calls it runs are done, for its service manager to start
  the new code.

Protocol (one call per connection), all integers big-endian::

    client: MAGIC u32:len(meta) u32:len(body) meta body    SCM_RIGHTS [fds...]
            meta = NUL-joined: the client's nvmgr package directory, fields...
    server: "fallback REASON\\n"     run it yourself; nothing was done
          | "+" ...                  a worker took the call; what follows is
                                     the worker's (each server's own protocol)
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import nvmgr

_HEAD = struct.Struct("!4sII")
#: Longest argv + path block and body a call may send (libvirt's own limit for
#: a domain XML is 10 MiB).
MAX_META = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
#: How long a client may take to send its call before the server drops it.
REQUEST_TIMEOUT = 5.0
_NAMESPACES = ("mnt", "uts", "net", "pid")


def package_dir() -> str:
    """The directory of the nvmgr package this process runs (resolved)."""
    return str(Path(nvmgr.__file__).resolve().parent)


def fingerprint() -> dict[str, int]:
    """mtime (ns) of every nvmgr module file this process loaded."""
    out: dict[str, int] = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if (name == "nvmgr" or name.startswith("nvmgr.")) and f:
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
    return out


def fingerprint_changed(before: dict[str, int]) -> bool:
    for f, mtime in before.items():
        try:
            if os.stat(f).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


def namespaces(pid: int | str) -> tuple[str, ...]:
    return tuple(os.readlink(f"/proc/{pid}/ns/{ns}") for ns in _NAMESPACES)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the client closed the connection mid-call")
        buf += chunk
    return bytes(buf)


class Call:
    """One call as received: the caller's package directory, its fields (argv
    and the like), the body, and the file descriptors it passed."""

    def __init__(self, pkg: str, fields: list[str], body: bytes, fds: list[int]) -> None:
        self.pkg, self.fields, self.body, self.fds = pkg, fields, body, fds
        self.elapsed = 0.0

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def read_call(conn: socket.socket, magic: bytes, n_fds: int) -> Call:
    """Read one call from *conn*.

    :raise ValueError: not a call of this server (bad magic, sizes, descriptors).
    :raise EOFError, OSError: the client went away.
    """
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(_HEAD.size,
                                               socket.CMSG_SPACE(n_fds * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    call_fds = list(fds)
    try:
        if len(msg) < _HEAD.size:
            msg += _recv_exact(conn, _HEAD.size - len(msg))
        got, n_meta, n_body = _HEAD.unpack(msg)
        if got != magic:
            raise ValueError(f"not a call for this server (magic {got!r})")
        if n_meta > MAX_META or n_body > MAX_BODY:
            raise ValueError(f"call too large ({n_meta} + {n_body} bytes)")
        if len(call_fds) != n_fds:
            raise ValueError(f"expected {n_fds} file descriptors, got {len(call_fds)}")
        meta = _recv_exact(conn, n_meta).decode("utf-8", "surrogateescape").split("\0")
        body = _recv_exact(conn, n_body)
    except BaseException:
        for fd in call_fds:
            os.close(fd)
        raise
    return Call(meta[0], meta[1:], body, call_fds)


#: What a worker does with its call: reply on the connection, return an exit status.
Worker = Callable[[socket.socket, Call], int]


class ForkServer:
    """Accept calls on *sock_path* and run each with *worker* in a forked process.

    :param magic: the four bytes a call of this server starts with.
    :param n_fds: how many file descriptors each call passes.
    :param describe: a call's words for the server's lines (never a secret).
    """

    def __init__(self, sock_path: str, *, magic: bytes, n_fds: int, worker: Worker,
                 describe: Callable[[Call], str],
                 say: Callable[[str], None] = lambda _line: None) -> None:
        self.sock_path = sock_path
        self.magic, self.n_fds, self.worker, self.describe = magic, n_fds, worker, describe
        self.say = say
        self.stale = False
        self.workers: set[int] = set()
        self.pkg = package_dir()
        self.namespaces = namespaces("self")
        self.fingerprint = fingerprint()
        self.sock = self._listen()

    def _listen(self) -> socket.socket:
        d = os.path.dirname(self.sock_path)
        os.makedirs(d, mode=0o755, exist_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{self.sock_path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket: 0600, root's (libvirtd runs hooks as root)
        try:
            s.bind(tmp)
        finally:
            os.umask(old)
        s.listen(64)
        os.replace(tmp, self.sock_path)  # a client never meets a half-made socket
        self.sock_ino = os.stat(self.sock_path).st_ino
        s.settimeout(1.0)
        return s

    # -- the checks before a call is taken

    def _refusal(self, conn: socket.socket, call: Call) -> str | None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            return f"caller uid {uid} is not root"
        try:
            if namespaces(pid) != self.namespaces:
                return "the caller runs in other namespaces"
        except OSError:
            return "cannot see the caller's namespaces"
        if os.path.realpath(call.pkg) != self.pkg:
            return f"the caller's nvmgr is {call.pkg}, the server's {self.pkg}"
        if fingerprint_changed(self.fingerprint):
            self.stale = True
            return "the server's code changed on disk since it started"
        return None

    # -- the loop

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            self.workers.discard(pid)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            call = read_call(conn, self.magic, self.n_fds)
        except (ValueError, EOFError, OSError) as e:
            self.say(f"dropped a call: {e}")
            return
        try:
            why = self._refusal(conn, call)
            if why is not None:
                conn.sendall(b"fallback " + why.encode("utf-8", "replace") + b"\n")
                self.say(f"{self.describe(call)}: fallback: {why}")
                return
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGHUP, signal.SIG_DFL)
                    self.sock.close()
                    conn.settimeout(None)
                    self.worker(conn, call)
                except BaseException:  # the client sees EOF without rc: the worker died
                    code = 1
                finally:
                    os._exit(code)
            self.workers.add(pid)
        except OSError as e:
            self.say(f"dropped a call: {e}")
        finally:
            call.close()

    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Take calls until *stop* says so (checked every second) or the code goes stale;
        then wait for the workers and remove the socket."""
        try:
            while not (stop() or self.stale):
                self._reap()
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                except InterruptedError:
                    continue
                with conn:
                    self._handle(conn)
        finally:
            self.close()

    def close(self) -> None:
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:  # not a successor's
                os.unlink(self.sock_path)
        except OSError:
            pass
        self.sock.close()
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()
