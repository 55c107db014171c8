"""The hook server: nvmgr's hook with its imports already done.

libvirtd waits for every hook call, and most of a call's time used to be
Python importing nvmgr, lxml and cryptography (about 200 ms, twice per start
and stop; the work itself takes about 10 ms).  ``nvmgr hook-server`` imports
all of it once and listens on a unix socket (:data:`nvmgr.paths.HOOK_SOCKET`,
root only).  The hook front end's Python half (:mod:`nvmgr.hook.client`)
sends it the call -- argv, the domain XML and its own stdout and stderr as
file descriptors -- and the server forks a worker per call that runs
:func:`nvmgr.hook.entry.main` exactly as the front end would have, writing
straight into the front end's stdout and stderr.  Each call runs in a fresh
fork of a process that never ran one, so calls share nothing.

The server answers ``fallback`` -- and the client then runs the call itself,
as it would with no server at all -- when the call is not one it may run for
the caller:

- the caller is in other namespaces (mount, UTS, network, PID) than the
  server: a libvirtd in a container or in the migration test harness sees
  other files under the same paths;
- the caller's nvmgr is another installation than the server's;
- the server's code changed on disk since it started (an upgrade): it then
  leaves once the calls it runs are done, for its service manager to start
  the new code.

Protocol (one call per connection), all integers big-endian::

    client: "NVH1" u32:len(meta) u32:len(xml) meta xml    SCM_RIGHTS [stdout, stderr]
            meta = NUL-joined: the client's nvmgr package directory, argv...
    server: "fallback REASON\\n"     run it yourself; nothing was done
          | "+"                      a worker took the call; then
            "rc N\\n"                its exit code, or EOF: the worker died
"""

from __future__ import annotations

import array
import contextlib
import gc
import io
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nvmgr
from nvmgr import paths
from nvmgr.domain import metadata
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.plan import plan_for
from nvmgr.domain.qemuargs import wiring_problems
from nvmgr.hook import entry
from nvmgr.provision import staging

MAGIC = b"NVH1"
_HEAD = struct.Struct("!4sII")
#: Longest argv + path block and domain XML a call may send (libvirt's own
#: limit for a domain XML is 10 MiB).
MAX_META = 64 * 1024
MAX_XML = 16 * 1024 * 1024
#: How long a client may take to send its call before the server drops it.
REQUEST_TIMEOUT = 5.0
_NAMESPACES = ("mnt", "uts", "net", "pid")


def package_dir() -> str:
    """The directory of the nvmgr package this process runs (resolved)."""
    return str(Path(nvmgr.__file__).resolve().parent)


#: A domain like those nvmgr runs, for :func:`preload` to walk through the code
#: of a call once (its image is never opened).
_WARM_UP = b"""<domain type='qemu'><name>nvmgr-warm-up</name>
<uuid>00000000-0000-4000-8000-000000000000</uuid>
<metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'
  image='/nonexistent/nvmgr-warm-up.nvram' format='raw'/></metadata>
<os><type arch='x86_64' machine='q35'>hvm</type>
<loader readonly='yes' type='pflash' stateless='yes'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>
<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>
</domain>"""


def preload() -> None:
    """Do now what each call would otherwise do first in its worker: compile the
    schema, fill lxml's and ``re``'s caches by parsing and planning a domain."""
    metadata.preload()
    with contextlib.suppress(Exception):  # a warm-up only: the calls check for real
        dom = parse_domain(_WARM_UP)
        staging.Users.from_qemu_conf()
        wiring_problems(dom, plan_for(dom, encrypted=False))
    entry.looks_hostile(_WARM_UP)
    gc.collect()
    gc.freeze()  # what is here now stays out of the workers' collections (no copy-on-write)


def _fingerprint() -> dict[str, int]:
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


