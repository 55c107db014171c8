"""One writer through a live migration: the hook calls of two hosts on one shared image.

libvirt's order (measured, ``../shared/DESIGN.md``): the destination gets
``migrate`` -> ``prepare`` -> ``started`` before any memory moves; the source
gets ``release`` after the destination resumed the guest; a failed or
cancelled migration gives the destination ``release`` and the source
nothing.  Each "host" here is its own swtpm state root and runtime root (the
per-host directories of a real host); swtpm and the guest are played by
writing the staged files and the live section's bytes.  The end-to-end
proof with two real libvirtd is ``tests/e2e/test_migrate.py``.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from pathlib import Path

import pytest

from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.plan import plan_domain
from nvmgr.hook import lifecycle, ownership
from nvmgr.hook.lifecycle import HookContext
from nvmgr.image.image import Image
from nvmgr.provision import staging

pytestmark = pytest.mark.usefixtures("host_independent")

NAME = "mig-vm"
UUID = "7b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0"
XML = f"""<domain type='qemu'>
  <name>{NAME}</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1" image='{{image}}'/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/{NAME}_VARS.fd</nvram>
  </os>
  <devices>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"""
PERMALL = "tpm2-00.permall"


class Host:
    """One host's view: its own swtpm state and runtime directories, the shared image."""

    def __init__(self, root: Path, xml: str) -> None:
        self.swtpm_root = root / "swtpm"
        self.runtime_root = root / "run"
        self.xml = xml

    def ctx(self, op: str, sub: str) -> HookContext:
        ctx = HookContext.of(NAME, op, sub, self.xml, parse_domain(self.xml.encode()),
                             staging.Users())
        assert ctx is not None
        return dataclasses.replace(ctx, swtpm_root=str(self.swtpm_root),
                                   runtime_root=str(self.runtime_root))

    def migrate(self) -> str:
        return lifecycle.migrate(self.ctx("migrate", "begin"), io.StringIO())

    def prepare(self) -> str:
        return lifecycle.prepare(self.ctx("prepare", "begin"))

    def release(self) -> str:
        return lifecycle.release(self.ctx("release", "end"))

    def reconnect(self) -> str:
        return lifecycle.reconnect(self.ctx("reconnect", "begin"))

    @property
    def staged(self) -> Path:
        return staging.tpm_state_dir(UUID, "2.0", str(self.swtpm_root)) / PERMALL

    def swtpm_writes(self, data: bytes) -> None:
        """What swtpm does: its state file changes (manufacture, or the migration stream)."""
        self.staged.parent.mkdir(parents=True, exist_ok=True)
        self.staged.write_bytes(data)

    @property
    def runtime(self) -> Path:
        return staging.runtime_dir(UUID, str(self.runtime_root))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "shared" / "vm.nvram"


@pytest.fixture
def hosts(tmp_path: Path, image: Path) -> tuple[Host, Host]:
    image.parent.mkdir()
    xml = XML.format(image=image)
    wired = qemuargs.rewrite_domain(xml, plan_domain(xml), str(image), "raw", UUID)
    return Host(tmp_path / "a", wired), Host(tmp_path / "b", wired)


def guest_writes_vars(image: Path, data: bytes) -> None:
    """What QEMU does with a live section: write its bytes in place."""
    with Image.open(str(image)) as img:
        off = img.section("uefi-vars").offset
    with open(image, "r+b") as f:
        f.seek(off)
        f.write(data)


def state(image: Path) -> tuple[str | None, str | None, bool, bytes]:
    """(runner host tag, incoming host tag, uefi-vars in use, tpm-permall) of the image."""
    with Image.open(str(image)) as img:
        d = img.directory
        permall = img.get("tpm-permall")
        return (d.runner.run.hex() if d.runner else None,
                d.incoming.run.hex() if d.incoming else None,
                img.section("uefi-vars").dirty, permall)


