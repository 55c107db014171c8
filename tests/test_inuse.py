"""The in-use mark and the administrator's repair of live sections.

A live section (UEFI vars, ``block``) belongs to the guest while its VM runs.
QEMU's own image lock is one sign of that; the in-use mark the prepare hook
sets is the other, and the one that still counts where QEMU takes no lock
(``locking=off``, a private /dev without /dev/null): writes to a marked
section are refused (exit 7) unless ``--force``.  ``nvmgr check --repair
--yes`` reseals live sections whose crc no longer matches (their bytes are
the guest's own) and clears marks a crash left behind; it never touches the
sections nvmgr writes itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import RunCli

from nvmgr.errors import BusyError
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image

SPECS = [SectionSpec("efivars", 16384, Binding.PFLASH),
         SectionSpec("vtpm", 8192, Binding.TPM),
         SectionSpec("eeprom", 512, Binding.OPAQUE)]
VARS = os.urandom(16384)


def make(path: Path, *, in_use: bool = True) -> Path:
    with Image.create(str(path), SPECS) as img:
        img.put("efivars", VARS)
        img.put("vtpm", b"tpm state")
        if in_use:
            img.set_in_use(["efivars"], True)  # what the prepare hook does
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest_writes(path: Path, section: str, data: bytes, at: int = 0) -> None:
    """Bytes written into a live slice behind nvmgr's back, as QEMU does."""
    with Image.open(str(path)) as img:
        off = img.section(section).offset
    with open(path, "r+b") as f:
        f.seek(off + at)
        f.write(data)


def test_a_marked_live_section_refuses_writes_without_force(tmp_path: Path) -> None:
    img_path = make(tmp_path / "vm.nvram")
    before = sha(img_path)
    with Image.open(str(img_path), writable=True) as img:
        with pytest.raises(BusyError, match="marked in use by a running VM.*--force"):
            img.put("efivars", b"\1" * 16384)
        with pytest.raises(BusyError, match="marked in use"):
            img.remove("efivars")
        with pytest.raises(BusyError, match="marked in use"):
            img.resize_section("efivars", 8192)
        img.put("eeprom", b"other sections stay writable")
    with Image.open(str(img_path)) as img:
        assert img.get("efivars") == VARS
    assert sha(img_path) != before  # only the eeprom put landed
    with Image.open(str(img_path), writable=True) as img:
        img.put("efivars", b"\2" * 16384, force=True)
        assert img.section("efivars").dirty, "a forced write keeps the mark"
        assert img.get("efivars") == b"\2" * 16384


def test_cli_put_on_a_marked_section_exits_7_naming_the_ways_out(
        tmp_path: Path, nvmgr: RunCli) -> None:
    img_path = make(tmp_path / "vm.nvram")
    data = tmp_path / "vars.bin"
    data.write_bytes(b"\3" * 16384)
    before = sha(img_path)
    p = nvmgr("put", img_path, "efivars", data)
    err = p.stderr.decode()
    assert p.returncode == 7, err
    assert "efivars" in err and "--force" in err and f"nvmgr check {img_path} --repair --yes" in err
    assert sha(img_path) == before
    p = nvmgr("put", img_path, "efivars", data, "--force")
    assert p.returncode == 0, p.stderr.decode()
    assert nvmgr("get", img_path, "efivars").stdout == data.read_bytes()


def test_repair_needs_the_administrators_yes(tmp_path: Path, nvmgr: RunCli) -> None:
    img_path = make(tmp_path / "vm.nvram")
    before = sha(img_path)
    for args in (["--repair"], ["--yes"]):
        p = nvmgr("check", img_path, *args)
        assert p.returncode == 2 and "--repair --yes" in p.stderr.decode(), p.stderr.decode()
    assert sha(img_path) == before


def test_a_live_section_off_its_crc_is_named_and_repaired(tmp_path: Path, nvmgr: RunCli) -> None:
    img_path = make(tmp_path / "vm.nvram", in_use=False)
    guest_writes(img_path, "efivars", b"a variable the guest wrote", at=4096)
    p = nvmgr("check", img_path, "-O", "json")
    assert p.returncode == 4
    r = json.loads(p.stdout)
    assert r["repairable"] == ["efivars"]
    assert f"nvmgr check {img_path} --repair --yes" in r["hint"]
    text = nvmgr("check", img_path).stdout.decode()
    assert "hint:" in text and "--repair --yes" in text
    p = nvmgr("check", img_path, "--repair", "--yes", "-O", "json")
    assert p.returncode == 0, p.stdout.decode()
    assert json.loads(p.stdout)["repaired"] == ["efivars"]
    got = nvmgr("get", img_path, "efivars").stdout
    assert got[4096:4096 + 26] == b"a variable the guest wrote"
    assert got[:4096] == VARS[:4096]
    assert nvmgr("check", img_path).returncode == 0


def test_repair_never_reseals_what_nvmgr_wrote(tmp_path: Path, nvmgr: RunCli) -> None:
    img_path = make(tmp_path / "vm.nvram", in_use=False)
    guest_writes(img_path, "vtpm", b"rot")
    p = nvmgr("check", img_path, "--repair", "--yes", "-O", "json")
    assert p.returncode == 4
    r = json.loads(p.stdout)
    assert r["repaired"] == [] and r["repairable"] == []
    assert any("vtpm is corrupted" in e for e in r["errors"])
    assert nvmgr("get", img_path, "vtpm").returncode == 4


def test_repair_clears_a_mark_a_crash_left(tmp_path: Path, nvmgr: RunCli) -> None:
    img_path = make(tmp_path / "vm.nvram")
    guest_writes(img_path, "efivars", b"last write before the crash")
    p = nvmgr("check", img_path, "--repair", "--yes")
    assert p.returncode == 0, p.stdout.decode()
    with Image.open(str(img_path)) as img:
        assert not img.section("efivars").dirty
        assert img.get("efivars").startswith(b"last write before the crash")
    data = tmp_path / "vars.bin"
    data.write_bytes(VARS)
    assert nvmgr("put", img_path, "efivars", data).returncode == 0


def test_reseal_makes_the_guests_writes_durable_before_its_commit(tmp_path: Path) -> None:
    """The release reseal flushes first: a crc is never committed over bytes
    that a power loss could still take away (see tests/test_power.py)."""
    from test_crash import Faults, injected

    img_path = make(tmp_path / "vm.nvram")
    guest_writes(img_path, "efivars", b"x")
    hook = Faults()
    with injected(hook), Image.open(str(img_path), writable=True) as img:
        img.reseal(["efivars"])
    assert [k for k, _, _ in hook.trace] == ["flush", "write", "flush"]
