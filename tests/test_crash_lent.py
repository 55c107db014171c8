"""Crash safety of the growth ``nvmgr attach --live`` makes of a qcow2 image a
running QEMU holds: the image written through QEMU's NBD export of its qcow2
format node (:func:`nvmgr.virt.hotplug.exported`), the new section into a new
raw member beside the image (the qcow2's virtual size is fixed).

A qemu-storage-daemon stands in for the VM's QEMU: a ``file`` node, a
``qcow2`` node over it, and the qcow2 node exported writable over NBD on a
unix socket, as ``block-export-add`` serves ``nvmgr-image``.  The write path
under test is nvmgr's, from :func:`nvmgr.provision.prepare.grow` down to the
NBD image location and the member file; every I/O of it is counted.

exception
    every container's fault hook (the NBD image's and the new member's)
    raises at the N-th I/O; the export's server then stops (the VM's QEMU
    going on, or dying: either way nothing more arrives from nvmgr), and the
    qcow2 file and the member are judged directly: ``check`` passes, every
    old section holds its bytes, the new one is absent or holds exactly the
    given bytes, outcomes are monotone over N, and an "old" outcome completes
    when the growth runs again through a new export (a member the crash left,
    named by nothing, is replaced).
power loss
    the same growth (same calls, limits and member format) on a raw image,
    whose writes the recorder of ``tests/test_crash_members.py`` can drop,
    keep or tear: ``grow-live-into-raw-member`` there.  Through the export
    every nvmgr flush is an NBD flush, which QEMU turns into a flush of the
    qcow2 node (its metadata, then the file's fsync) before it answers, so the
    order nvmgr's commit relies on reaches the disk the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image
from nvmgr.provision.prepare import grow
from tests.test_crash import SMALL, Crash, Faults, assert_monotone, digest, rand
from tests.test_crash_members import State, faults

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon is not installed")

NEW = SectionSpec("blk", 16384, Binding.BLOCK, device="nvmgr-blk")
DATA = rand(16384, "blk")


@pytest.fixture
def work() -> Iterator[Path]:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    d = base / f"nvmgr-lent-{os.getpid()}-{random.randrange(1 << 30)}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fresh(work: Path) -> Path:
    """A qcow2 image with the four SMALL sections and their bytes."""
    d = work / "case"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    p = d / "vm.nvram"
    with Image.create(str(p), SMALL, fmt="qcow2") as img:
        for s, n in (("efivars", 8192), ("vtpm", 6000), ("eeprom", 256), ("canary", 1000)):
            img.put(s, rand(n, s))
    return p


@contextlib.contextmanager
def lent(image: Path) -> Iterator[str]:
    """*image*'s qcow2 node exported writable over NBD, as the VM's QEMU does it."""
    sock = image.parent / "lent.sock"
    p = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={image},node-name=f",
         "--blockdev", "driver=qcow2,file=f,node-name=nvmgr-image",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=nvmgr-image,name=img,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert p.poll() is None, p.stderr.read() if p.stderr else b""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
            time.sleep(0.02)
        yield f"nbd+unix:///img?socket={sock}"
    finally:
        p.terminate()
        p.wait(30)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def op(img: Image, p: Path) -> None:
    """What attach --live does with the lent image (nvmgr.virt.attach)."""
    grow(img, [NEW], contents={"blk": DATA}, in_use=["blk"],
         in_place_limit=img.container.size(), member_fmt="raw", beside=str(p))


def run(p: Path, hook: Faults) -> bool:
    """The growth through a fresh export under *hook*; whether it crashed."""
    with lent(p) as uri, faults(hook):
        try:
            with Image.open(uri, writable=True) as img:
                op(img, p)
        except Crash:
            return True
    assert not hook.after, f"I/O after the crash: {hook.after}"
    return False


def observe(p: Path) -> State:
    with Image.open(str(p)) as img:
        report = img.check()
        assert report.ok, f"check found errors: {report.errors}"
        return tuple((s.name, s.capacity, s.member, digest(img.get(s.name)))
                     for s in img.sections())


def verdict(p: Path, old: State, new: State) -> str:
    got = observe(p)
    assert got in (old, new), f"neither old nor new:\n got {got}\n old {old}\n new {new}"
    if got == old:
        assert not run(p, Faults()), "the retry crashed"
        assert observe(p) == new, "running the growth again did not complete it"
    return "old" if got == old else "new"


def test_exception_at_every_io_of_a_growth_through_the_export(work: Path) -> None:
    p = fresh(work)
    old = observe(p)
    with Image.open(str(p)) as img:
        size = img.container.size()
    hook = Faults()
    assert not run(p, hook)
    new = observe(p)
    # The new section is in a raw member beside the image; the image kept its size.
    assert [x for x in new if x[0] != "blk"] == list(old)
    (blk,) = [x for x in new if x[0] == "blk"]
    assert blk[2] is not None and blk[3] == digest(DATA), blk
    with Image.open(str(p)) as img:
        assert img.container.size() == size
        (m,) = img.directory.members or []
        assert m.fmt == "raw" and Path(m.path) == p.parent / "vm.m1.nvram", m
        assert img.member_image(m.index).fmt == "raw"
    outcomes = []
    for n in range(1, len(hook.trace) + 1):
        p = fresh(work)
        assert run(p, Faults(n)), f"no crash at I/O {n}"
        try:
            outcomes.append(verdict(p, old, new))
        except AssertionError as e:
            raise AssertionError(f"crash at I/O {n}/{len(hook.trace)} {hook.trace[n - 1]}: "
                                 f"{e}") from None
    assert_monotone(outcomes, hook.trace)
    print(f"{len(outcomes)} crash points: {''.join(o[0] for o in outcomes)}")
