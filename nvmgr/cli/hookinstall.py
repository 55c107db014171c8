"""What ``nvmgr install-hook`` writes: the shipped hook front end, set for this
installation's Python and paths (imported only by that command)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import nvmgr
from nvmgr import resources
from nvmgr.errors import InstallationError
from nvmgr.paths import HOOK_SOCKET

#: Prints the directories that site would add to sys.path (site-packages and
#: what their .pth files name), from an interpreter started without them.
_SITE_DIRS = ("import json, site, sys; before = list(sys.path); site.main(); "
              "print(json.dumps([p for p in sys.path if p not in before]))")

#: What the installed hook's Python must manage: import the hook's entry
#: (and with it lxml and cryptography) and say where nvmgr came from.
_HOOK_IMPORTS = ("import sys; sys.path[:0] = sys.argv[1].split(':'); "
                 "import nvmgr, nvmgr.hook.entry; print(nvmgr.__file__)")


def hook_values() -> dict[str, str]:
    """The front end's PYTHON, PYTHON_FLAGS, NVMGR_PATH, HOOK_CLIENT and HOOK_SOCKET
    for this installation.

    Starting Python isolated and without site initialisation (``-I -S``)
    saves most of its start-up time, which libvirtd waits for at every start
    and stop; the paths site would have added are given to it instead: the
    directory holding this nvmgr (a checkout, or the site-packages of the
    venv or system it was installed into), then every directory site adds
    for this interpreter -- its site-packages and whatever their ``.pth``
    files name (an editable install, a venv's access to another one's
    packages) -- as this interpreter itself reports them.

    :raise InstallationError: this interpreter cannot be run to ask.
    """
    python = sys.executable
    if not python:
        raise InstallationError("cannot tell which Python runs nvmgr (sys.executable is empty)")
    pkg_parent = str(Path(nvmgr.__file__).resolve().parent.parent)
    try:
        out = subprocess.run([python, "-I", "-S", "-c", _SITE_DIRS], capture_output=True,
                             text=True, check=True, cwd="/", timeout=60).stdout
        site_dirs = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise InstallationError(f"cannot ask {python} for its site directories: {e}") from e
    paths = [pkg_parent] + [str(p) for p in site_dirs if p and str(p) != pkg_parent]
    bad = [p for p in paths if ":" in p]
    if bad:
        raise InstallationError(f"the hook cannot use paths containing ':': {', '.join(bad)}")
    client = Path(nvmgr.__file__).resolve().parent / "hook" / "client.py"
    if not client.is_file():
        raise InstallationError(f"the hook client {client} is missing; reinstall nvmgr")
    return {"PYTHON": python, "PYTHON_FLAGS": "-I -S", "NVMGR_PATH": ":".join(paths),
            "HOOK_CLIENT": str(client), "HOOK_SOCKET": HOOK_SOCKET}


def check_hook_python(values: dict[str, str]) -> str:
    """Run the hook's Python as the hook will; return where its nvmgr lives.

    :raise InstallationError: it cannot import the hook, or finds another nvmgr.
    """
    cmd = [values["PYTHON"], *values["PYTHON_FLAGS"].split(), "-c", _HOOK_IMPORTS,
           values["NVMGR_PATH"]]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise InstallationError(f"cannot run the hook's Python {values['PYTHON']}: {e}") from e
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise InstallationError(
            f"the hook's Python cannot import nvmgr's hook ({last}); "
            f"looked in {values['NVMGR_PATH']}")
    found = r.stdout.strip()
    ours = str(Path(nvmgr.__file__).resolve())
    if str(Path(found).resolve()) != ours:
        raise InstallationError(f"the hook's Python would import {found}, not {ours}")
    return ours


def hook_script(template: str, values: dict[str, str] | None = None) -> str:
    """The hook front end *template* (``nvmgr/data/hook-qemu``) with its
    ``PYTHON=``, ``PYTHON_FLAGS=`` and ``NVMGR_PATH=`` lines set to *values*
    (default: :func:`hook_values`).

    :raise InstallationError: the template lacks one of those lines.
    """
    todo = dict(values if values is not None else hook_values())
    out = []
    for line in template.splitlines(keepends=True):
        name = line.split("=", 1)[0]
        if name in todo and "=" in line:
            line = f"{name}={shlex.quote(todo.pop(name))}\n"
        out.append(line)
    if todo:
        raise InstallationError(
            f"the hook front end {resources.HOOK_FRONTEND} shipped with nvmgr has no "
            f"{', '.join(todo)} line to set; reinstall nvmgr")
    return "".join(out)


def service_unit(template: str, python: str | None = None,
                 command: str = "reconcile --all --watch", name: str = resources.WATCH_UNIT) -> str:
    """The unit *template* (``nvmgr/data/nvmgr-watch.service``, or *name*) with
    ExecStart running this installation's nvmgr *command* (this Python, ``-m nvmgr``,
    with the directory holding this nvmgr on PYTHONPATH, so a checkout runs too).

    :raise InstallationError: the template has no ExecStart line, or a path
        holds white space (systemd would split it).
    """
    python = python or sys.executable
    pkg_parent = str(Path(nvmgr.__file__).resolve().parent.parent)
    bad = [p for p in (python, pkg_parent) if not p or any(c.isspace() for c in p)]
    if bad:
        raise InstallationError(f"the unit cannot run from a path with white space: {bad}")
    out, done = [], False
    for line in template.splitlines(keepends=True):
        if line.startswith("ExecStart=") and not done:
            line = (f"ExecStart={python} -m nvmgr {command}\n"
                    f"Environment=PYTHONPATH={pkg_parent}\n")
            done = True
        out.append(line)
    if not done:
        raise InstallationError(f"the unit {name} shipped with nvmgr has no "
                                "ExecStart line; reinstall nvmgr")
    return "".join(out)
