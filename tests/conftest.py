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
        return subprocess.run([sys.executable, "-m", "nvmgr.cli", *map(str, args)],
                              input=input, capture_output=True, cwd=cwd, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    return run