def _namespaces(pid: int | str) -> tuple[str, ...]:
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
    """One hook call as received: argv, XML, the caller's stdout and stderr."""

    def __init__(self, pkg: str, argv: list[str], xml: bytes, fds: list[int]) -> None:
        self.pkg, self.argv, self.xml, self.fds = pkg, argv, xml, fds
        self.elapsed = 0.0

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def read_call(conn: socket.socket) -> Call:
    """Read one call from *conn*.

    :raise ValueError: not a hook call (bad magic, sizes, descriptors).
    :raise EOFError, OSError: the client went away.
    """
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(_HEAD.size, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    call_fds = list(fds)
    try:
        if len(msg) < _HEAD.size:
            msg += _recv_exact(conn, _HEAD.size - len(msg))
        magic, n_meta, n_xml = _HEAD.unpack(msg)
        if magic != MAGIC:
            raise ValueError(f"not a hook call (magic {magic!r})")
        if n_meta > MAX_META or n_xml > MAX_XML:
            raise ValueError(f"call too large ({n_meta} + {n_xml} bytes)")
        if len(call_fds) != 2:
            raise ValueError(f"expected stdout and stderr, got {len(call_fds)} descriptor(s)")
        meta = _recv_exact(conn, n_meta).decode("utf-8", "surrogateescape").split("\0")
        xml = _recv_exact(conn, n_xml)
    except BaseException:
        for fd in call_fds:
            os.close(fd)
        raise
    return Call(meta[0], meta[1:], xml, call_fds)


def _run_worker(conn: socket.socket, call: Call, say: Callable[[str], None]) -> int:
    """In the forked worker: run *call* with the caller's stdout and stderr; its line
    goes to *say* before the caller gets the exit code (the log is complete when the
    hook returns)."""
    t0 = time.monotonic()
    os.dup2(call.fds[0], 1)
    os.dup2(call.fds[1], 2)
    call.close()
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                           errors="replace", line_buffering=True)
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                           errors="replace", line_buffering=True)
    sys.stdout, sys.stderr = out, err
    conn.sendall(b"+")
    try:
        rc = entry.main(call.argv, io.BytesIO(call.xml), out, err)
    finally:
        out.flush()
        err.flush()
    call.elapsed = time.monotonic() - t0
    say(f"{' '.join(call.argv[1:4])}: exit {rc} in {call.elapsed * 1000:.0f} ms "
        f"(worker {os.getpid()})")
    conn.sendall(b"rc %d\n" % rc)
    return rc


class Server:
    """Accept calls on *sock_path* and run each in a forked worker."""

    def __init__(self, sock_path: str = paths.HOOK_SOCKET,
                 say: Callable[[str], None] = lambda _line: None) -> None:
        self.sock_path = sock_path
        self.say = say
        self.stopping = False
        self.stale = False
        self.workers: set[int] = set()
        preload()
        self.pkg = package_dir()
        self.namespaces = _namespaces("self")
        self.fingerprint = _fingerprint()
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
            if _namespaces(pid) != self.namespaces:
                return "the caller runs in other namespaces"
        except OSError:
            return "cannot see the caller's namespaces"
        if os.path.realpath(call.pkg) != self.pkg:
            return f"the caller's nvmgr is {call.pkg}, the server's {self.pkg}"
        if _fingerprint_changed(self.fingerprint):
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
            call = read_call(conn)
        except (ValueError, EOFError, OSError) as e:
            self.say(f"dropped a call: {e}")
            return
        try:
            why = self._refusal(conn, call)
            if why is not None:
                conn.sendall(b"fallback " + why.encode("utf-8", "replace") + b"\n")
                self.say(f"{' '.join(call.argv[1:4])}: fallback: {why}")
                return
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    self.sock.close()
                    conn.settimeout(None)
                    _run_worker(conn, call, self.say)
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


def _fingerprint_changed(before: dict[str, int]) -> bool:
    for f, mtime in before.items():
        try:
            if os.stat(f).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False
