"""A wired UEFI + TPM 2.0 domain and the libvirt hook run on it as libvirtd runs it.

For the tests that drive the real hook entry in its own process
(``tests/faultrun.py --hook``): the domain XML goes on stdin, swtpm's state
root and nvmgr's runtime root are directories of the test, the QEMU and swtpm
users are the caller.  The plan uses the host's own OVMF files (the hook's
process plans with them too); tests skip where OVMF is not installed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULTRUN = ROOT / "tests" / "faultrun.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1" image='{image}'/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{code}</loader>
    <nvram template='{vars}'>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram>
  </os>
  <devices>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"""


#: Where a test's runtime root goes: a tmpfs, as ``/run`` is on a host (the hook
#: writes key files only onto one: ``staging.require_volatile``).
VOLATILE_BASE = Path("/dev/shm")
_volatile: list[Path] = []


def volatile_dir(tag: str) -> Path:
    """A new directory on tmpfs; ``remove_volatile_dirs`` (after every test) removes it."""
    p = Path(tempfile.mkdtemp(prefix=f"nvmgr-test-{tag}-", dir=VOLATILE_BASE))
    _volatile.append(p)
    return p


def remove_volatile_dirs() -> None:
    while _volatile:
        shutil.rmtree(_volatile.pop(), ignore_errors=True)


@dataclasses.dataclass
class HookDomain:
    name: str
    uuid: str
    xml: str
    image: Path
    swtpm_root: Path
    runtime_root: Path
    log: Path

    @property
    def tpm_dir(self) -> Path:
        """swtpm's state directory for this domain (``<root>/<uuid>/tpm2``)."""
        return self.swtpm_root / self.uuid / "tpm2"

    def hook(self, op: str, sub: str, *, kill_at: int = 0) -> subprocess.CompletedProcess[bytes]:
        """The hook's ``OP SUB`` call, killed at its *kill_at*-th I/O (0: never)."""
        return subprocess.run(
            [sys.executable, str(FAULTRUN), str(kill_at), "--hook", str(self.swtpm_root),
             str(self.runtime_root), str(self.log), "--", self.name, op, sub, "-"],
            input=self.xml.encode(), capture_output=True, env=ENV, check=False)

    def ios(self, op: str, sub: str) -> int:
        """Run ``OP SUB`` to completion; return its I/O count (``faultrun: ios=K``)."""
        r = self.hook(op, sub)
        assert r.returncode == 0, r.stderr.decode()
        last = r.stderr.decode().strip().splitlines()[-1]
        assert last.startswith("faultrun: ios="), last
        return int(last.split("=")[1])


def wired_domain(work: Path, tag: str, fmt: str = "raw", *,
                 key_file: Path | None = None) -> HookDomain:
    """A UEFI + TPM 2.0 domain under *work*, wired as ``nvmgr define`` wires it
    (with *key_file* named in its metadata: encrypted, live sections LUKS volumes)."""
    if not (os.path.isfile(OVMF_CODE) and os.path.isfile(OVMF_VARS)):
        pytest.skip("needs OVMF's 4M files (apt-get install ovmf)")
    from nvmgr.domain import qemuargs
    from nvmgr.domain.plan import plan_domain

    name = f"h2-{tag}-{uuid.uuid4().hex[:6]}"
    dom_uuid = str(uuid.uuid4())
    image = work / f"{name}.nvram"
    xml = DOMAIN.format(name=name, uuid=dom_uuid, image=image, code=OVMF_CODE, vars=OVMF_VARS)
    if key_file is not None:
        xml = xml.replace(f"image='{image}'", f"image='{image}' key-file='{key_file}'", 1)
    wired = qemuargs.rewrite_domain(xml, plan_domain(xml), str(image), fmt, str(uuid.uuid4()))
    d = HookDomain(name, dom_uuid, wired, image, work / "swtpm", volatile_dir("run"),
                   work / "hook.log")
    d.swtpm_root.mkdir(exist_ok=True)
    d.runtime_root.mkdir(exist_ok=True)
    return d
