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
import socket
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
    """``qemu-storage-daemon`` serving a blank file as export ``vm1`` on a unix socket,
    or with *port* on 127.0.0.1 over TCP."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        vmlib.SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="nbdvm-", dir=vmlib.SOCK_ROOT))
        self.dir.chmod(0o755)  # QEMU (libvirt-qemu) reaches the socket through it
        self.file = self.dir / "vm1.raw"
        with open(self.file, "wb") as f:
            f.truncate(EXPORT_SIZE)
        self.socket = self.dir / "nbd.sock"
        self.port = port
        self.uri = (f"nbd+unix:///vm1?socket={self.socket}" if port is None
                    else f"nbd://127.0.0.1:{port}/vm1")
        self.log = workdir / "qsd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, hand_to_qemu: bool = True) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,filename={self.file},node-name=f",
                 "--blockdev", "driver=raw,file=f,node-name=n",
                 "--nbd-server", (f"addr.type=unix,addr.path={self.socket}"
                                  if self.port is None else
                                  f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"),
                 "--export", "type=nbd,id=e,node-name=n,name=vm1,writable=on"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.proc.poll() is not None:
                raise vmlib.Failed(f"qemu-storage-daemon exited {self.proc.returncode}: "
                                   f"{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise vmlib.Failed("qemu-storage-daemon's socket did not show up in 30 s")
            time.sleep(0.05)
        # QEMU runs as libvirt-qemu: connecting needs write permission on the socket.
        if hand_to_qemu and self.port is None:
            shutil.chown(self.socket, "libvirt-qemu", "libvirt-qemu")

    def _listening(self) -> bool:
        if self.port is None:
            return self.socket.exists()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

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


@pytest.fixture
def nbd_tcp_server(e2e_env: Path, tmp_path: Path) -> Iterator[NbdServer]:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed (scripts/setup installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    s = NbdServer(tmp_path, port)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _define(v: vmlib.VM, uri: str) -> dict[str, object]:
    r: dict[str, object] = json.loads(
        vmlib.nvmgr("define", v.xml_path, "--image", uri, "--output", "json").stdout)
    return r


def test_a_uefi_tpm_vm_with_its_image_on_an_nbd_server(nbd_server: NbdServer, vm: MakeVM,
                                                        tmp_path: Path) -> None:
    # (nbd_server first: set up before, torn down after the VMs, whose release needs it)
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
    # nvmgr could ask (the server decides who connects): nvmgr finds this host's QEMU
    # whose -blockdev opens the export, which --force does not override, and the
    # in-use mark the prepare hook set (what tells a QEMU on another host) is there.
    (tmp_path / "vars.bin").write_bytes(os.urandom(4096))
    before = vmlib.section_info(uri, "uefi-vars")
    assert before["dirty"] is True, before  # the prepare hook's in-use mark
    pid = vmlib.qemu_pid(v.name)
    for force in ((), ("--force",)):
        p = vmlib.nvmgr("put", uri, "uefi-vars", tmp_path / "vars.bin", *force, check=False)
        assert p.returncode == 7 and f"uefi-vars is live and a running QEMU (pid {pid}) on " \
            "this host has the NBD export open" in p.stderr, p
    p = vmlib.nvmgr("check", uri, "--repair", "--yes", check=False)  # the marks stay too
    assert p.returncode == 7 and f"a running QEMU (pid {pid})" in p.stderr, p
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


def test_the_nbd_server_gone_at_start(nbd_server: NbdServer, vm: MakeVM) -> None:
    """e. The server is not there when the VM starts: the prepare hook refuses the
    start with a message naming the server's socket and exit 10 (an outside tool
    failed); nothing of the image changes, and with the server back it checks clean
    and the VM starts once QEMU's user may connect to the socket."""
    v = vm("nbdgone")
    _define(v, nbd_server.uri)
    image = nbd_server.file.read_bytes()
    nbd_server.stop()
    p = v.start(check=False)
    assert p.returncode != 0 and v.state() == "shut off", p
    assert "exit status 10" in p.stderr and \
        f"cannot reach the NBD server on socket {nbd_server.socket}" in p.stderr, p.stderr
    assert nbd_server.file.read_bytes() == image
    nbd_server.start(hand_to_qemu=False)
    vmlib.nvmgr("check", nbd_server.uri)
    # The server back, its socket not handed to QEMU's user: refused by the prepare
    # hook (exit 11: the host is not set up), naming the socket and the fix, before
    # anything is staged (QEMU would otherwise fail later with "Permission denied").
    p = v.start(check=False)
    assert p.returncode != 0 and v.state() == "shut off", p
    assert "exit status 11" in p.stderr and "QEMU runs as libvirt-qemu, which may not " \
        f"connect to the NBD server's socket {nbd_server.socket}" in p.stderr, p.stderr
    assert nbd_server.file.read_bytes() == image
    shutil.chown(nbd_server.socket, "libvirt-qemu", "libvirt-qemu")
    v.start()  # handed over: the VM starts, and boots to OVMF's shell
    v.wait_for_shell(240)
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")


