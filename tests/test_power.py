"""Power loss while a VM runs and its guest writes UEFI variables.

The drop/tear model of ``tests/test_crash.py`` applied to what happens
outside nvmgr's own writers: QEMU writes variables into the live pflash
slice and does not flush them (nothing in pflash asks for it), then the
release hook reseals the section.  The power fails at every I/O of that
reseal (and before it, while the VM runs); every subset of the writes not
yet flushed, and torn ones, may have reached the disk.  For every such disk:

- the next start either verifies, or names the section whose crc no longer
  matches together with the recovery, ``nvmgr check IMAGE --repair --yes``;
- that repair makes it verify again, with the bytes the disk holds, and
  leaves every other section as it was: the VM is never left unbootable.

With reseal as it is (it flushes QEMU's writes before it commits a crc over
them) every disk verifies.  The same sweep over a reseal without that flush
finds disks whose crc no longer matches, each named and repaired: the model
sees the difference, and the recovery works where it is needed.  Finally
the real prepare hook on such an image: its refusal names the section and
the command, and after the command the start goes on.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from hookdom import ENV, wired_domain
from test_crash import Faults, RecordingRaw, Write, injected, materialize, plan_power_loss

from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image

SECTOR = 512
SPECS = [SectionSpec("efivars", 65536, Binding.PFLASH),
         SectionSpec("vtpm", 16384, Binding.TPM),
         SectionSpec("canary", 1024, Binding.OPAQUE)]


class ResealWithoutFlush(Image):
    """BROKEN on purpose: reseal commits a crc over QEMU's writes without
    first making them durable (nvmgr's reseal before this change)."""

    def reseal(self, names: object = None) -> list[str]:
        new = self._copy_dir()
        for ns in new.sections:
            if ns.live:
                ns.crc32, ns.dirty = self._stored_crc(ns), False
        self._commit(new)
        return []


def running_vm(path: Path, rng: random.Random) -> list[Write]:
    """An image in use by a VM whose guest wrote variables (not flushed)."""
    with Image.create(str(path), SPECS) as img:
        img.put("efivars", rng.randbytes(65536))
        img.put("vtpm", b"tpm state")
        img.put("canary", b"canary")
        img.set_in_use(["efivars"], True)  # prepare
        base = img.section("efivars").offset
    writes = []
    with open(path, "r+b") as f:
        for _ in range(3):  # a few variable updates, sector-aligned like the firmware's
            off = base + SECTOR * rng.randrange(0, 120)
            new = rng.randbytes(SECTOR * rng.randrange(1, 8))
            f.seek(off)
            old = f.read(len(new))
            f.seek(off)
            f.write(new)
            writes.append(Write(off, old, new, path.stat().st_size))
    return writes


def release(path: Path, qemu: list[Write], hook: Faults,
            cls: type[Image]) -> tuple[bool, list[Write]]:
    """The release hook's reseal, crashing at *hook*; QEMU's writes count as
    unflushed until its first flush."""
    crashed = False
    with injected(hook, record=True) as opened:
        img = cls.open(str(path), writable=True)
        c = opened[0]
        assert isinstance(c, RecordingRaw)
        c.unflushed[:0] = qemu
        try:
            img.reseal(["efivars"])
        except Exception as e:
            if type(e).__name__ != "Crash":
                raise
            crashed = True
        finally:
            img.close()
    return crashed, list(c.unflushed)


def next_start(path: Path) -> str:
    """What the next prepare sees: 'verifies', or 'repaired' after the named
    recovery made it verify (asserting everything on the way)."""
    with Image.open(str(path)) as img:
        report = img.check()
        others = {n: img.get(n) for n in ("vtpm", "canary")}
        if report.ok:
            return "verifies"
        assert report.repairable == ["efivars"], report.errors
        assert all("efivars" in e for e in report.errors), report.errors
        assert f"nvmgr check {path} --repair --yes" in report.repair_hint()
        off, cap = img.section("efivars").offset, img.section("efivars").capacity
    with open(path, "rb") as f:
        f.seek(off)
        on_disk = f.read(cap)
    with Image.open(str(path), writable=True) as img:
        assert img.repair() == ["efivars"]
    with Image.open(str(path)) as img:
        assert img.check().ok
        assert img.get("efivars") == on_disk, "repair changed the guest's bytes"
        assert {n: img.get(n) for n in ("vtpm", "canary")} == others
        assert not img.section("efivars").dirty
    return "repaired"


def sweep(work: Path, cls: type[Image], seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    template = work / "running"
    qemu = running_vm(template, rng)
    dry = work / "dry"
    shutil.copyfile(template, dry)
    count = Faults()
    release(dry, qemu, count, cls)
    total = len(count.trace)
    outcomes: dict[str, int] = {}
    # n = 0: the power fails while the VM runs, before release; then every I/O.
    for n in range(0, total + 1):
        p = work / f"crash{n}"
        shutil.copyfile(template, p)
        if n == 0:
            unflushed = qemu
        else:
            crashed, unflushed = release(p, qemu, Faults(n), cls)
            assert crashed
        for k, (label, chosen) in enumerate(plan_power_loss(unflushed, random.Random(n),
                                                             max_subsets=10)):
            q = work / f"disk{n}.{k}"
            materialize(p, unflushed, chosen, q)
            try:
                got = next_start(q)
            except AssertionError as e:
                raise AssertionError(f"power loss at I/O {n}/{total} of the release "
                                     f"({label}): {e}") from None
            outcomes[got] = outcomes.get(got, 0) + 1
            q.unlink()
        p.unlink()
    return outcomes


def test_power_loss_around_the_release_reseal_always_verifies(tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, Image, 1)
    print(f"reseal: {outcomes}")
    assert outcomes == {"verifies": sum(outcomes.values())}


def test_without_the_flush_a_start_names_the_section_and_the_repair_works(
        tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, ResealWithoutFlush, 1)
    print(f"reseal without its flush: {outcomes}")
    assert outcomes.get("repaired", 0) > 0, "the model never saw the crc go stale"


def test_the_prepare_hook_names_the_repair_and_starts_after_it(tmp_path: Path) -> None:
    d = wired_domain(tmp_path, "power")
    assert d.hook("prepare", "begin").returncode == 0
    assert d.hook("release", "end").returncode == 0
    with Image.open(str(d.image)) as img:
        off = img.section("uefi-vars").offset
        crc = img.section("uefi-vars").crc32
    last = b"a variable written before the power failed"
    with open(d.image, "r+b") as f:  # the guest's last write, its reseal lost
        f.seek(off + 8192)
        f.write(last)
    r = d.hook("prepare", "begin")
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert "uefi-vars" in err and f"nvmgr check {d.image} --repair --yes" in err, err
    assert d.name in err
    with Image.open(str(d.image)) as img:
        assert img.section("uefi-vars").crc32 == crc and not img.section("uefi-vars").dirty
    r = subprocess.run([sys.executable, "-m", "nvmgr", "check", str(d.image), "--repair",
                        "--yes"], capture_output=True, env=ENV, check=False)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    r = d.hook("prepare", "begin")
    assert r.returncode == 0, r.stderr.decode()
    with Image.open(str(d.image)) as img:
        data = img.get("uefi-vars")
    assert data[8192:8192 + len(last)] == last
    assert zlib.crc32(data) != crc
