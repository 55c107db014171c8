"""The hook's entry: argv and stdin in, an exit code out.

libvirtd runs ``/etc/libvirt/hooks/qemu.d/nvmgr NAME OP SUBOP EXTRA`` with
the domain XML on stdin (the sh front end in ``nvmgr/data/hook-qemu`` hands
the calls nvmgr cares about to :func:`main`).  This module only reads the
call, parses the XML once, picks the action from
:data:`nvmgr.hook.lifecycle.ACTIONS` and turns errors into an exit code and
one line of stderr (which ``virsh start`` shows) and of the hook log.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
from typing import BinaryIO, TextIO

from nvmgr import paths
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.errors import ExitCode, NvmgrError
from nvmgr.hook.lifecycle import ACTIONS, HookContext, migrate, not_wired
from nvmgr.provision import staging

LOG_FILE = paths.HOOK_LOG
_HOSTILE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.I)


def looks_hostile(raw: bytes) -> bool:
    """A DTD or an entity declaration: nvmgr parses (and refuses) such XML whatever it is."""
    return _HOSTILE.search(raw) is not None

log = logging.getLogger("nvmgr.hook")


def _setup_log(path: str) -> None:
    """Send the hook's log lines to *path* (once per path: main may run many times)."""
    if getattr(log, "nvmgr_path", None) == path:
        return
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.nvmgr_path = path  # type: ignore[attr-defined]
    try:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str], stdin: BinaryIO, stdout: TextIO, stderr: TextIO,
         *, log_file: str = LOG_FILE) -> int:
    """Run one hook invocation; return the exit code for libvirtd."""
    if len(argv) < 4:
        stderr.write("nvmgr hook: usage: qemu NAME OP SUBOP [EXTRA]\n")
        return int(ExitCode.USAGE)
    name, op, sub = argv[1], argv[2], argv[3]
    action = ACTIONS.get((op, sub))
    if action is None and (op, sub) != ("migrate", "begin"):
        return 0
    _setup_log(log_file)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raw = stdin.read()
    if not raw.strip():
        if op == "prepare":
            stderr.write(f"nvmgr: domain {name}: the hook got no domain XML on stdin\n")
            log.info("%s %s %s %s: refused: no domain XML on stdin", stamp, name, op, sub)
            return int(ExitCode.INVALID_INPUT)
        return 0
    if NVMGR_NS.encode() not in raw and not looks_hostile(raw):
        # Not nvmgr's domain: whatever else its XML holds (another tool's deep
        # metadata, say) is libvirt's business, never a reason to refuse it.
        return 0
    try:
        dom = parse_domain(raw)  # the one parse; lifecycle works on this Domain
        ctx = HookContext.of(name, op, sub, raw.decode("utf-8", "replace"), dom,
                             staging.Users.from_qemu_conf())
        if ctx is None:
            if op == "prepare" and dom.nvmgr is not None:  # <nvmgr:nvram/> and nothing else
                raise not_wired(name, ["its <nvmgr:nvram> metadata names no image yet"])
            return 0
        what = migrate(ctx, stdout) if action is None else action(ctx)
        log.info("%s %s %s %s: %s", stamp, name, op, sub, what)
        return 0
    except NvmgrError as e:
        e.domain = e.domain or name
        stderr.write(f"nvmgr: {e}\n")
        log.info("%s %s %s %s: refused: %s", stamp, name, op, sub, e)
        return int(e.exit_code)
    except Exception as e:  # a hook must answer libvirtd, never hang or dump a traceback
        stderr.write(f"nvmgr: domain {name}: internal error in {op}: {e!r}\n")
        log.exception("%s %s %s %s: internal error", stamp, name, op, sub)
        return int(ExitCode.ERROR)
