"""``python -m nvmgr``: the command line."""

import sys

from nvmgr.cli import main

sys.exit(main())
