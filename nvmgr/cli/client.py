"""The ``nvmgr`` command's first step: hand the command line to ``nvmgr cli-server``.

Python's imports of lxml, cryptography and libvirt-python take longer than
most commands' work.  ``nvmgr cli-server`` (:mod:`nvmgr.cli.server`) has them
done; this module sends it the command line -- argv, the environment, the
umask, and as file descriptors the working directory, stdin, stdout and
stderr -- and the server's worker runs the command exactly as this process
would have, reading and writing this process's own stdin, stdout and stderr.
Signals this process gets (^C, SIGTERM, SIGHUP) are passed on to the worker;
its exit code is this process's.

With no server (no socket, nobody listening, ``NVMGR_CLI_SOCKET`` set empty),
for the commands that run until stopped (the servers, ``reconcile --watch``),
or when it hands the call back (another installation, other namespaces, not
root, code changed since it started), :func:`ask_server` returns None and
the command runs here: the server only ever saves time, it is never needed.

Only built-in modules here (``_socket``, ``_struct``, ``_signal``): the
``socket`` and ``signal`` modules alone take longer to import than the call.
"""

import _signal  # type: ignore[import-not-found]  # (no stub; signal imports enum)
import _socket
import _struct
import os
import sys

#: ``nvmgr.paths.CLI_SOCKET`` (not imported: see above; a test holds the two equal).
SOCKET = "/run/nvmgr/cli.sock"
#: The environment variable naming another socket; empty: never ask a server.
SOCKET_ENV = "NVMGR_CLI_SOCKET"
#: ``nvmgr.cli.server.MAGIC``.
MAGIC = b"NVC1"
#: ``nvmgr.errors.ExitCode.ERROR``.
EXIT_ERROR = 1
#: Commands that run for as long as they are let (servers, a watcher): always
#: here, never as a worker of a server that would have to outlive them.
RESIDENT = ("cli-server", "hook-server", "--watch")
#: What the client passes on to the worker.
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)


class _Lines:
    """The server's reply, a line at a time (both lines may come in one read)."""

    def __init__(self, s: _socket.socket) -> None:
        self.s, self.buf = s, b""

    def next(self) -> bytes:
        """The next line with its newline, or what came before EOF (b"" at the end)."""
        while b"\n" not in self.buf:
            chunk = self.s.recv(256)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def ask_server(argv: list[str], sock_path: str | None = None) -> int | None:
    """The exit code of *argv* run by the server, or None when it did not run it."""
    if sock_path is None:
        sock_path = os.environ.get(SOCKET_ENV, SOCKET)
    if not sock_path or any(w in RESIDENT for w in argv):
        return None
    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    cwd = -1
    try:
        try:
            s.connect(sock_path)
            cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None  # no server; or a working directory gone or unreadable
        pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        umask = os.umask(0o022)
        os.umask(umask)
        meta = "\0".join([pkg, format(umask, "o"), *argv]).encode("utf-8", "surrogateescape")
        env = b"\0".join(k + b"=" + v for k, v in os.environb.items())
        reply = _Lines(s)
        try:
            s.sendmsg([_struct.pack("!4sII", MAGIC, len(meta), len(env)) + meta],
                      [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                        _struct.pack("4i", 0, 1, 2, cwd))])
            s.sendall(env)
            took = reply.next()
        except OSError:
            if reply.buf.startswith(b"+"):  # a worker has it: never run it a second time
                return _died(0, argv)
            return None  # stdin, stdout or stderr closed, or the server went away
        if took.startswith(b"+") and took.endswith(b"\n") and took[1:-1].isdigit():
            return _wait(reply, int(took[1:-1]), argv)
        if took.startswith(b"+"):  # taken, but no worker's pid: never run it a second time
            return _died(0, argv)
        return None  # "fallback ...": nothing was done, run it here
    finally:
        s.close()
        if cwd >= 0:
            os.close(cwd)


def _wait(reply: _Lines, pid: int, argv: list[str]) -> int:
    """The worker's exit code; signals passed on to it meanwhile."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    before = {sig: _signal.signal(sig, forward) for sig in FORWARDED}
    try:
        try:
            line = reply.next()
        except OSError:
            line = b""
    finally:
        for sig, handler in before.items():
            _signal.signal(sig, handler)
    words = line.split()
    if len(words) == 2 and words[0] == b"rc" and words[1].isdigit():
        return int(words[1])
    return _died(pid, argv)


def _died(pid: int, argv: list[str]) -> int:
    """A worker took the command and gave no exit code: never run it a second time."""
    who = f"pid {pid}" if pid else "pid unknown"
    sys.stderr.write(f"nvmgr: error: the cli-server's worker ({who}) died while "
                     f"running {argv[0] if argv else 'nvmgr'}; whether it finished is "
                     "unknown\n")
    return EXIT_ERROR
