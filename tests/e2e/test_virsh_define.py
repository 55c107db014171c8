"""The ways in that are not ``nvmgr define``: plain ``virsh define`` and ``virsh edit``.

A domain XML that asks for nvmgr (``<nvmgr:nvram/>`` in its metadata) but was
defined by another tool is never silently left to libvirt's own nvram:

1. with ``nvmgr reconcile --all --watch`` running, the define event wires it
   (image, imported state, stateless loader, QEMU arguments) and ``virsh
   start`` boots OVMF with its vars in nvmgr's image;
2. without the watcher, the prepare hook refuses the start (exit 12, naming
   ``nvmgr reconcile NAME``) and writes nothing; after the reconcile it starts;
3. metadata added by ``virsh edit`` to a UEFI + TPM VM that has run on
   libvirt's own files: the watcher imports them, boot entries and the TPM's
   endorsement key unchanged.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

WIRED = "pflash1=nvmgr-uefi-vars"


def asking_for_nvmgr(xml: str) -> str:
    """*xml* with ``<nvmgr:nvram/>`` in its metadata and nothing else of nvmgr's."""
    root = etree.fromstring(xml.encode())
    md = root.find("metadata")
    if md is None:
        md = etree.Element("metadata")
        root.find("uuid").addnext(md)  # type: ignore[union-attr]
    etree.SubElement(md, f"{{{vmlib.NVMGR_NS}}}nvram", nsmap={"nvmgr": vmlib.NVMGR_NS})
    return etree.tostring(root, encoding="unicode")


def virsh_define(xml: str, path: Path) -> None:
    path.write_text(xml)
    vmlib.virsh("define", str(path))


def libvirt_vars(name: str) -> Path:
    return Path(f"/var/lib/libvirt/qemu/nvram/{name}_VARS.fd")


def inactive_xml(name: str) -> str:
    return vmlib.virsh("dumpxml", "--inactive", name).stdout


def wait_wired(name: str, timeout: float = 30) -> float:
    """Seconds until the persistent definition carries nvmgr's arguments."""
    t0 = time.monotonic()
    while WIRED not in inactive_xml(name):
        if time.monotonic() - t0 > timeout:
            raise vmlib.Failed(f"{name} was not wired within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def watcher(e2e_env: Path) -> Iterator[subprocess.Popen[str]]:
    """``nvmgr reconcile --all --watch``, as an administrator leaves it running."""
    proc = subprocess.Popen([vmlib.NVMGR, "reconcile", "--all", "--watch"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # registered for events (its first lines are the initial pass)
    assert proc.poll() is None, proc.communicate()
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err
        print(out)


def boot_entries(vars_file: Path) -> dict[str, str]:
    return {k: v for k, v in vmlib.uefi_vars(vars_file).items()
            if k.startswith(("Boot", "PlatformLang", "Lang"))}


def test_virsh_define_with_the_watcher_boots_on_the_image(
        vm: MakeVM, tmp_path: Path, watcher: subprocess.Popen[str]) -> None:
    v = vm("virsh-define")
    virsh_define(asking_for_nvmgr(v.xml), tmp_path / "asks.xml")
    took = wait_wired(v.name)
    print(f"wired {took:.2f} s after virsh define")
    assert v.image.is_file()
    template_vars = v.get("uefi-vars")
    assert boot_entries_of(template_vars, tmp_path) == {}  # OVMF's empty template

    mark = len(vmlib.hook_log_lines())
    v.start()
    try:
        v.wait_for_shell(90)
    finally:
        v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)
    written = v.get("uefi-vars")
    assert written != template_vars
    assert boot_entries_of(written, tmp_path)  # OVMF's writes, read out of nvmgr's image
    assert not libvirt_vars(v.name).exists()  # libvirt never made its own vars file


def boot_entries_of(data: bytes, tmp_path: Path) -> dict[str, str]:
    f = tmp_path / f"vars-{len(list(tmp_path.iterdir()))}.fd"
    f.write_bytes(data)
    return boot_entries(f)


def test_without_the_watcher_the_start_is_refused_until_reconcile(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("unwired")
    virsh_define(asking_for_nvmgr(v.xml), tmp_path / "asks.xml")
    time.sleep(0.5)
    assert WIRED not in inactive_xml(v.name)  # nothing wired it behind our back
    p = vmlib.start(v.name, check=False)
    assert p.returncode != 0 and vmlib.state(v.name) == "shut off"
    err = p.stderr
    assert f"nvmgr reconcile {v.name}" in err and v.name in err, err
    assert "not wired" in err
    assert not v.image.exists()
    assert not libvirt_vars(v.name).exists()  # not started on libvirt's own nvram either
    assert not (v.runtime_dir).exists()

    out = vmlib.nvmgr("reconcile", v.name).stdout
    assert f"{v.name}: reconciled" in out
    assert WIRED in inactive_xml(v.name) and v.image.is_file()
    v.start()
    try:
        v.wait_for_shell(90)
    finally:
        v.destroy()
    assert not libvirt_vars(v.name).exists()


def test_virsh_edit_of_a_vm_that_ran_imports_its_vars_and_tpm(
        vm: MakeVM, tmp_path: Path, watcher: subprocess.Popen[str]) -> None:
    v = vm("adopt")
    plain = tmp_path / "plain.xml"
    virsh_define(v.xml, plain)  # a UEFI + TPM VM as libvirt users have it today
    v.start()
    try:
        v.wait_for_shell(90)
    finally:
        v.destroy()
    own_vars = libvirt_vars(v.name)
    permall = v.swtpm_dir / "tpm2-00.permall"
    assert own_vars.is_file() and permall.is_file()
    entries = boot_entries(own_vars)
    assert entries  # OVMF wrote its boot entries into libvirt's file
    ek, cert = vmlib.read_ek(permall.read_bytes(), tmp_path)
    assert not v.image.exists()

    # virsh edit: the administrator adds <nvmgr:nvram/> to the metadata and saves.
    virsh_define(asking_for_nvmgr(inactive_xml(v.name)), tmp_path / "edited.xml")
    wait_wired(v.name)
    assert boot_entries_of(v.get("uefi-vars"), tmp_path) == entries
    ek_imported, cert_imported = vmlib.read_ek(v.get("tpm-permall"), tmp_path)
    assert (ek_imported, cert_imported) == (ek, cert)

    mark = len(vmlib.hook_log_lines())
    v.start()  # now on nvmgr's image: the same boot entries, the same TPM
    try:
        v.wait_for_shell(90)
    finally:
        v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: collected", after=mark)
    assert boot_entries_of(v.get("uefi-vars"), tmp_path) == entries
    assert vmlib.read_ek(v.get("tpm-permall"), tmp_path) == (ek, cert)

