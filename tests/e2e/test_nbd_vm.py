"""A UEFI + TPM 2.0 VM whose image is on an NBD server, end to end (issue 12).

Real libvirtd, QEMU (TCG), OVMF and swtpm.  The NBD server is run the way a user
would run one: ``qemu-storage-daemon`` serving a file writable over a unix
socket, started by the fixture and killed at the end.

The served file is a new, empty (all-zero) file, as a user makes one with
``truncate``: ``nvmgr define --image nbd+unix:///...`` writes the domain's image
into that blank export (nvmgr never makes an export, nor writes an image over an
export that holds data).  So the image is made the way a user makes it for a
domain: by ``define``, with the domain's own plan, not by hand beforehand.

QEMU reaches the export through its own ``nbd`` driver (a ``-blockdev`` in the
domain's ``<qemu:commandline>``), as the QEMU user: the socket is handed to it
(``chown``), as a user serving QEMU must.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

#: The served file: room for the domain's image (1.8 MiB) and its growth.
EXPORT_SIZE = 8 << 20


class NbdServer:
    """``qemu-storage-daemon`` serving *file* as export ``vm1`` on a unix socket."""

    def __init__(self, workdir: Path) -> None:
        vmlib.SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="nbdvm-", dir=vmlib.SOCK_ROOT))
        self.dir.chmod(0o755)  # QEMU (libvirt-qemu) reaches the socket through it
        self.file = self.dir / "vm1.raw"
        with open(self.file, "wb") as f:
            f.truncate(EXPORT_SIZE)
        self.socket = self.dir / "nbd.sock"
        self.uri = f"nbd+unix:///vm1?socket={self.socket}"
        self.log = workdir / "qsd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,filename={self.file},node-name=f",
                 "--blockdev", "driver=raw,file=f,node-name=n",
                 "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                 "--export", "type=nbd,id=e,node-name=n,name=vm1,writable=on"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise vmlib.Failed(f"qemu-storage-daemon exited {self.proc.returncode}: "
                                   f"{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise vmlib.Failed("qemu-storage-daemon's socket did not show up in 30 s")
            time.sleep(0.05)
        # QEMU runs as libvirt-qemu: connecting needs write permission on the socket.
        shutil.chown(self.socket, "libvirt-qemu", "libvirt-qemu")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nbd_server(e2e_env: Path, tmp_path: Path) -> Iterator[NbdServer]:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed (scripts/setup installs it)")
    s = NbdServer(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _define(v: vmlib.VM, uri: str) -> dict[str, object]:
    r: dict[str, object] = json.loads(
        vmlib.nvmgr("define", v.xml_path, "--image", uri, "--output", "json").stdout)
    return r


def test_a_uefi_tpm_vm_with_its_image_on_an_nbd_server(vm: MakeVM, nbd_server: NbdServer,
                                                        tmp_path: Path) -> None:
    uri = nbd_server.uri
    v = vm("nbd")
    r = _define(v, uri)
    assert r["image"] == uri and r["created"], r
    # The image went into the served file (its size the server's, never changed).
    assert nbd_server.file.stat().st_size == EXPORT_SIZE
    args = html.unescape(vmlib.virsh("dumpxml", v.name).stdout)
    assert '"driver":"nbd"' in args and f'"path":"{nbd_server.socket}"' in args, args

    # a. OVMF boots to its shell; its variable writes land in the export.
    v.start()
    v.wait_for_shell(240)
    assert any('"driver":"nbd"' in a for a in vmlib.qemu_cmdline(v.name))

    # d. A write to the vars of the running VM is refused, busy (7).  NBD has no lock
    # nvmgr could ask, so the in-use mark of the prepare hook refuses it, and a running
    # QEMU on this host with the export open in its command line refuses even --force.
    (tmp_path / "vars.bin").write_bytes(os.urandom(4096))
    before = vmlib.section_info(uri, "uefi-vars")
    p = vmlib.nvmgr("put", uri, "uefi-vars", tmp_path / "vars.bin", check=False)
    assert p.returncode == 7 and "uefi-vars is live and marked in use" in p.stderr, p
    p = vmlib.nvmgr("put", uri, "uefi-vars", tmp_path / "vars.bin", "--force", check=False)
    assert p.returncode == 7 and "a running QEMU (pid" in p.stderr, p
    assert vmlib.section_info(uri, "uefi-vars") == before  # nothing written
    assert v.state() == "running"

    mark = len(vmlib.hook_log_lines())
    v.destroy()
    line = vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    # b. (first part) libvirt's swtpm_setup made the TPM at this first start; release
    # collected its state into the image on the export.
    assert "collected ['tpm-permall'" in line, line
    vmlib.nvmgr("check", uri)
    varstore = tmp_path / "vars.fd"
    vmlib.nvmgr("get", uri, "uefi-vars", "-o", varstore)
    variables = vmlib.uefi_vars(varstore)
    assert "BootOrder" in variables and any(n.startswith("Boot0") for n in variables), \
        f"OVMF wrote no boot entries into the image on the NBD export: {sorted(variables)}"

    # b. The TPM state comes back from the export: the same TPM at the next start.
    permall = tmp_path / "permall"
    vmlib.nvmgr("get", uri, "tpm-permall", "-o", permall)
    ek1, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)
    v.start()  # the TPM comes back from the export
    v.wait_for_shell(240)
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    permall.unlink()
    vmlib.nvmgr("get", uri, "tpm-permall", "-o", permall)
    ek2, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)
    assert ek1 == ek2

    # c. One flipped byte in the vars on the export: the start is refused, naming the
    # section, and the image is left as it is (no reseal over the damage).
    off = int(vmlib.section_info(uri, "uefi-vars")["offset"])  # type: ignore[call-overload]
    vmlib.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xa5 {off + 4096} 1", uri])
    damaged = nbd_server.file.read_bytes()
    mark = len(vmlib.hook_log_lines())
    p = v.start(check=False)
    assert p.returncode != 0 and "section uefi-vars is corrupted" in p.stderr, p.stderr
    assert v.state() == "shut off"
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    assert nbd_server.file.read_bytes() == damaged
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")


def test_the_nbd_server_gone_at_start(vm: MakeVM, nbd_server: NbdServer) -> None:
    """e. The server is not there when the VM starts: the prepare hook refuses the
    start with a message naming the server's socket and exit 10 (an outside tool
    failed); nothing of the image changes, and with the server back it checks clean."""
    v = vm("nbdgone")
    _define(v, nbd_server.uri)
    image = nbd_server.file.read_bytes()
    nbd_server.stop()
    p = v.start(check=False)
    assert p.returncode != 0 and v.state() == "shut off", p
    assert "exit status 10" in p.stderr and str(nbd_server.socket) in p.stderr, p.stderr
    assert nbd_server.file.read_bytes() == image
    nbd_server.start()
    vmlib.nvmgr("check", nbd_server.uri)
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")
