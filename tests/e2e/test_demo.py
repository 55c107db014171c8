"""The README's first quick-start command, ``scripts/demo``, run whole: a real VM's
NVRAM managed end to end.  It is no test of its own parts (the other end-to-end
tests are); it keeps the command a user types first working (it broke once
unseen: nothing ran it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import vmlib

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_demo_runs_to_its_end(e2e_env: Path) -> None:
    assert vmlib.E2E_LOCK_FD >= 0
    p = subprocess.run(["bash", str(ROOT / "scripts" / "demo")], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=1500,
                       pass_fds=(vmlib.E2E_LOCK_FD,),
                       env={**os.environ, "NVMGR_E2E_LOCK_FD": str(vmlib.E2E_LOCK_FD)})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "demo: done in" in out and "FAILED" not in out, out[-4000:]
    assert "same EK and certificate" in out and "BootOrder" in out, out[-4000:]
