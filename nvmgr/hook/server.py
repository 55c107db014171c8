"""The hook server: nvmgr's hook with its imports already done.

libvirtd waits for every hook call, and most of a call's time used to be
Python importing nvmgr, lxml and cryptography (about 200 ms, twice per start
and stop; the work itself takes about 10 ms).  ``nvmgr hook-server`` imports
all of it once and listens on a unix socket (:data:`nvmgr.paths.HOOK_SOCKET`,
root only).  The hook front end's Python half (:mod:`nvmgr.hook.client`)
sends it the call -- argv, the domain XML and its own stdout and stderr as
file descriptors -- and the server forks a worker per call that runs
:func:`nvmgr.hook.entry.main` exactly as the front end would have, writing
straight into the front end's stdout and stderr.  The socket, the checks
before a call is taken (``fallback`` to the client otherwise) and the fork
are :mod:`nvmgr.forkserver`'s.

Protocol (one call per connection), all integers big-endian::

    client: "NVH1" u32:len(meta) u32:len(xml) meta xml    SCM_RIGHTS [stdout, stderr]
            meta = NUL-joined: the client's nvmgr package directory, argv...
    server: "fallback REASON\\n"     run it yourself; nothing was done
          | "+"                      a worker took the call; then
            "rc N\\n"                its exit code, or EOF: the worker died
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
import sys
import time
from collections.abc import Callable

from nvmgr import forkserver, paths
from nvmgr.domain import metadata
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.plan import plan_for
from nvmgr.domain.qemuargs import wiring_problems
from nvmgr.forkserver import Call
from nvmgr.hook import entry
from nvmgr.provision import staging

MAGIC = b"NVH1"


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
        rc = entry.main(call.fields, io.BytesIO(call.body), out, err)
    finally:
        out.flush()
        err.flush()
    call.elapsed = time.monotonic() - t0
    say(f"{_describe(call)}: exit {rc} in {call.elapsed * 1000:.0f} ms "
        f"(worker {os.getpid()})")
    conn.sendall(b"rc %d\n" % rc)
    return rc


class Server(forkserver.ForkServer):
    """Accept hook calls on *sock_path* and run each in a forked worker."""

    def __init__(self, sock_path: str = paths.HOOK_SOCKET,
                 say: Callable[[str], None] = lambda _line: None) -> None:
        preload()
        super().__init__(sock_path, magic=MAGIC, n_fds=2, describe=_describe, say=say,
                         worker=lambda conn, call: _run_worker(conn, call, say))


def _describe(call: Call) -> str:
    return " ".join(call.fields[1:4])
