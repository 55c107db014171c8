"""Run the nvmgr command line with a real process death injected at one I/O.

Usage::

    python tests/faultrun.py N -- COMMAND ARGS...
    python tests/faultrun.py N -- put vm.nvram vtpm state.bin --key-file k

Every container write, flush and resize calls ``Container._fault`` first
(:mod:`nvmgr.storage.container`); this wrapper counts those calls and, at the N-th,
sends itself SIGKILL *before* that I/O happens: no exception handler, no
``finally``, no ``atexit``, no buffered output survives, exactly as if the
process had been killed there.  The exit status seen by the parent is -9.

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


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: faultrun.py N -- COMMAND [ARGS...]   (N = 0: count I/Os)\n")
        return 2
    kill_at = int(argv[0])

    from nvmgr import cli
    from nvmgr.storage import container

    trace: list[tuple[str, int, int]] = []
    original = container.Container._fault

    def fault(self: container.Container, kind: str, offset: int, length: int) -> None:
        trace.append((kind, offset, length))
        if len(trace) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, kind, offset, length)

    # Every container class inherits _fault; none overrides it.
    container.Container._fault = fault  # type: ignore[method-assign]
    rc = cli.main(argv[2:])
    if kill_at == 0:
        for i, (kind, offset, length) in enumerate(trace, 1):
            sys.stderr.write(f"faultrun: io {i} {kind} {offset} {length}\n")
        sys.stderr.write(f"faultrun: ios={len(trace)}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
