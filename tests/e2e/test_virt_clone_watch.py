"""virt-clone with the watcher running: the clone starts on its own image (issue 9, part 3).

``virt-clone --auto-clone`` copies the XML (a new name, UUID and MAC) and so
the nvmgr metadata that names the original's image.  The watcher sees the
define event and gives the clone its own image: vars copied, a fresh TPM, no
manual step.  Without the watcher the start is refused, naming the command
that fixes it, and that command works.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM
from .watchlib import watching

pytestmark = pytest.mark.e2e


def _virt_clone(original: str, name: str) -> None:
    if shutil.which("virt-clone") is None:
        pytest.skip("virt-clone is not installed (Debian package virtinst; scripts/setup)")
    p = subprocess.run(["virt-clone", "--original", original, "--name", name, "--auto-clone"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def _started_original(vm: MakeVM) -> vmlib.VM:
    """An original whose TPM is manufactured: swtpm_setup runs at its start,
    before QEMU, and release collects it (no need to boot it through)."""
    orig = vm("vclone-orig", tpm=True)
    orig.define()
    mark = len(vmlib.hook_log_lines())
    orig.start()
    orig.destroy()
    vmlib.wait_hook_log(rf"{orig.name} release end: ", after=mark)
    assert orig.section("tpm-permall")["length"]
    return orig


def test_virt_clone_with_the_watcher_starts_on_its_own_image(vm: MakeVM, tmp_path: Path) -> None:
    orig = _started_original(vm)
    orig_sha = vmlib.sha256(orig.image)
    orig_vars = orig.get("uefi-vars")
    clone = vm("vclone")  # its name, and its cleanup; virt-clone makes the domain
    with watching() as w:
        _virt_clone(orig.name, clone.name)
        clone.uuid = vmlib.virsh("domuuid", clone.name).stdout.strip()
        line = w.wait_line(f"{clone.name}: reconciled", stream="out")
        print(line)
        meta = vmlib.virsh("dumpxml", "--inactive", clone.name).stdout
        assert f'image="{clone.image}"' in meta and str(orig.image) not in meta.split(
            "<nvmgr:libvirt-nvram")[0].split("<metadata>")[-1]
        info = vmlib.info(clone.image)
        assert info["domain_uuid"] == clone.uuid
        assert info["image_uuid"] != vmlib.info(orig.image)["image_uuid"]
        assert clone.get("uefi-vars") == orig_vars  # vars copied
        assert clone.section("tpm-permall")["length"] == 0  # a fresh TPM
        # No manual step: virsh start boots it (virt-clone kept the original's serial
        # log path: the clone writes there).
        vmlib.start(clone.name)
        try:
            vmlib.wait_for_shell(clone.name, 90, log=vmlib.serial_log(orig.name))
        finally:
            vmlib.destroy(clone.name)
    assert vmlib.sha256(orig.image) == orig_sha  # the original was never touched
    ek_orig = vmlib.read_ek(orig.get("tpm-permall"), tmp_path)
    ek_clone = vmlib.read_ek(clone.get("tpm-permall"), tmp_path)
    assert ek_clone[0] and ek_orig[0] != ek_clone[0]  # its own TPM identity


def test_without_the_watcher_the_refusal_names_the_command_that_fixes_it(
        vm: MakeVM, tmp_path: Path) -> None:
    orig = vm("vclone-orig2", tpm=True)
    orig.define()
    orig_sha = vmlib.sha256(orig.image)
    clone = vm("vclone2")
    _virt_clone(orig.name, clone.name)
    clone.uuid = vmlib.virsh("domuuid", clone.name).stdout.strip()
    p = vmlib.start(clone.name, check=False)
    assert p.returncode != 0 and vmlib.state(clone.name) == "shut off"
    fix = f"nvmgr reconcile {clone.name}"
    assert fix in p.stderr, p.stderr
    assert "run nvmgr define" not in p.stderr
    assert vmlib.sha256(orig.image) == orig_sha and not clone.image.exists()
    out = vmlib.nvmgr(*fix.split()[1:]).stdout  # the command the refusal names
    assert f"{clone.name}: reconciled" in out, out
    assert vmlib.info(clone.image)["domain_uuid"] == clone.uuid
    vmlib.start(clone.name)  # now it starts (its own image); no need to boot it through
    vmlib.destroy(clone.name)
    assert vmlib.sha256(orig.image) == orig_sha
