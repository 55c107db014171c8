"""The CLI server: the ``nvmgr`` command with its imports already done.

A fresh ``nvmgr`` process spends most of a short command importing lxml,
cryptography and libvirt-python and compiling the metadata schema (about
100-150 ms; ``virsh attach-device`` takes 60).  ``nvmgr cli-server`` does all
of it once and listens on :data:`nvmgr.paths.CLI_SOCKET` (root only); the
command's client half (:mod:`nvmgr.cli.client`) sends it each command line,
and a forked worker runs it with the caller's working directory, umask,
environment, stdin, stdout and stderr.  The socket, the checks before a call
is taken and the fork are :mod:`nvmgr.forkserver`'s.

Protocol (one call per connection), all integers big-endian::

    client: "NVC1" u32:len(meta) u32:len(env) meta env
            SCM_RIGHTS [stdin, stdout, stderr, working directory]
            meta = NUL-joined: the client's nvmgr package directory, umask (octal), argv...
            env  = NUL-joined KEY=VALUE
    server: "fallback REASON\\n"     run it yourself; nothing was done
          | "+PID\\n"                the worker PID took it (signals go there); then
            "rc N\\n"                its exit code, or EOF: the worker died
"""

from __future__ import annotations

import gc
import io
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

import nvmgr.cli
from nvmgr import forkserver, paths
from nvmgr.domain import metadata
from nvmgr.forkserver import Call

# What the commands import when they first need it, imported here once.
from nvmgr.image import convert, handoff, image, members  # noqa: F401
from nvmgr.provision import orphans, prepare, staging, vtpm  # noqa: F401
from nvmgr.storage import fuse, nbd, network, qcow2, qemu, raw, rbd  # noqa: F401
from nvmgr.virt import attach, backup, conn, define, hotplug, inventory, secrets, watch  # noqa: F401

MAGIC = b"NVC1"


def preload() -> None:
    """Import what the commands import on first use (libvirt-python, lxml,
    cryptography: see above), compile the schema and build the parsers: what
    each command would otherwise do first."""
    conn.load_libvirt()
    metadata.preload()
    nvmgr.cli.build_parsers()
    gc.collect()
    gc.freeze()  # what is here now stays out of the workers' collections (no copy-on-write)


def _describe(call: Call) -> str:
    """The command's name only: the rest of a command line is the caller's business."""
    return next((w for w in call.fields[1:] if not w.startswith("-")), "(no command)")


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    sys.stderr.write(f"{e.code}\n")
    return 1


def _run_worker(conn: socket.socket, call: Call, say: Callable[[str], None]) -> int:
    """In the forked worker: become the caller (directory, umask, environment, stdin,
    stdout, stderr), run the command, send its exit code."""
    t0 = time.monotonic()
    umask, argv = call.fields[0], call.fields[1:]
    os.fchdir(call.fds[3])
    os.umask(int(umask, 8))
    env = dict(kv.split(b"=", 1) for kv in call.body.split(b"\0") if b"=" in kv)
    os.environb.clear()
    os.environb.update(env)
    for target, fd in enumerate(call.fds[:3]):
        os.dup2(fd, target)
    call.close()
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8",
                                 errors="surrogateescape")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="surrogateescape", line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    logging.root.handlers.clear()  # the command configures logging to its own stderr
    signal.signal(signal.SIGINT, signal.default_int_handler)
    conn.sendall(b"+%d\n" % os.getpid())
    try:
        rc = nvmgr.cli.main(argv)
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException:  # what Python would print before exiting 1, on the caller's stderr
        traceback.print_exc()
        rc = 1
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except OSError:
                pass
    say(f"{_describe(call)}: exit {rc} in {(time.monotonic() - t0) * 1000:.0f} ms "
        f"(worker {os.getpid()})")
    conn.sendall(b"rc %d\n" % rc)
    return rc


class Server(forkserver.ForkServer):
    """Accept command lines on *sock_path* and run each in a forked worker."""

    def __init__(self, sock_path: str = paths.CLI_SOCKET,
                 say: Callable[[str], None] = lambda _line: None) -> None:
        preload()
        super().__init__(sock_path, magic=MAGIC, n_fds=4, describe=_describe, say=say,
                         worker=lambda conn, call: _run_worker(conn, call, say))