def run_id(host: Host) -> str | None:
    mine = ownership.my_run(host.runtime)
    return mine.hex() if mine else None


def test_a_completed_migration_hands_the_image_to_the_destination(
        hosts: tuple[Host, Host], image: Path) -> None:
    a, b = hosts
    assert "owner run" in a.prepare()
    ra = run_id(a)
    a.swtpm_writes(b"tpm state as the source ran it")  # first start: swtpm manufactured
    guest_writes_vars(image, b"var written on the source")
    assert state(image)[:3] == (ra, None, True)

    # Destination: migrate, prepare.  The source still runs and owns the image.
    before = image.read_bytes()
    b.migrate()
    line = b.prepare()
    rb = run_id(b)
    assert "incoming migration" in line and rb and rb != ra
    assert state(image)[:3] == (ra, rb, True)
    with Image.open(str(image)) as img:  # not one byte of any section changed
        for s in img.directory.sections:
            assert image.read_bytes()[s.offset:s.offset + s.reserved] == \
                before[s.offset:s.offset + s.reserved], s.name
    b.swtpm_writes(b"tpm state from the migration stream")
    guest_writes_vars(image, b"var written on the destination")

    # The source's release, after the destination resumed: hand over, seal nothing.
    line = a.release()
    assert "handed the image to" in line and "collected nothing" in line
    runner, incoming, in_use, permall = state(image)
    assert (runner, incoming, in_use) == (rb, None, True)
    assert permall == b""  # the source's TPM state was not collected over the newer one
    assert not a.staged.exists() and not a.runtime.exists()

    # The destination owns it: reconnect marks, release collects and seals.
    assert "marked in use" in b.reconnect()
    line = b.release()
    assert "collected ['tpm-permall']" in line and "resealed ['uefi-vars']" in line
    assert state(image) == (None, None, False, b"tpm state from the migration stream")
    with Image.open(str(image)) as img:
        assert img.check().ok
        assert img.get("uefi-vars").startswith(b"var written on the destination")


def test_a_failed_migration_leaves_the_source_the_owner_and_the_image_untouched(
        hosts: tuple[Host, Host], image: Path) -> None:
    a, b = hosts
    a.prepare()
    ra = run_id(a)
    a.swtpm_writes(b"the source's TPM")
    b.migrate()
    b.prepare()
    b.swtpm_writes(b"half a migration")
    guest_writes_vars(image, b"the source keeps writing")

    line = b.release()  # cancelled: only the destination hears of it
    assert "did not complete" in line and "collected nothing" in line
    runner, incoming, in_use, permall = state(image)
    assert (runner, incoming, in_use, permall) == (ra, None, True, b"")
    assert not b.staged.exists() and not b.runtime.exists()

    assert "marked in use" in a.reconnect()  # still the source's
    line = a.release()  # later, an ordinary stop on the source
    assert "collected ['tpm-permall']" in line
    assert state(image) == (None, None, False, b"the source's TPM")
    with Image.open(str(image)) as img:
        assert img.check().ok


def test_a_migrate_note_for_an_image_nobody_runs_is_an_ordinary_start(
        hosts: tuple[Host, Host], image: Path) -> None:
    """A copy made by ``nvmgr migrate-image`` runs nowhere: its destination owns it at once."""
    _a, b = hosts
    b.migrate()
    assert "owner run" in b.prepare()
    assert state(image)[:3] == (run_id(b), None, True)


