"""Crash safety of ``nvmgr migrate-image`` (:func:`nvmgr.image.handoff.copy_for_migration`),
by fault injection at every I/O, in the three models of ``tests/test_crash.py``:

exception
    the N-th I/O raises: each container's (``Container._fault``: the copy's
    commits, reseal and check) and each file-level step of the copy
    (``handoff.fault``: a whole file copied, its fsync, a rename into place,
    the directory's fsync).
power loss
    as the exception, and every raw container's writes since its last flush
    are rebuilt as none, all, subsets and torn prefixes
    (:func:`tests.test_crash.plan_power_loss`).
kill
    ``tests/faultrun.py`` SIGKILLs a real ``nvmgr migrate-image`` at the N-th I/O
    (no clean-up runs: its temporary files stay behind).

The promise: the source (image and member) is never changed; the destination
is either absent (old) or a complete copy that checks, with every section's
bytes the source's, its member beside it (new) -- never a mix; the outcomes
over N are monotone; after "old" the command run again completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from nvmgr.image import handoff
from nvmgr.image.handoff import copy_for_migration
from tests.test_crash import (
    Crash,
    Faults,
    Write,
    assert_monotone,
    cli,
    faultrun,
    io_count,
    plan_power_loss,
)
from tests.test_crash_members import _materialize, build, faults, member_path, observe

Case = Callable[[Path], None]
CASES: dict[str, Case] = {
    "one-file": lambda p: build(p),
    "split": lambda p: build(p, member=["vtpm", "efivars"]),
}


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = shm / f"nvmgr-handoff-{os.getpid()}-{random.randrange(1 << 30)}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def fresh(work: Path, case: Case) -> tuple[Path, Path]:
    """The source image (its member under ``other/``) and the copy's path (not there)."""
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.rmtree(work / "dst", ignore_errors=True)
    (work / "src" / "other").mkdir(parents=True)
    (work / "dst").mkdir()
    src = work / "src" / "vm.nvram"
    case(src)
    return src, work / "dst" / "vm.nvram"


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def injected(hook: Faults, record: dict[str, list[Write]] | None = None) -> Iterator[None]:
    """*hook* before every container I/O and every file-level step of the copy."""
    with faults(hook, record), mock.patch.object(
            handoff, "fault", lambda kind, path: hook(f"handoff-{kind}", path, 0)):  # type: ignore[arg-type]
        yield


def run(src: Path, dst: Path, hook: Faults,
        record: dict[str, list[Write]] | None = None) -> bool:
    """The copy under *hook*; whether it crashed."""
    with injected(hook, record):
        try:
            copy_for_migration(str(src), str(dst))
        except Crash:
            return True
    assert not hook.after, f"I/O after the crash: {hook.after}"
    return False


class Judge:
    """What a complete copy holds (each build has new UUIDs: :meth:`start`
    notes each fresh source's bytes)."""

    def __init__(self, work: Path, case: Case) -> None:
        self.work, self.case = work, case
        src, dst = self.start()
        self.want = observe(src, None)
        hook = Faults()
        assert not run(src, dst, hook)
        self.trace = hook.trace
        assert observe(dst, None) == self.want
        assert tree(src.parent) == self.source

    def start(self) -> tuple[Path, Path]:
        src, dst = fresh(self.work, self.case)
        self.source = tree(src.parent)
        return src, dst

    def outcome(self, src: Path, dst: Path) -> str:
        """old (no copy) or new (a complete one); the source untouched."""
        assert tree(src.parent) == self.source, "the source changed"
        if not dst.exists():
            return "old"
        assert observe(dst, None) == self.want, "the copy is not the source's"
        return "new"

    def retry(self, src: Path, dst: Path) -> None:
        copy_for_migration(str(src), str(dst))
        assert observe(dst, None) == self.want
        assert tree(src.parent) == self.source


