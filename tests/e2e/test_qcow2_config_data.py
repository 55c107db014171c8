"""A running VM whose image is qcow2: ``attach --config --data`` and
``detach --remove-section`` write the image now, through QEMU's NBD export of
its ``nvmgr-image`` node (issue 7; they were exit 2 and exit 7).

A running UEFI+TPM VM with a qcow2 image and a non-live section ``fru0``:
``nvmgr attach --config --data FILE`` of a ``block`` section puts FILE's bytes
in the image now (a raw member beside it) and hot-plugs nothing; the next
start's QEMU serves those bytes from the section's node.  With that VM
running, ``nvmgr detach --section fru0 --config --remove-section`` removes
the section from the image; nothing else moved, no export is left, ``check``
passes after the stop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM
from .test_attach import STATE, _edit, _offsets, _peripherals, _write

pytestmark = pytest.mark.e2e


def _nodes(v: vmlib.VM) -> set[str]:
    return {n["node-name"] for n in vmlib.qmp(v.name, "query-named-block-nodes",  # type: ignore[union-attr]
                                               {"flat": True})}


def test_config_data_and_remove_section_on_a_running_qcow2_vm(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("qcow2-config", sections=[{"name": "fru0", "size": "4K"}])
    _edit(v, root_ports=2, native_hotplug=True)
    v.define("--format", "qcow2")
    v.start()
    old = _offsets(v.image)
    assert set(old) >= {"uefi-vars", "tpm-permall", "fru0"}
    data = os.urandom(48 << 10)
    blob = tmp_path / "state0.img"
    blob.write_bytes(data)

    out = json.loads(vmlib.nvmgr("attach", v.name, _write(tmp_path, "state0.xml", STATE),
                                 "--config", "--data", blob, "-O", "json").stdout)
    assert out["added"] == ["state0"] and not out["live"] and out["config"], out
    assert not out["deferred"] and not out["plugged"], out
    assert not {n for n in _nodes(v) if "state0" in n} and "nvmgr-state0" not in _peripherals(v)
    assert vmlib.qmp(v.name, "query-block-exports") == []
    info = vmlib.info(v.image)
    members = info["members"]
    assert isinstance(members, list) and len(members) == 1, info
    v.extra_files.append(Path(members[0]["path"]))
    now = _offsets(v.image)
    assert {k: now[k] for k in old} == old
    assert "nvmgr-state0" in vmlib.virsh("dumpxml", "--inactive", v.name).stdout

    # Still running: a non-live section removed from the image through the export.
    out = json.loads(vmlib.nvmgr("detach", v.name, "--section", "fru0", "--config",
                                 "--remove-section", "-O", "json").stdout)
    assert out["removed"] == ["fru0"] and not out["kept"], out
    assert vmlib.qmp(v.name, "query-block-exports") == []
    after = _offsets(v.image)
    assert "fru0" not in after and {k: after[k] for k in now if k != "fru0"} == {
        k: now[k] for k in now if k != "fru0"}
    assert "fru0" not in vmlib.virsh("dumpxml", "--inactive", v.name).stdout

    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
    v.start()  # the section's device at this boot, with the bytes written while it ran
    assert "nvmgr-state0" in _peripherals(v)
    assert vmlib.nbd_read(v.name, "nvmgr-state0", len(data), tmp_path) == data
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
