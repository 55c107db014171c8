"""The ``nvmgr`` command: argv in, an exit code out.

:func:`main` is the entry (the ``nvmgr`` console script, ``python -m nvmgr``).
Run with no *argv*, it first offers the command line to ``nvmgr cli-server``
(:mod:`nvmgr.cli.client`, only built-in modules); with no server, or one that
hands it back, :func:`nvmgr.cli.app.main` runs it here, building the parser
from the commands that :mod:`nvmgr.cli.images`, :mod:`nvmgr.cli.domains` and
the other command modules register with :mod:`nvmgr.cli.common`.
"""

from __future__ import annotations

import sys

__all__ = ["main", "build_parsers"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line *argv* (default: this process's) and return its exit code."""
    if argv is None:
        from nvmgr.cli.client import ask_server

        rc = ask_server(sys.argv[1:])
        if rc is not None:
            return rc
    from nvmgr.cli.app import main as run

    return run(argv)


def build_parsers() -> None:
    """Build every parser a command line may need (``nvmgr cli-server``, before
    its workers fork: they inherit them built)."""
    from nvmgr.cli.app import build_parser

    build_parser()
    build_parser(domain_mode=True, quiet=True)
    build_parser(quiet=True)
