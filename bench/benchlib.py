"""What more than one bench needs and that imports nothing of the project's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def compile_bytecode(python: str | Path, root: str | Path) -> str:
    """Write the bytecode of *root*'s nvmgr package with *python*, as ``pip install`` does.

    The timed commands then start the way an installed nvmgr starts.  A tree whose
    ``__pycache__`` is stale or missing (an edited checkout, or an environment with
    ``PYTHONDONTWRITEBYTECODE`` set, where Python never rewrites it) would otherwise
    compile its changed modules on every run, and an A/B would time the compiler.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([str(python), "-m", "compileall", "-q", os.path.join(root, "nvmgr")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return f"bytecode of {root}/nvmgr written before timing (compileall)"


def enter_venv(script: str) -> Path:
    """Run *script* (a bench's ``__file__``) under the checkout's ``.venv`` Python
    (libvirt-python, lxml), re-executing it there if another Python started it,
    and put the checkout and ``bench/`` on ``sys.path``; return the checkout."""
    root = Path(script).resolve().parent.parent
    venv_py = root / ".venv" / "bin" / "python"
    if venv_py.exists() and Path(sys.prefix).resolve() != (root / ".venv").resolve():
        os.execv(str(venv_py), [str(venv_py), script, *sys.argv[1:]])
    for p in (str(root / "bench"), str(root)):
        if p not in sys.path:
            sys.path.insert(0, p)
    return root
