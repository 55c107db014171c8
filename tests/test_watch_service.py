"""The watcher as a service: the systemd unit nvmgr ships and installs (issue 9, part 5).

``systemd-analyze verify`` checks the unit as ``nvmgr install-hook --service``
writes it (the shipped file names /usr/bin/nvmgr, which a venv does not
have; verify checks that ExecStart's program exists).  No systemd runs
here: verify reads files only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvmgr import resources
from nvmgr.cli.hookinstall import service_unit
from nvmgr.errors import InstallationError

ROOT = Path(__file__).resolve().parents[1]


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # --man=no: Documentation=man:nvmgr(1) needs the man page installed system-wide.
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)


def test_the_unit_is_shipped_and_runs_the_watcher() -> None:
    text = resources.read_text(resources.WATCH_UNIT)
    assert "ExecStart=/usr/bin/nvmgr reconcile --all --watch" in text
    assert "KillSignal=SIGTERM" in text and "WantedBy=multi-user.target" in text


def test_the_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / resources.WATCH_UNIT
    unit.write_text(service_unit(resources.read_text(resources.WATCH_UNIT)))
    body = unit.read_text()
    assert f"ExecStart={sys.executable} -m nvmgr reconcile --all --watch\n" in body
    assert f"Environment=PYTHONPATH={ROOT}\n" in body
    r = _verify(unit)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", (r.stdout, r.stderr)


def test_verify_is_not_blind(tmp_path: Path) -> None:
    """The check above would see a broken unit: verify warns about it on stderr."""
    unit = tmp_path / resources.WATCH_UNIT
    unit.write_text(service_unit(resources.read_text(resources.WATCH_UNIT))
                    .replace("Type=exec", "Type=sometimes"))
    r = _verify(unit)
    assert "sometimes" in r.stderr, (r.stdout, r.stderr)


def test_a_unit_template_without_execstart_is_an_installation_error() -> None:
    with pytest.raises(InstallationError, match="no ExecStart"):
        service_unit("[Service]\nType=exec\n")
    with pytest.raises(InstallationError, match="white space"):
        service_unit(resources.read_text(resources.WATCH_UNIT), "/opt/my python/bin/python3")


def test_install_hook_service_writes_and_removes_the_unit(tmp_path: Path) -> None:
    hooks, units = tmp_path / "hooks", tmp_path / "units"
    run = [sys.executable, "-m", "nvmgr", "install-hook", "--hook-dir", str(hooks),
           "--systemd-dir", str(units), "--output", "json"]
    r = subprocess.run([*run, "--service"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    unit = units / resources.WATCH_UNIT
    hook_unit = units / resources.HOOK_UNIT
    cli_unit = units / resources.CLI_UNIT
    assert out["services"] == [str(unit), str(hook_unit), str(cli_unit)] and unit.is_file()
    assert ("systemctl daemon-reload && systemctl enable --now nvmgr-watch.service "
            "nvmgr-hook.service nvmgr-cli.service") in out["note"]
    for u in (unit, hook_unit, cli_unit):
        assert u.stat().st_mode & 0o777 == 0o644
    assert unit.read_text() == service_unit(resources.read_text(resources.WATCH_UNIT))
    for u, name, command in ((hook_unit, resources.HOOK_UNIT, "hook-server"),
                             (cli_unit, resources.CLI_UNIT, "cli-server")):
        assert u.read_text() == service_unit(resources.read_text(name), None, command, name)
        assert f"ExecStart={sys.executable} -m nvmgr {command}\n" in u.read_text()
        assert _verify(u).returncode == 0
    r = subprocess.run([*run, "--uninstall", "--service"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["services_removed"] == [str(unit), str(hook_unit), str(cli_unit)]
    assert not unit.exists() and not hook_unit.exists() and not cli_unit.exists()
    assert not (hooks / "nvmgr").exists()
