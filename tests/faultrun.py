"""Run the nvmgr command line, or the libvirt hook, with a real process death
injected at one I/O.

Usage::

    python tests/faultrun.py N -- COMMAND ARGS...
    python tests/faultrun.py N -- put vm.nvram vtpm state.bin --key-file k
    python tests/faultrun.py N --hook SWTPM_ROOT RUNTIME_ROOT LOG -- NAME OP SUBOP < domain.xml

Every container write, flush and resize calls ``Container._fault`` first
(:mod:`nvmgr.storage.container`); this wrapper counts those calls and, at the N-th,
sends itself SIGKILL *before* that I/O happens: no exception handler, no
``finally``, no ``atexit``, no buffered output survives, exactly as if the
process had been killed there.  The exit status seen by the parent is -9.

With ``--hook`` it runs the hook entry (:func:`nvmgr.hook.entry.main`) as
libvirtd does, the domain XML on standard input, with swtpm's state root and
nvmgr's runtime root moved to the directories given, the hook log in LOG,
and QEMU and swtpm users being the caller; the staging of swtpm and fw_cfg
files (:data:`nvmgr.provision.staging.fault`: every write, fsync, rename and
unlink of a staged file) counts as I/O too.

``N = 0`` is the dry run: the command runs to completion and the I/O count is
printed to standard error as ``faultrun: ios=K`` (one ``faultrun: io I KIND
OFFSET LENGTH`` line per I/O before it), so a test knows the range 1..K of
crash points.  The wrapper exits with the command's own exit status.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _hook_main(args: list[str], swtpm: str, runtime: str, log_file: str) -> int:
    from nvmgr.hook import entry, lifecycle
    from nvmgr.provision import staging

    of = lifecycle.HookContext.of.__func__  # type: ignore[attr-defined]

    def moved(cls: type[lifecycle.HookContext], *a: object) -> lifecycle.HookContext | None:
        ctx = of(cls, *a)
        if ctx is not None:
            ctx.swtpm_root, ctx.runtime_root = swtpm, runtime
            # The daemon holding libvirt's secrets, as the test says (none: not checked).
            ctx.secrets_pidfile = os.path.join(runtime, "libvirt-secrets.pid")
        return ctx  # type: ignore[no-any-return]

    lifecycle.HookContext.of = classmethod(moved)  # type: ignore[assignment,method-assign]
    me = f"+{os.getuid()}", f"+{os.getgid()}"
    staging.Users.from_qemu_conf = classmethod(  # type: ignore[method-assign,assignment]
        lambda cls, path=None: cls(*me, *me))
    return entry.main(["qemu", *args], sys.stdin.buffer, sys.stdout, sys.stderr,
                      log_file=log_file)


def main(argv: list[str]) -> int:
    hook: list[str] | None = None
    if len(argv) > 5 and argv[1] == "--hook":
        hook, argv = argv[2:5], [argv[0], *argv[5:]]
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: faultrun.py N [--hook SWTPM RUNTIME LOG] -- COMMAND [ARGS...]"
                         "   (N = 0: count I/Os)\n")
        return 2
    kill_at = int(argv[0])

    from nvmgr import cli
    from nvmgr.image import handoff
    from nvmgr.provision import staging, vtpm
    from nvmgr.storage import container

    trace: list[tuple[str, int | str, int]] = []
    original = container.Container._fault

    def count(kind: str, where: int | str, length: int) -> None:
        trace.append((kind, where, length))
        if len(trace) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def fault(self: container.Container, kind: str, offset: int, length: int) -> None:
        count(kind, offset, length)
        original(self, kind, offset, length)

    # Every container class inherits _fault; none overrides it.
    container.Container._fault = fault  # type: ignore[method-assign]
    staging.fault = lambda kind, path: count(f"staged-{kind}", path, 0)
    vtpm.fault = lambda kind, path: count(f"vtpm-{kind}", path, 0)
    handoff.fault = lambda kind, path: count(f"handoff-{kind}", path, 0)
    if hook is not None:
        rc = _hook_main(argv[2:], *hook)
    else:
        rc = cli.main(argv[2:])
    if kill_at == 0:
        for i, (kind, where, length) in enumerate(trace, 1):
            sys.stderr.write(f"faultrun: io {i} {kind} {where} {length}\n")
        sys.stderr.write(f"faultrun: ios={len(trace)}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