@pytest.mark.parametrize("cid", list(CASES))
def test_exception_at_every_io(cid: str, work: Path) -> None:
    j = Judge(work, CASES[cid])
    kinds = {t[0] for t in j.trace}
    assert {"handoff-copy", "handoff-fsync", "handoff-rename", "handoff-fsync-dir",
            "write", "flush"} <= kinds, kinds
    outcomes = []
    for n in range(1, len(j.trace) + 1):
        src, dst = j.start()
        assert run(src, dst, Faults(n)), f"no crash at I/O {n}"
        try:
            got = j.outcome(src, dst)
            # The exception's clean-up leaves nothing of the copy behind.
            if got == "old":
                assert sorted(os.listdir(dst.parent)) == [], os.listdir(dst.parent)
                j.retry(src, dst)
        except AssertionError as e:
            raise AssertionError(f"{cid}: crash at I/O {n}/{len(j.trace)} {j.trace[n - 1]}: "
                                 f"{e}") from None
        outcomes.append(got)
    assert_monotone(outcomes, j.trace)
    print(f"{cid}: {len(outcomes)} crash points: {''.join(o[0] for o in outcomes)}")


@pytest.mark.parametrize("cid", list(CASES))
def test_power_loss_at_every_io(cid: str, work: Path) -> None:
    j = Judge(work, CASES[cid])
    states = 0
    for n in range(1, len(j.trace) + 1):
        src, dst = j.start()
        record: dict[str, list[Write]] = {}
        assert run(src, dst, Faults(n), record)
        pending = [(path, w) for path, ws in record.items() for w in ws]
        rng = random.Random(f"{cid}:{n}")
        snap = work / "snap"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(work / "dst", snap)
        for label, chosen in plan_power_loss([w for _, w in pending], rng, max_subsets=4, cuts=1):
            shutil.rmtree(work / "dst")
            shutil.copytree(snap, work / "dst")
            _materialize(pending, chosen)
            try:
                if j.outcome(src, dst) == "old":
                    j.retry(src, dst)
            except AssertionError as e:
                raise AssertionError(f"{cid}: power loss at I/O {n} {label}: {e}") from None
            states += 1
    print(f"{cid}: {states} disk states")


@pytest.mark.parametrize("cid", list(CASES))
def test_kill_cli_migrate_image_at_every_io(cid: str, work: Path) -> None:
    j = Judge(work, CASES[cid])
    src, dst = j.start()
    total = io_count(faultrun(0, "migrate-image", src, dst))
    assert j.outcome(src, dst) == "new"
    outcomes = []
    for n in range(1, total + 1):
        src, dst = j.start()
        r = faultrun(n, "migrate-image", src, dst)
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        got = j.outcome(src, dst)
        if got == "old":  # the temporary files a kill leaves do not stop a retry
            again = cli("migrate-image", src, dst)
            assert again.returncode == 0, f"kill at {n}: retry failed: {again.stderr.decode()}"
            assert j.outcome(src, dst) == "new"
        outcomes.append(got)
    assert_monotone(outcomes, [("kill", n, 0) for n in range(1, total + 1)])
    print(f"cli {cid}: {total} kill points: {''.join(o[0] for o in outcomes)}")


def test_a_member_target_a_kill_left_is_replaced_but_a_foreign_file_is_not(work: Path) -> None:
    """The retry replaces a member copy an earlier run left at its target (it
    names the source as its parent) and refuses any other file there."""
    src, dst = fresh(work, CASES["split"])
    target = dst.parent / "vm.m1.nvram"
    shutil.copyfile(member_path(src), target)  # names the source's image as its parent
    copy_for_migration(str(src), str(dst))
    assert dst.exists()
    src, dst = fresh(work, CASES["split"])
    target.write_bytes(b"not an nvmgr image")
    with pytest.raises(Exception, match="already exists"):
        copy_for_migration(str(src), str(dst))
    assert target.read_bytes() == b"not an nvmgr image" and not dst.exists()
