"""Live migration between two real libvirtd "hosts" on this machine (``hosts.py``),
and a VM's other ways of stopping and coming back: save/restore, managedsave,
a libvirtd restart while it runs.

The guest is OVMF's shell on a serial socket: ``setvar`` writes non-volatile
variables through the firmware's own variable driver into the pflash slice
of the image, on the source before a migration and on the destination after
it.  The TPM is the one libvirt manufactured at the first start on the
source: its endorsement key, read from the source's staged state while the
VM runs there, must be the one in the image after the VM stopped on the
destination.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.image.image import Image

from . import hosts, vmlib
from .hosts import Host, destroy_checked, migrate_checked, runner_host

pytestmark = pytest.mark.e2e

GUID = "6e766d67-7262-6b00-8000-000000000002"
SERIAL_DIR = "/run/nvmgr-e2e"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Host, Host, Path]]:
    """Two hosts for the module (each start costs seconds); never the system libvirtd."""
    hosts.require()
    with hosts.two_hosts("mig") as got:
        for h in got[:2]:  # where serial sockets go, on either side of a migration
            h.path(SERIAL_DIR).mkdir(mode=0o755)
        yield got


class GuestVM:
    """A domain defined on one host, its image in *image*, a shell on its serial port."""

    def __init__(self, what: str, image: Path | str, workdir: Path) -> None:
        self.name = vmlib.new_name(what)
        self.uuid = str(uuid.uuid4())
        #: swtpm's state passphrase (a domain with a key: its state is swtpm's ciphertext)
        self.passphrase: bytes | None = None
        self.image = image
        self.socket = f"{SERIAL_DIR}/{self.name}.serial"
        self.xml = workdir / f"{self.name}.xml"
        self.xml.write_text(vmlib.domain_xml(self.name, self.uuid,
                                             serial_socket=Path(self.socket)))
        self.workdir = workdir

    def define(self, host: Host, *extra: str) -> None:
        vmlib.nvmgr("define", "--connect", host.uri, "--image", self.image, self.xml, *extra)

    def start(self, host: Host) -> None:
        host.virsh("start", self.name)

    def shell(self, host: Host) -> vmlib.Shell:
        return vmlib.Shell(host.path(self.socket), timeout=30)

    def boot_to_shell(self, host: Host) -> None:
        with self.shell(host) as sh:
            sh.wait_prompt(host.serial_log(self.name), 120)

    def setvar(self, host: Host, var: str, value: str) -> None:
        """The guest writes *var* (through OVMF's variable driver, into pflash)."""
        with self.shell(host) as sh:
            for _ in range(3):  # a shell already at its prompt prints nothing new
                sh.sock.sendall(b"\r")
                if sh._read_until(sh.PROMPT, 10):
                    break
            sh._drain()
            out = sh.command(f'setvar {var} -guid {GUID} -nv -bs ="{value}"')
            assert "rror" not in out, out

    def info(self, image: Path | str | None = None) -> dict[str, object]:
        return vmlib.nvmgr_json("info", image or self.image)

    def in_use(self, image: Path | None = None) -> bool:
        return bool(vmlib.section_info(image or self.image, "uefi-vars")["dirty"])

    def vars(self, image: Path | None = None, *key: str) -> dict[str, str]:
        """The test's variables in the image's uefi-vars section (virt-fw-vars' JSON);
        *key*: the key options for an encrypted image (its vars are a LUKS volume)."""
        raw = self.workdir / f"{self.name}.vars"
        raw.unlink(missing_ok=True)
        vmlib.nvmgr("get", image or self.image, "uefi-vars", "-o", raw, *key)
        out = self.workdir / f"{self.name}.vars.json"
        out.unlink(missing_ok=True)
        vmlib.run([vmlib.VIRT_FW_VARS, "-i", raw, "--output-json", out])
        return {v["name"]: bytes.fromhex(v["data"]).decode("ascii", "replace")
                for v in json.loads(out.read_text())["variables"]
                if v["guid"].lower() == GUID}

    def ek(self, image: Path | None = None, *key: str) -> tuple[str, bytes | None]:
        out = self.workdir / f"{self.name}.permall"
        out.unlink(missing_ok=True)
        vmlib.nvmgr("get", image or self.image, "tpm-permall", "-o", out, *key)
        return vmlib.read_ek(out.read_bytes(), self.workdir, self.passphrase)

    def staged_ek(self, host: Host) -> tuple[str, bytes | None]:
        """The endorsement key of the TPM swtpm runs on *host* now."""
        return vmlib.read_ek((host.swtpm_dir(self.uuid) / "tpm2-00.permall").read_bytes(),
                             self.workdir, self.passphrase)

    def migrate(self, src: Host, dst: Host, shared: Path, *extra: str,
                wait: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["virsh", "-c", src.uri, "migrate", "--live", self.name, dst.uri,
             "--migrateuri", hosts.migrate_uri(shared), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait:
            _out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        return p


def test_live_migration_on_shared_storage_completed_then_cancelled(
        cluster: tuple[Host, Host, Path], tmp_path: Path) -> None:
    a, b, shared = cluster
    v = GuestVM("h4-mig-shared", shared / f"h4-{uuid.uuid4().hex[:8]}.nvram", tmp_path)
    v.define(a)
    v.start(a)
    v.boot_to_shell(a)
    v.setvar(a, "BeforeMigration", "written-on-source")
    ek = v.staged_ek(a)  # the TPM libvirt manufactured at this first start
    info = v.info()
    assert runner_host(info) == a.name and info["incoming"] is None and v.in_use()

    # Completed: the source's release (after the destination resumed) hands the image over.
    prepare, release = migrate_checked(v, a, b, shared)
    assert "stays with run" in prepare, prepare
    assert "collected nothing, resealed nothing" in release, release
    v.setvar(b, "AfterMigration", "written-on-destination")

    # Cancelled halfway, back towards the source: the destination withdraws.
    mark_a = len(a.hook_log_lines())
    p = v.migrate(b, a, shared, "--bandwidth", "1", wait=False)
    try:
        a.wait_hook_log(rf"{v.name} prepare begin: .*incoming migration", after=mark_a, timeout=60)
        deadline = time.monotonic() + 60
        while "Memory processed" not in (job := b.virsh("domjobinfo", v.name).stdout) \
                or job.split("Memory processed:")[1].split()[0] in ("0.000",):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        b.virsh("domjobabort", v.name)
        _out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and ("abort" in err.lower() or "cancel" in err.lower()), err
    line = a.wait_hook_log(rf"{v.name} release end: ", after=mark_a)
    assert "incoming migration did not complete" in line and f"host {b.name}" in line, line
    assert b.state(v.name) == "running"
    info = v.info()
    assert runner_host(info) == b.name and info["incoming"] is None and v.in_use()
    assert not (a.swtpm_dir(v.uuid) / "tpm2-00.permall").exists()
    assert not a.runtime_dir(v.uuid).exists()
    v.setvar(b, "AfterCancel", "still-on-the-destination")

    # Stopped on the destination: everything the guest wrote, the same TPM, a clean image.
    destroy_checked(v, b, ek=ek, variables={"BeforeMigration": "written-on-source",
                                            "AfterMigration": "written-on-destination",
                                            "AfterCancel": "still-on-the-destination"})
    vmlib.nvmgr("check", v.image)
    assert not (b.swtpm_dir(v.uuid) / "tpm2-00.permall").exists()


def test_live_migration_without_shared_storage(
        cluster: tuple[Host, Host, Path], tmp_path: Path) -> None:
    """``nvmgr migrate-image`` copies the image while the VM runs; the migration
    stream brings what the guest wrote afterwards; the path map rewrites the path.
    The image is encrypted (its TPM sections, its vars a LUKS volume): the key file
    is at the same path on both hosts; the copy needs no key."""
    a, b, shared = cluster
    src_dir, dst_dir = shared / "host-a", shared / "host-b"
    for d in (src_dir, dst_dir):
        d.mkdir(mode=0o755, exist_ok=True)
    v = GuestVM("h4-mig-copy", src_dir / f"h4-{uuid.uuid4().hex[:8]}.nvram", tmp_path)
    copy = dst_dir / v.image.name
    b.migrate_map.write_text(f"# test\n{src_dir}/ {dst_dir}/\n")
    key = shared / f"{v.name}.key"
    vmlib.run(["sh", "-c", f"umask 077; head -c 32 /dev/urandom > {key}"])
    try:
        v.define(a, "--key-file", str(key))
        assert vmlib.section_info(v.image, "tpm-permall")["encrypted"] is True
        with Image.open(str(v.image), kek=Kek(key.read_bytes())) as img:
            v.passphrase = img.vtpm_passphrase()
        v.start(a)
        v.boot_to_shell(a)
        v.setvar(a, "BeforeCopy", "in-the-copy")
        ek = v.staged_ek(a)
        r = json.loads(vmlib.nvmgr("migrate-image", v.image, copy, "--output", "json").stdout)
        assert r["runner"]["host"] == a.name and r["resealed"] == ["uefi-vars"]
        vmlib.nvmgr("check", copy, "--key-file", key)
        assert v.vars(copy, "--key-file", str(key)) == {"BeforeCopy": "in-the-copy"}
        v.setvar(a, "AfterCopy", "from-the-stream")  # only the migration stream carries it
        # swtpm encrypts the TPM state with the domain's vTPM secret: the destination's
        # libvirtd needs it before the migration starts its swtpm (derived from the copy).
        got = json.loads(vmlib.nvmgr("vtpm-secret", copy, "--key-file", key, "--connect",
                                     b.uri, "--output", "json").stdout)
        assert got["domain_uuid"] == v.uuid, got

        mark_a, mark_b = len(a.hook_log_lines()), len(b.hook_log_lines())
        v.migrate(a, b, shared)
        assert f"image path {v.image} -> {copy}" in b.wait_hook_log(
            rf"{v.name} migrate begin: ", after=mark_b)
        line = b.wait_hook_log(rf"{v.name} prepare begin: ", after=mark_b)
        assert f"of {copy};" in line and "owner run" in line, line  # an ordinary start
        a.wait_hook_log(rf"{v.name} release end: ", after=mark_a)
        assert runner_host(v.info(copy)) == b.name and v.in_use(copy)
        assert v.info()["runner"] is None  # the source's own copy, stale now
        assert not (a.swtpm_dir(v.uuid) / "tpm2-00.permall").exists()

        b.virsh("destroy", v.name)
        assert "collected ['tpm-permall']" in b.wait_hook_log(
            rf"{v.name} release end: ", after=mark_b)
        assert v.vars(copy, "--key-file", str(key)) == {"BeforeCopy": "in-the-copy",
                                                        "AfterCopy": "from-the-stream"}
        assert v.ek(copy, "--key-file", str(key)) == ek
        vmlib.nvmgr("check", copy, "--key-file", key)
        assert not v.in_use(copy) and v.info(copy)["runner"] is None
    finally:
        b.migrate_map.unlink(missing_ok=True)


def test_save_restore_managedsave_and_a_libvirtd_restart_keep_the_state(
        cluster: tuple[Host, Host, Path], tmp_path: Path) -> None:
    """On one host (the harness's, so its libvirtd may be restarted)."""
    a, _b, shared = cluster
    v = GuestVM("h4-save", shared / f"h4-{uuid.uuid4().hex[:8]}.nvram", tmp_path)
    v.define(a)
    v.start(a)
    v.boot_to_shell(a)
    v.setvar(a, "BeforeSave", "one")
    ek = v.staged_ek(a)

    # virsh save: the VM stops (release collects), restore starts it from the file.
    mark = len(a.hook_log_lines())
    saved = a.path("/var/lib/libvirt/qemu/save") / f"{v.name}.save"
    a.virsh("save", v.name, str(saved))
    assert "collected ['tpm-permall']" in a.wait_hook_log(rf"{v.name} release end: ", after=mark)
    assert not v.in_use() and v.info()["runner"] is None
    vmlib.nvmgr("check", v.image)
    assert v.vars() == {"BeforeSave": "one"} and v.ek() == ek
    a.virsh("restore", str(saved))
    saved.unlink()
    assert "owner run" in a.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert v.in_use() and runner_host(v.info()) == a.name
    v.setvar(a, "AfterRestore", "two")

    # libvirtd restarts while the VM runs: reconnect marks the image in use again.
    mark = len(a.hook_log_lines())
    a.restart_libvirtd()
    assert "marked in use" in a.wait_hook_log(rf"{v.name} reconnect begin: ", after=mark)
    assert a.state(v.name) == "running" and v.in_use()
    v.setvar(a, "AfterRestart", "three")

    # managedsave, then start: the same round trip through libvirt's own save file.
    mark = len(a.hook_log_lines())
    a.virsh("managedsave", v.name)
    a.wait_hook_log(rf"{v.name} release end: collected", after=mark)
    assert not v.in_use()
    a.virsh("start", v.name)
    a.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert a.state(v.name) == "running"
    v.setvar(a, "AfterManagedSave", "four")
    a.virsh("destroy", v.name)
    a.wait_hook_log(rf"{v.name} release end: collected", after=mark + 2)
    assert v.vars() == {"BeforeSave": "one", "AfterRestore": "two", "AfterRestart": "three",
                        "AfterManagedSave": "four"}
    assert v.ek() == ek
    vmlib.nvmgr("check", v.image)
    assert not v.in_use() and v.info()["runner"] is None
