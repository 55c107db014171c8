"""Undefine behind nvmgr's back, then define again: orphans, --adopt and --fresh (issue 9, part 2).

``virsh undefine VM`` succeeds without a flag (the loader is stateless) and
leaves the image.  A new domain of the same name then finds an orphan at its
image path: nvmgr refuses with the two choices (never the command that just
failed), ``--adopt`` takes the old state (the same vars and TPM), ``--fresh``
moves the old image aside, kept, and names it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM
from .watchlib import watching

pytestmark = pytest.mark.e2e


def _orphans() -> dict[str, dict[str, object]]:
    out = json.loads(vmlib.nvmgr("images", "--orphans", "--output", "json").stdout)
    return {str(e["path"]): e for e in out["images"]}


def test_adopt_takes_the_old_vars_and_tpm(vm: MakeVM, tmp_path: Path) -> None:
    old = vm("orph-adopt", tpm=True)
    old.define()
    old.start()
    try:
        old.wait_for_shell(90)
    finally:
        old.destroy()
    vars_before, tpm_before = old.get("uefi-vars"), old.get("tpm-permall")
    assert tpm_before  # manufactured at the first start
    image_uuid = vmlib.info(old.image)["image_uuid"]
    vmlib.virsh("undefine", old.name)  # no flag needed: the loader is stateless
    assert old.image.is_file() and not vmlib.exists(old.name)
    entry = _orphans()[str(old.image)]
    assert entry["state"] == "orphaned" and entry["domain_uuid"] == old.uuid
    assert entry["orphaned_since"] is None  # no watcher ran: not recorded, still found

    new_uuid = str(uuid.uuid4())
    new_xml = tmp_path / "new.xml"
    new_xml.write_text(vmlib.domain_xml(old.name, new_uuid, tpm=True))
    sha = vmlib.sha256(old.image)
    p = vmlib.nvmgr("define", new_xml, check=False)
    assert p.returncode == 7, p.stderr
    assert f"'nvmgr define {new_xml} --adopt'" in p.stderr, p.stderr
    assert f"'nvmgr define {new_xml} --fresh'" in p.stderr
    assert "run nvmgr define" not in p.stderr and "nvmgr define on this domain" not in p.stderr
    assert vmlib.sha256(old.image) == sha and not vmlib.exists(old.name)  # nothing changed

    out = json.loads(vmlib.nvmgr("define", new_xml, "--adopt", "--output", "json").stdout)
    assert out["adopted"] is True and out["image"] == str(old.image)
    info = vmlib.info(old.image)
    assert info["domain_uuid"] == new_uuid and info["image_uuid"] == image_uuid
    assert info["orphaned"] is None
    old_uuid, old.uuid = old.uuid, new_uuid  # the cleanup's
    shutil.rmtree(vmlib.SWTPM_ROOT / old_uuid, ignore_errors=True)
    assert old.get("uefi-vars") == vars_before and old.get("tpm-permall") == tpm_before
    assert str(old.image) not in _orphans()
    mark = len(vmlib.hook_log_lines())
    old.start()  # the new domain starts on the old state (the hook accepts it as its own)
    old.destroy()
    vmlib.wait_hook_log(rf"{old.name} release end: ", after=mark)
    assert old.get("uefi-vars") == vars_before
    ek_before = vmlib.read_ek(tpm_before, tmp_path)
    assert vmlib.read_ek(old.get("tpm-permall"), tmp_path) == ek_before  # the same TPM


def test_fresh_with_the_watcher_moves_the_orphan_aside(vm: MakeVM, tmp_path: Path) -> None:
    old = vm("orph-fresh", tpm=True, metadata_attrs={"format": "raw"})
    with watching() as w:
        old.define()
        w.wait_line(f"{old.name}: ", stream="out")
        image_uuid = vmlib.info(old.image)["image_uuid"]
        vmlib.virsh("undefine", old.name)
        w.wait_line(f"{old.name}: undefined; its image {old.image} recorded as orphaned",
                    stream="out")
        sha = vmlib.sha256(old.image)  # with its record
        record = vmlib.info(old.image)["orphaned"]
        assert record["domain_name"] == old.name and record["since"] > 0  # type: ignore[index]

        # virsh define of a new domain of that name: the watcher does not take
        # the orphan's state on its own; it says what to run.
        new_uuid = str(uuid.uuid4())
        f = tmp_path / "new.xml"
        f.write_text(vmlib.domain_xml(old.name, new_uuid, tpm=True,
                                      metadata_attrs={"format": "raw"}))
        vmlib.virsh("define", str(f))
        old.uuid = new_uuid
        line = w.wait_line(f"{old.name}: error:", stream="out")
        assert f"'nvmgr reconcile {old.name} --adopt'" in line, line
        assert f"'nvmgr reconcile {old.name} --fresh'" in line
        assert vmlib.sha256(old.image) == sha

        out = json.loads(vmlib.nvmgr("reconcile", old.name, "--fresh", "--output",
                                     "json").stdout)
        assert out["domains"][0]["status"] == "reconciled"
    aside = [p for p in old.image.parent.glob(f"{old.name}.orphan-*.nvram")]
    assert len(aside) == 1 and out["domains"][0]["moved_aside"] == str(aside[0])
    old.extra_files.append(aside[0])
    assert vmlib.sha256(aside[0]) == sha  # kept as it was
    info = vmlib.info(old.image)
    assert info["domain_uuid"] == new_uuid and info["image_uuid"] != image_uuid
    assert old.section("tpm-permall")["length"] == 0  # a new image: a new TPM
    assert _orphans()[str(aside[0])]["state"] == "orphaned"
    assert str(old.image) not in _orphans()


def test_nvmgr_undefine_keep_nvram_records_the_orphan(vm: MakeVM) -> None:
    v = vm("orph-undef", tpm=False)
    v.define()
    out = json.loads(vmlib.nvmgr("undefine", v.name, "--keep-nvram", "--output", "json").stdout)
    assert out["orphaned"] is True and out["image"] == str(v.image) and v.image.is_file()
    record = vmlib.info(v.image)["orphaned"]
    assert record["domain_name"] == v.name  # type: ignore[index]
    entry = _orphans()[str(v.image)]
    assert (entry["domain"], entry["domain_uuid"]) == (v.name, v.uuid)
    assert entry["orphaned_since"]
    # The same domain back (its own UUID): no choice to make, the record goes.
    vmlib.nvmgr("define", v.xml_path)
    assert vmlib.info(v.image)["orphaned"] is None
    assert str(v.image) not in _orphans()