def test_a_stale_migrate_note_is_not_used(hosts: tuple[Host, Host], image: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = hosts
    a.prepare()
    b.migrate()
    monkeypatch.setattr(ownership, "INCOMING_NOTE_TTL", -1.0)
    assert "took over from run" in b.prepare()  # a normal start (e.g. after a host crash)
    assert not (b.runtime / ownership.INCOMING_FILE).exists()


def test_a_source_started_before_ownership_existed_hands_over_too(
        hosts: tuple[Host, Host], image: Path) -> None:
    """An image in use with no runner (an older nvmgr prepared the running VM)."""
    a, b = hosts
    a.prepare()
    with Image.open(str(image), writable=True) as img:
        img.set_runner(None, None)
    (a.runtime / ownership.RUN_FILE).unlink()
    b.migrate()
    assert "incoming migration" in b.prepare()
    assert "handed the image to" in a.release()
    assert state(image)[:3] == (run_id(b), None, True)


def test_the_old_owner_leaves_the_image_alone_after_a_takeover(
        hosts: tuple[Host, Host], image: Path) -> None:
    a, b = hosts
    a.prepare()
    b.prepare()  # an ordinary start elsewhere took the image (a host presumed dead)
    assert "belongs to run" in a.reconnect()
    a.swtpm_writes(b"stale")
    line = a.release()
    assert "belongs to run" in line and "collected nothing" in line
    assert state(image)[:3] == (run_id(b), None, True)
    assert not a.staged.exists()


def test_runner_and_incoming_survive_the_directory_round_trip(image: Path) -> None:
    from nvmgr.format import codec
    from nvmgr.format.model import Runner

    image.parent.mkdir()
    with Image.create(str(image), []) as img:
        me, other = Runner(uuid.uuid4().bytes, "host-a"), Runner(uuid.uuid4().bytes, "h" * 255)
        img.set_runner(me, other)
        d = img.directory
    assert codec.decode_header(codec.encode_header(d), padded=False) == d
    with Image.open(str(image)) as img:
        assert (img.directory.runner, img.directory.incoming) == (me, other)
        assert img.directory.to_json()["runner"] == {"run": me.run.hex(), "host": "host-a"}


def test_migrate_image_copies_a_running_image_as_nobodys(
        hosts: tuple[Host, Host], image: Path, tmp_path: Path) -> None:
    """The not-shared case: the copy is sealed and unowned, so the destination's start
    owns it at once and the source's release keeps to the source's image."""
    import json
    import subprocess
    import sys

    a, b = hosts
    a.prepare()
    ra = run_id(a)
    guest_writes_vars(image, b"written before the copy")
    before = image.read_bytes()
    out = tmp_path / "dest" / "vm.nvram"
    out.parent.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nvmgr", "migrate-image", *args],
                              capture_output=True, text=True, check=False)

    r = cli(str(image), str(out), "--output", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["output"] == str(out) and got["resealed"] == ["uefi-vars"]
    assert got["runner"]["run"] == ra
    assert image.read_bytes() == before  # the source's image untouched
    assert state(out)[:3] == (None, None, False)
    with Image.open(str(out)) as img:
        assert img.check().ok
        assert img.get("uefi-vars").startswith(b"written before the copy")
    again = cli(str(image), str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert not list(out.parent.glob(".*nvmgr-tmp"))

    # The destination (its path map points at the copy) owns the copy from its start.
    b.xml = b.xml.replace(str(image), str(out))
    b.migrate()
    assert "owner run" in b.prepare()
    assert "collected nothing" in a.release()
    assert state(image)[:3] == (None, None, False)  # the source sealed its own, stale, copy
    assert state(out)[:3] == (run_id(b), None, True)


def test_migrate_image_copies_a_qcow2_image(tmp_path: Path) -> None:
    import os

    from nvmgr.format.layout import SectionSpec
    from nvmgr.format.model import Binding, Runner
    from nvmgr.image.handoff import copy_for_migration

    src, out = tmp_path / "vm.qcow2", tmp_path / "copy.qcow2"
    with Image.create(str(src), [SectionSpec("efivars", 8192, Binding.PFLASH)],
                      fmt="qcow2") as img:
        img.put("efivars", b"\1" * 8192)
        img.set_in_use(["efivars"], True)
        img.set_runner(Runner(os.urandom(16), "host-a"))
    r = copy_for_migration(str(src), str(out))
    assert r["format"] == "qcow2" and r["runner"]["host"] == "host-a"
    with Image.open(str(out)) as img:
        assert img.fmt == "qcow2" and img.check().ok
        assert img.directory.runner is None and not img.section("efivars").dirty
        assert img.get("efivars") == b"\1" * 8192
    with Image.open(str(src)) as img:  # the source as it was
        assert img.directory.runner is not None and img.section("efivars").dirty


def _front_end(tmp_path: Path, migrate_map: Path) -> Path:
    """The shipped hook front end, its runtime root and path map moved under *tmp_path*,
    and its Python made one that fails loudly (so a call that reaches it shows)."""
    from nvmgr import resources

    text = resources.read_text(resources.HOOK_FRONTEND)
    for old, new in (("RUNTIME_ROOT=/run/nvmgr", f"RUNTIME_ROOT={tmp_path / 'run'}"),
                     ("MIGRATE_MAP=/etc/nvmgr/migrate.map", f"MIGRATE_MAP={migrate_map}"),
                     ('PYTHON="${NVMGR_PYTHON:-python3}"', "PYTHON=false")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    hook = tmp_path / "hook"
    hook.write_text(text)
    hook.chmod(0o755)
    return hook


def test_the_front_end_notes_an_incoming_migration_without_python(tmp_path: Path) -> None:
    """No path map: the shell alone writes the note prepare reads (one Python start
    less while the migration waits); with a map, the call goes on to Python."""
    import subprocess

    migrate_map = tmp_path / "migrate.map"
    hook = _front_end(tmp_path, migrate_map)
    xml = XML.format(image=tmp_path / "vm.nvram").encode()
    r = subprocess.run([hook, NAME, "migrate", "begin", "-"], input=xml, capture_output=True,
                       check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    runtime = staging.runtime_dir(UUID, str(tmp_path / "run"))
    assert sorted(p.name for p in runtime.iterdir()) == [ownership.INCOMING_FILE]
    assert ownership.take_incoming_note(runtime)  # fresh, and used up
    assert not (runtime / ownership.INCOMING_FILE).exists()

    hostile = xml.replace(b"<domain", b"<!DOCTYPE d><domain", 1)
    r = subprocess.run([hook, NAME, "migrate", "begin", "-"], input=hostile,
                       capture_output=True, check=False)
    assert r.returncode != 0 and not (runtime / ownership.INCOMING_FILE).exists()
    migrate_map.write_text("/a/ /b/\n")
    r = subprocess.run([hook, NAME, "migrate", "begin", "-"], input=xml, capture_output=True,
                       check=False)
    assert r.returncode != 0 and not (runtime / ownership.INCOMING_FILE).exists()


def test_the_front_end_answers_started_without_python_unless_a_key_file_is_left(
        tmp_path: Path) -> None:
    """started only removes runtime key files: with none for the domain's UUID
    (read by the shell itself), no Python; with one, or a UUID the shell cannot
    trust, the call goes on to Python (here one that fails, so it shows)."""
    import subprocess

    hook = _front_end(tmp_path, tmp_path / "migrate.map")
    xml = XML.format(image=tmp_path / "vm.nvram").encode()

    def started(body: bytes) -> int:
        return subprocess.run([hook, NAME, "started", "begin", "-"], input=body,
                              capture_output=True, check=False).returncode

    assert started(xml) == 0
    runtime = staging.runtime_dir(UUID, str(tmp_path / "run"))
    runtime.mkdir(parents=True)
    (runtime / "image.key").write_bytes(b"k")
    assert started(xml) != 0  # Python's turn: a key file to remove
    (runtime / "image.key").unlink()
    (runtime / "rbd.key").write_bytes(b"k")
    assert started(xml) != 0
    (runtime / "rbd.key").unlink()
    assert started(xml) == 0
    # a UUID with other characters is not used to build a path: Python decides
    odd = xml.replace(f"<uuid>{UUID}</uuid>".encode(), b"<uuid>../../x</uuid>", 1)
    assert odd != xml and started(odd) != 0
