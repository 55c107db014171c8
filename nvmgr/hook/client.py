"""The hook front end's Python half: hand the call to the hook server, or run it here.

The sh front end (``nvmgr/data/hook-qemu``, installed by ``nvmgr install-hook``)
runs this file as a script -- not as a module, so that nothing of nvmgr is
imported when the hook server (:mod:`nvmgr.hook.server`) takes the call::

    PYTHON -I -S client.py NVMGR_PATH SOCKET NAME OP SUBOP EXTRA < domain.xml

It sends the call (argv, the XML, its stdout and stderr) to the server at
SOCKET; the server's worker runs it and writes into the same stdout and stderr
libvirtd reads.  With no server listening, or when the server answers
``fallback`` (other namespaces, another installation, code changed since it
started), it runs :func:`nvmgr.hook.entry.main` itself with NVMGR_PATH in
front of ``sys.path``: the server only ever saves time, it is never needed.

Only built-in modules here (``_socket``, ``_struct``): Python's ``socket``
module alone takes longer to import than the call it would send.
"""

import _socket
import _struct
import io
import os
import sys

#: ``nvmgr.errors.ExitCode.ERROR`` (not imported: see above; a test holds the two equal).
EXIT_ERROR = 1


def ask_server(sock_path: str, pkg: str, argv: list[str], xml: bytes) -> int | None:
    """The exit code of the call run by the server, or None when it did not run it."""
    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        try:
            s.connect(sock_path)
        except OSError:
            return None  # no server (no socket, nobody listening)
        meta = "\0".join([pkg, *argv]).encode("utf-8", "surrogateescape")
        fds = _struct.pack("2i", sys.stdout.fileno(), sys.stderr.fileno())
        try:
            s.sendmsg([_struct.pack("!4sII", b"NVH1", len(meta), len(xml)) + meta],
                      [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            s.sendall(xml)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            reply = b""
        if reply.startswith(b"+"):  # a worker took it: only its exit code counts now
            words = reply[1:].split()
            if len(words) == 2 and words[0] == b"rc" and words[1].isdigit():
                return int(words[1])
            sys.stderr.write(f"nvmgr: domain {argv[1] if len(argv) > 1 else '?'}: the hook "
                             f"server's worker died during {' '.join(argv[2:4])}\n")
            return EXIT_ERROR
        return None  # "fallback ...", or the server went away before taking the call
    finally:
        s.close()


def run_here(nvmgr_path: str, argv: list[str], xml: bytes) -> int:
    if nvmgr_path:
        sys.path[:0] = nvmgr_path.split(":")
    from nvmgr.hook.entry import main

    return main(argv, io.BytesIO(xml), sys.stdout, sys.stderr)


def main(args: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # python without -I puts this directory first: never import from it
    nvmgr_path, sock_path, argv = args[0], args[1], ["qemu", *args[2:]]
    xml = sys.stdin.buffer.read()
    pkg = os.path.dirname(here)
    rc = ask_server(sock_path, pkg, argv, xml) if sock_path else None
    if rc is None:
        sys.stdout.flush()
        rc = run_here(nvmgr_path, argv, xml)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