def test_the_nbd_server_gone_at_release(nbd_server: NbdServer, vm: MakeVM,
                                        tmp_path: Path) -> None:
    """The server dies while the VM runs and the VM is then stopped: release cannot
    reach the image (exit 10 in the hook's log, naming the server) and leaves the TPM
    state swtpm wrote staged where it is, nothing lost; with the server back the next
    start takes the image over from the run that never released it, brings that
    staged state into the image (the same TPM) and boots."""
    v = vm("nbdrel")
    _define(v, nbd_server.uri)
    v.start()
    v.wait_for_shell(240)
    nbd_server.stop()
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    line = vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=120)
    assert "refused" in line and \
        f"cannot reach the NBD server on socket {nbd_server.socket}" in line, line
    staged = v.swtpm_dir / "tpm2-00.permall"
    assert staged.is_file(), "release wiped the TPM state it could not store"
    ek_made, _ = vmlib.read_ek(staged.read_bytes(), tmp_path)

    nbd_server.start()
    assert vmlib.section_info(nbd_server.uri, "tpm-permall")["length"] == 0  # not stored
    mark = len(vmlib.hook_log_lines())
    v.start()
    line = vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark, timeout=60)
    assert "which never released it" in line and "staged tpm ['tpm2-00.permall']" in line, line
    v.wait_for_shell(240)
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    line = vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    assert "refused" not in line, line
    vmlib.nvmgr("check", nbd_server.uri)
    permall = tmp_path / "permall"
    vmlib.nvmgr("get", nbd_server.uri, "tpm-permall", "-o", permall)
    ek, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)
    assert ek == ek_made
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")


def test_a_vm_with_its_image_on_an_nbd_server_over_tcp(nbd_tcp_server: NbdServer, vm: MakeVM,
                                                       tmp_path: Path) -> None:
    """The export served over TCP on 127.0.0.1 (``nbd://HOST:PORT/EXPORT``): QEMU's
    ``nbd`` blockdev connects there; the running QEMU is seen holding the export."""
    uri = nbd_tcp_server.uri
    v = vm("nbdtcp")
    r = _define(v, uri)
    assert r["image"] == uri and r["created"], r
    args = html.unescape(vmlib.virsh("dumpxml", v.name).stdout)
    server = {"type": "inet", "host": "127.0.0.1", "port": str(nbd_tcp_server.port)}
    assert f'"server":{json.dumps(server, separators=(",", ":"))}' in args, args
    v.start()
    v.wait_for_shell(240)
    (tmp_path / "vars.bin").write_bytes(os.urandom(4096))
    p = vmlib.nvmgr("put", uri, "uefi-vars", tmp_path / "vars.bin", "--force", check=False)
    assert p.returncode == 7 and f"a running QEMU (pid {vmlib.qemu_pid(v.name)})" in p.stderr, p
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    line = vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    assert "collected ['tpm-permall'" in line, line
    vmlib.nvmgr("check", uri)
    varstore = tmp_path / "vars.fd"
    vmlib.nvmgr("get", uri, "uefi-vars", "-o", varstore)
    assert "BootOrder" in vmlib.uefi_vars(varstore)
    # undefine --remove-nvram gives the export back blank, as define was given it.
    assert nbd_tcp_server.file.read_bytes().count(0) < EXPORT_SIZE
    r = vmlib.nvmgr_json("undefine", v.name, "--remove-nvram")
    assert r["image_removed"] is True, r
    assert nbd_tcp_server.file.read_bytes().count(0) == EXPORT_SIZE
    assert nbd_tcp_server.file.stat().st_size == EXPORT_SIZE
