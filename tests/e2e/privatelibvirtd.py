"""A libvirtd of a test's own, beside the system one, that the test may stop and restart.

It runs in a private mount namespace where ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt/qemu`` and ``/var/cache/libvirt`` are directories of the
test's (so its domains, state and sockets are its own, and no hook runs);
its socket directory is that same directory seen from outside, so clients
connect with ``qemu:///system?socket=DIR/run/libvirt-sock``.  The system
libvirtd, which other tests use, is never touched.  Images still go to
``/var/lib/libvirt/nvmgr``, shared: names must be unique.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import vmlib

_BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "qemu": "/var/lib/libvirt/qemu",
          "cache": "/var/cache/libvirt"}


class PrivateLibvirtd:
    def __init__(self, tag: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"nvmgr-e2e-{tag}-lvd-", dir="/tmp"))
        for sub in _BINDS:
            (self.dir / sub).mkdir()
        shutil.copy("/etc/libvirt/qemu.conf", self.dir / "etc" / "qemu.conf")
        (self.dir / "etc" / "libvirtd.conf").write_text("")
        script = ["#!/bin/sh", "set -e"]
        script += [f"mount --bind {self.dir / sub} {target}" for sub, target in _BINDS.items()]
        script += [f"exec libvirtd -p {self.dir / 'libvirtd.pid'}"]
        self.script = self.dir / "start.sh"
        self.script.write_text("\n".join(script) + "\n")
        self.script.chmod(0o700)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.dir / 'run' / 'libvirt-sock'}"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return vmlib.run(["virsh", "-c", self.uri, *args], check=check)

    def start(self, timeout: float = 60) -> None:
        log = open(self.dir / "libvirtd.log", "ab")  # noqa: SIM115 - the daemon keeps it
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private",
                                      str(self.script)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while self.virsh("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise vmlib.Failed("the private libvirtd did not come up:\n"
                                   + (self.dir / "libvirtd.log").read_text()[-2000:])
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, as a service manager stops it (its domain definitions stay)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # unshare exec'd the script, which exec'd libvirtd
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / "run" / "libvirt-sock")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
