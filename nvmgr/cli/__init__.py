"""The ``nvmgr`` command: argv in, an exit code out.

``main`` builds the parser from the commands that :mod:`nvmgr.cli.images`
and :mod:`nvmgr.cli.domains` register with :mod:`nvmgr.cli.common`.
"""

from nvmgr.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
