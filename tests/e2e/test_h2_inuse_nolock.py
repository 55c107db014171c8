"""A running VM whose QEMU takes no image lock: the in-use mark still refuses writes.

QEMU's OFD lock on the image is invisible in some set-ups (``locking=off``; a
container whose private /dev lacks /dev/null).  Here the domain's emulator is
a wrapper that starts the real QEMU with ``"locking":"off"`` on nvmgr's file
node, so nothing but the in-use mark the prepare hook set tells nvmgr that
the VM runs: ``put``, ``remove`` and ``resize`` of the live UEFI section are
refused with exit 7 naming ``--force``; ``--force`` overrides; after the VM
stops, the release reseals and clears the mark and writes need no force.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nvmgr.storage.base import qemu_holds_write

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

WRAPPER = """#!/bin/bash
# QEMU without image locking on nvmgr's file node (a test of nvmgr's in-use mark).
args=()
for a in "$@"; do
  case "$a" in
    *'"node-name":"nvmgr-file"'*) a="${a/\\"driver\\":\\"file\\",/\\"driver\\":\\"file\\",\\"locking\\":\\"off\\",}" ;;
  esac
  args+=("$a")
done
exec /usr/bin/qemu-system-x86_64 "${args[@]}"
"""


def test_the_in_use_mark_refuses_writes_when_qemu_takes_no_lock(vm: MakeVM,
                                                                 tmp_path: Path) -> None:
    v = vm("h2-nolock")
    vmlib.SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
    wrapper = vmlib.SOCK_ROOT / f"{v.name}-qemu"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    v.extra_files.append(wrapper)
    xml = re.sub(r"<emulator>[^<]*</emulator>", f"<emulator>{wrapper}</emulator>",
                 v.xml_path.read_text())
    v.xml_path.write_text(xml)
    v.define()
    v.start()
    args = vmlib.qemu_cmdline(v.name)
    assert any('"locking":"off"' in a and "nvmgr-file" in a for a in args), args
    assert not qemu_holds_write(str(v.image)), "QEMU holds a lock: the test would prove nothing"
    assert v.section("uefi-vars")["dirty"] is True
    data = tmp_path / "vars.bin"
    data.write_bytes(os.urandom(4096))
    for cmd in (["put", "--domain", v.name, "uefi-vars", data],
                ["remove", "--domain", v.name, "uefi-vars"],
                ["resize", "--domain", v.name, "uefi-vars", "64K"]):
        p = vmlib.nvmgr(*cmd, check=False)
        assert p.returncode == 7, p
        assert "marked in use by a running VM" in p.stderr and "--force" in p.stderr, p.stderr
    assert v.state() == "running"
    p = vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", data, "--force", check=False)
    assert p.returncode == 0, p.stderr
    assert v.section("uefi-vars")["dirty"] is True, "a forced write keeps the mark"
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ")
    assert v.section("uefi-vars")["dirty"] is False
    vmlib.nvmgr("check", v.image)
    vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", data)  # stopped: no force needed
    assert v.get("uefi-vars")[:4096] == data.read_bytes()
