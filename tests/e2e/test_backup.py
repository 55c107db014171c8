"""nvmgr backup of a running VM while its guest writes UEFI variables, and restore.

The guest is OVMF's shell on a serial socket: ``setvar`` writes a non-volatile
variable through the firmware's own variable driver (into the pflash slice of
the image) while backups are taken.  Each backup must check, hold a varstore
that parses, hold one of the values the guest wrote (never a torn mix), and
the guest's TPM state; restoring one into the stopped VM brings those back.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

GUID = "6e766d67-7262-6b00-8000-000000000001"
VAR = "NvmgrBackupTest"


def _var_value(varstore: Path, workdir: Path) -> str | None:
    """The ASCII value of the test variable in *varstore*, or None (virt-fw-vars' JSON)."""
    out = workdir / "vars.json"
    out.unlink(missing_ok=True)
    vmlib.run([vmlib.VIRT_FW_VARS, "-i", varstore, "--output-json", out])
    for var in json.loads(out.read_text())["variables"]:
        if var["name"] == VAR and var["guid"].lower() == GUID:
            return bytes.fromhex(var["data"]).decode("ascii", "replace")
    return None


def _section_bytes(image: Path, section: str, workdir: Path, *key: str) -> bytes:
    out = workdir / f"{image.name}.{section}"
    out.unlink(missing_ok=True)
    vmlib.nvmgr("get", image, section, "-o", out, *key)
    return out.read_bytes()


def test_backup_of_a_running_vm_while_the_guest_writes_variables_and_restore(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("backup", serial_socket=True)
    v.define()
    v.start()
    assert v.socket is not None
    written: list[str] = []
    backups: list[tuple[Path, dict[str, object]]] = []
    with vmlib.Shell(v.socket) as sh:
        sh.wait_prompt(vmlib.serial_log(v.name), 90)

        def writer() -> None:
            for i in range(8):
                value = f"value-{i:03d}"
                out = sh.command(f'setvar {VAR} -guid {GUID} -nv -bs ="{value}"')
                assert "rror" not in out, out
                written.append(value)

        t = threading.Thread(target=writer)
        t.start()
        try:
            for i in range(4):  # while the guest writes
                out = tmp_path / f"during-{i}.nvram"
                r = json.loads(vmlib.nvmgr("backup", "--domain", v.name, out,
                                           "--output", "json").stdout)
                backups.append((out, r))
        finally:
            t.join(300)
        assert len(written) == 8
        last = tmp_path / "last.nvram"  # after the last write returned
        backups.append((last, json.loads(vmlib.nvmgr("backup", "--domain", v.name, last,
                                                     "--output", "json").stdout)))
        assert v.state() == "running"  # resumed after every backup
        assert sh.command("echo still-here").count("still-here") >= 1

    image_uuid = vmlib.info(v.image)["image_uuid"]
    print("guest paused (ms):", [r["paused_ms"] for _, r in backups])
    for path, r in backups:
        assert r["running"] is True and isinstance(r["paused_ms"], float), r
        assert r["tpm_files"] and r["sections"] == ["uefi-vars"], r
        vmlib.nvmgr("check", path)  # every crc32, both header copies
        info = vmlib.info(path)
        assert info["image_uuid"] != image_uuid and info["domain_uuid"] == v.uuid
        varstore = tmp_path / f"{path.name}.vars"
        varstore.write_bytes(_section_bytes(path, "uefi-vars", tmp_path))
        vmlib.uefi_vars(varstore)  # parses as a varstore: no torn firmware write
        got = _var_value(varstore, tmp_path)
        assert got is None or got in written, (path, got)  # one value, never a mix
    last_vars = tmp_path / "last.vars"
    last_vars.write_bytes(_section_bytes(last, "uefi-vars", tmp_path))
    assert _var_value(last_vars, tmp_path) == written[-1]
    permall = _section_bytes(last, "tpm-permall", tmp_path)
    ek_backup, _ = vmlib.read_ek(permall, tmp_path)

    # A restore into the stopped VM, after its state was lost.
    assert vmlib.nvmgr("restore", "--domain", v.name, last, check=False).returncode == 7
    v.destroy()
    template = tmp_path / "blank.vars"
    template.write_bytes(bytes(len(last_vars.read_bytes())))
    vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", template)
    vmlib.nvmgr("put", "--domain", v.name, "tpm-permall", "/dev/null")
    r = json.loads(vmlib.nvmgr("restore", "--domain", v.name, last, "--output", "json").stdout)
    assert {"tpm-permall", "uefi-vars"} <= set(r["restored"]) and not r["skipped"], r
    assert v.get("uefi-vars") == last_vars.read_bytes()
    assert v.get("tpm-permall") == permall
    vmlib.nvmgr("check", v.image)
    v.start()  # boots on the restored state; release collects the TPM back
    v.wait_for_shell(90)
    v.destroy()
    vars_after = tmp_path / "after.vars"
    vars_after.write_bytes(v.get("uefi-vars"))
    assert _var_value(vars_after, tmp_path) == written[-1]
    ek_after, _ = vmlib.read_ek(v.get("tpm-permall"), tmp_path)
    assert ek_after == ek_backup


def test_backup_refuses_to_overwrite_and_restore_refuses_a_corrupt_backup(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("backup-bad")
    v.define()
    out = tmp_path / "b.nvram"
    r = json.loads(vmlib.nvmgr("backup", "--domain", v.name, out, "--output", "json").stdout)
    assert r["running"] is False and r["paused_ms"] is None, r
    before = out.read_bytes()
    p = vmlib.nvmgr("backup", "--domain", v.name, out, check=False)
    assert p.returncode == 2 and "already exists" in p.stderr, p
    assert out.read_bytes() == before
    # Damage the backup's vars: restore checks the whole backup before writing anything.
    off = int(vmlib.section_info(out, "uefi-vars")["offset"])  # type: ignore[call-overload]
    with open(out, "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff\x00garbage")
    image_before = vmlib.sha256(v.image)
    p = vmlib.nvmgr("restore", "--domain", v.name, out, check=False)
    assert p.returncode == 4 and re.search(r"uefi-vars.*corrupt", p.stderr), p
    assert vmlib.sha256(v.image) == image_before


def test_snapshot_of_a_running_vm_and_revert_with_vars_and_tpm(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("snap", serial_socket=True)
    v.define()
    v.start()
    assert v.socket is not None
    with vmlib.Shell(v.socket) as sh:
        sh.wait_prompt(vmlib.serial_log(v.name), 90)
        assert "rror" not in sh.command(f'setvar {VAR} -guid {GUID} -nv -bs ="before"')
        r = json.loads(vmlib.nvmgr("snapshot", "--domain", v.name, "create", "s1",
                                   "--output", "json").stdout)
        assert r["running"] is True and r["paused_ms"] is not None, r
        assert "rror" not in sh.command(f'setvar {VAR} -guid {GUID} -nv -bs ="after"')
    p = vmlib.nvmgr("snapshot", "--domain", v.name, "revert", "s1", check=False)
    assert p.returncode == 7, p  # not while it runs
    v.destroy()
    now = tmp_path / "now.vars"
    now.write_bytes(v.get("uefi-vars"))
    assert _var_value(now, tmp_path) == "after"
    listed = json.loads(vmlib.nvmgr("snapshot", "--domain", v.name, "list",
                                    "--output", "json").stdout)["snapshots"]
    assert [(s["name"], s["kind"]) for s in listed] == [("s1", "stored")], listed
    snap_file = Path(str(listed[0]["path"]))
    vmlib.nvmgr("check", snap_file)
    tpm_in_snapshot = _section_bytes(snap_file, "tpm-permall", tmp_path)
    assert len(tpm_in_snapshot) > 1000
    vmlib.nvmgr("put", "--domain", v.name, "tpm-permall", "/dev/null")  # the TPM state lost

    vmlib.nvmgr("snapshot", "--domain", v.name, "revert", "s1")
    back = tmp_path / "back.vars"
    back.write_bytes(v.get("uefi-vars"))
    assert _var_value(back, tmp_path) == "before"
    assert v.get("tpm-permall") == tpm_in_snapshot
    vmlib.nvmgr("check", v.image)
    p = vmlib.nvmgr("snapshot", "--domain", v.name, "create", "s1", check=False)
    assert p.returncode == 2 and "already" in p.stderr, p
    p = vmlib.nvmgr("snapshot", "--domain", v.name, "create", "../escape", check=False)
    assert p.returncode == 2, p
    vmlib.nvmgr("snapshot", "--domain", v.name, "delete", "s1")
    assert json.loads(vmlib.nvmgr("snapshot", "--domain", v.name, "list",
                                  "--output", "json").stdout)["snapshots"] == []
    v.extra_files.append(snap_file)
    # Stored snapshots go with the image: a new domain of the same name starts clean.
    vmlib.nvmgr("snapshot", "--domain", v.name, "create", "s2")
    r = json.loads(vmlib.nvmgr("undefine", v.name, "--remove-nvram", "--output", "json").stdout)
    assert r["image_removed"] and r["snapshots_removed"] == str(snap_file.parent), r
    assert not snap_file.parent.exists()
