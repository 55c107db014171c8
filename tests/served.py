"""A resident nvmgr server (``cli-server``, ``hook-server``) run for a test from a copy
of the package in a temporary directory, so that a test can change its code on
disk; its output is the log file the tests read to tell who ran a call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``python -m nvmgr COMMAND --socket TMP/SOCK_NAME`` from ``TMP/pkg``, started and
    waited for (its "listening" line) within *timeout* seconds."""

    def __init__(self, tmp: Path, command: str, sock_name: str, *,
                 env: dict[str, str] | None = None, timeout: float = 30) -> None:
        self.pkg_root = tmp / "pkg"
        shutil.copytree(ROOT / "nvmgr", self.pkg_root / "nvmgr",
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.sock = tmp / sock_name
        self.log = tmp / "server.log"
        self.out = open(self.log, "w")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvmgr", command, "--socket", str(self.sock)],
            cwd=tmp, env={**os.environ, "PYTHONPATH": str(self.pkg_root), **(env or {})},
            stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "listening" not in self.lines_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start: {self.lines_text()}")
            time.sleep(0.05)

    def lines_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.out.close()
