"""Shared fixtures: a key file, running the CLI as a user would, golden files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-output", action="store_true", default=False,
                     help="rewrite golden *-out files from the current code")


@pytest.fixture
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate-output"))


Golden = Callable[[Path, str], None]


@pytest.fixture
def golden(regenerate: bool) -> Golden:
    """``golden(path, text)``: *text* must equal the golden file (rewritten with
    ``--regenerate-output``)."""

    def check(path: Path, text: str) -> None:
        if regenerate:
            path.write_text(text)
        assert path.exists(), f"{path.name} missing: run pytest --regenerate-output"
        assert path.read_text() == text, (
            f"{path.name} differs (pytest --regenerate-output to accept)")

    return check


@pytest.fixture
def host_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans must not depend on which firmware files this host has installed."""
    from nvmgr.domain import profiles

    monkeypatch.setattr(profiles, "_image_size", lambda path: None)
    monkeypatch.setattr(profiles, "FIRMWARE_DIRS", (str(ROOT / "tests" / "data" / "firmware"),))


def make_key(path: Path, *, hex_form: bool = False) -> Path:
    key = os.urandom(32)
    path.write_bytes(key.hex().encode() + b"\n" if hex_form else key)
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return make_key(tmp_path / "kek.key")


@pytest.fixture
def key_file2(tmp_path: Path) -> Path:
    return make_key(tmp_path / "kek2.key", hex_form=True)


RunCli = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def nvmgr() -> RunCli:
    """Run ``nvmgr ARGS...`` in a subprocess; returns the CompletedProcess (bytes)."""

    def run(*args: str | os.PathLike[str], input: bytes | None = None,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "nvmgr", *map(str, args)],
                              input=input, capture_output=True, cwd=cwd, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    return run
