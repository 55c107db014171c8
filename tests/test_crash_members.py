"""Crash safety of split, merge and placement in a member, by fault injection
at every I/O of both files (the image and its member), in the three models
of ``tests/test_crash.py``:

exception
    every container's fault hook (``Container._fault``, so a member created
    during the operation too) raises at the N-th I/O of the operation.
power loss
    every raw container records the writes it issued since its last flush;
    at the crash the files are rebuilt with none, all, subsets and torn
    prefixes of those writes (:func:`tests.test_crash.plan_power_loss`).
kill
    ``tests/faultrun.py`` SIGKILLs a real ``nvmgr split`` / ``nvmgr merge``
    at the N-th I/O.

The promise: after a crash every section is readable, with its old bytes,
at its old place or at its new one (never lost, never two places with
different content), ``check`` passes on the image and every member, the
outcomes over N are monotone (old ... old, new ... new), and running the
operation again after an "old" outcome completes it (a member a crash left
behind, named by nothing, is replaced).  Each crash point starts from a
fresh build in the same directory: a member's recorded path is absolute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image
from nvmgr.image.members import merge, place_in_member, split
from nvmgr.provision.prepare import grow
from nvmgr.storage.base import Container
from nvmgr.storage.raw import RawContainer
from tests.test_crash import (
    SMALL,
    Crash,
    Faults,
    Write,
    assert_monotone,
    cli,
    digest,
    faultrun,
    io_count,
    kek,
    plan_power_loss,
    rand,
    write_key,
)

K = kek("members")

State = tuple[tuple[str, int, int | None, str], ...]  # name, capacity, member, payload


def build(path: Path, *, key: Kek | None = None, member: list[str] | None = None,
          fmt: str = "raw") -> None:
    """The four SMALL sections with data; *member*: those already split out."""
    with Image.create(str(path), SMALL, kek=key) as img:
        img.put("efivars", rand(8192, "efivars"))
        img.put("vtpm", rand(6000, "vtpm"))
        img.put("eeprom", rand(256, "eeprom"))
        img.put("canary", rand(1000, "canary"))
        if member:
            split(img, member, str(member_path(path)), fmt=fmt)


def member_path(image: Path) -> Path:
    return image.parent / "other" / "m.nvram"


def observe(path: Path, key: Kek | None) -> State:
    with Image.open(str(path), kek=key) as img:
        report = img.check()
        assert report.ok, f"check found errors: {report.errors}"
        return tuple((s.name, s.capacity, s.member, digest(img.get(s.name)))
                     for s in img.sections())


@dataclasses.dataclass
class Case:
    id: str
    prepare: Callable[[Path], None]
    op: Callable[[Image, Path], object]
    key: Kek | None = None


def _split(names: list[str], fmt: str | None = None) -> Callable[[Image, Path], object]:
    return lambda img, p: split(img, names, str(member_path(p)), fmt=fmt)


CASES = {c.id: c for c in [
    Case("split-new", lambda p: build(p), _split(["efivars", "vtpm"])),
    Case("split-into-existing", lambda p: build(p, member=["eeprom"]), _split(["vtpm"])),
    Case("split-encrypted", lambda p: build(p, key=K), _split(["vtpm", "efivars"]), K),
    Case("merge", lambda p: build(p, member=["efivars", "vtpm"]),
         lambda img, p: merge(img, str(member_path(p)))),
    Case("merge-encrypted", lambda p: build(p, key=K, member=["vtpm"]),
         lambda img, p: merge(img, str(member_path(p))), K),
    Case("place-new-sections", lambda p: build(p, member=["eeprom"]),
         lambda img, p: place_in_member(img, [SectionSpec("vpd", 8192, Binding.FWCFG),
                                               SectionSpec("blk", 8192, Binding.BLOCK)],
                                        limit=1 << 20)),
    # nvmgr put of a section a member holds (a stored one and a live one, the
    # latter staged in the member's scratch area): the member's commit, then
    # the image's, recording the member's generation.
    Case("put-into-member", lambda p: build(p, member=["vtpm", "efivars"]),
         lambda img, p: img.put("efivars", rand(8192, "efivars2"))),
    Case("put-into-member-encrypted", lambda p: build(p, key=K, member=["vtpm"]),
         lambda img, p: img.put("vtpm", rand(5000, "vtpm2")), K),
    # attach --data of a section that goes into a member (the domain's
    # max-image-size; larger than any hole the image has): into the member
    # there is (its bytes committed there before the image names the
    # section), and into a new member.
    Case("grow-data-into-member", lambda p: build(p, member=["eeprom"]),
         lambda img, p: grow(img, [SectionSpec("blk", 16384, Binding.BLOCK)],
                             max_image_size=img.directory.image_size,
                             contents={"blk": rand(16384, "blk")})),
    Case("grow-data-into-new-member", lambda p: build(p),
         lambda img, p: grow(img, [SectionSpec("fru", 16384, Binding.OPAQUE)],
                             max_image_size=img.directory.image_size,
                             contents={"fru": rand(9000, "fru")})),
    # attach --live of a qcow2 image a running QEMU holds (tests/test_crash_lent.py
    # sweeps it through the NBD export): the same calls on a raw image, whose
    # writes the power-loss recorder sees.
    Case("grow-live-into-raw-member", lambda p: build(p),
         lambda img, p: grow(img, [SectionSpec("blk", 16384, Binding.BLOCK)],
                             contents={"blk": rand(16384, "blk")}, in_use=["blk"],
                             in_place_limit=img.directory.image_size, member_fmt="raw",
                             beside=str(p))),
]}


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(shm) / f"nvmgr-members-{os.getpid()}-{random.randrange(1 << 30)}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def fresh(work: Path, case: Case) -> Path:
    d = work / "case"
    shutil.rmtree(d, ignore_errors=True)
    (d / "other").mkdir(parents=True)
    p = d / "vm.nvram"
    case.prepare(p)
    return p


@contextlib.contextmanager
def faults(hook: Faults, record: dict[str, list[Write]] | None = None) -> Iterator[None]:
    """*hook* before every I/O of every container; with *record*, every raw
    container's writes since its last flush, per file."""
    real_write, real_flush, real_resize = RawContainer.write, RawContainer.flush, RawContainer.resize

    def fault(self: Container, kind: str, offset: int, length: int) -> None:
        hook(kind, offset, length)

    def write(self: RawContainer, offset: int, data: bytes | memoryview) -> None:
        new = bytes(data)
        old, size = self.read(offset, len(new)), self.size()
        real_write(self, offset, new)
        assert record is not None
        record.setdefault(self.path, []).append(Write(offset, old, new, size))

    def flush(self: RawContainer) -> None:
        real_flush(self)
        assert record is not None
        record.pop(self.path, None)

    def resize(self: RawContainer, size: int) -> None:
        real_resize(self, size)
        assert record is not None
        record.pop(self.path, None)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(Container, "_fault", fault))
        if record is not None:
            stack.enter_context(mock.patch.object(RawContainer, "write", write))
            stack.enter_context(mock.patch.object(RawContainer, "flush", flush))
            stack.enter_context(mock.patch.object(RawContainer, "resize", resize))
        yield


def run(case: Case, p: Path, hook: Faults,
        record: dict[str, list[Write]] | None = None) -> bool:
    """The operation under *hook*; whether it crashed."""
    with faults(hook, record):
        try:
            with Image.open(str(p), writable=True, kek=case.key) as img:
                case.op(img, p)
        except Crash:
            return True
    assert not hook.after, f"I/O after the crash: {hook.after}"
    return False


def verdict(case: Case, p: Path, old: State, new: State) -> str:
    """Judge a crashed image: old or new, check clean; an old one completes
    when the operation runs again; a put afterwards disturbs nothing."""
    got = observe(p, case.key)
    assert got in (old, new), f"neither old nor new:\n got {got}\n old {old}\n new {new}"
    if got == old:
        assert not run(case, p, Faults()), "the retry crashed"
        assert observe(p, case.key) == new, "running the operation again did not complete it"
    with Image.open(str(p), writable=True, kek=case.key) as img:
        img.put("canary", b"after")
    after = observe(p, case.key)
    assert [x for x in after if x[0] != "canary"] == [x for x in new if x[0] != "canary"]
    return "old" if got == old else "new"


class Sweep:
    def __init__(self, case: Case, work: Path) -> None:
        self.case, self.work = case, work
        p = fresh(work, case)
        self.old = observe(p, case.key)
        hook = Faults()
        assert not run(case, p, hook)
        self.trace = hook.trace
        self.new = observe(p, case.key)
        assert self.old != self.new
        assert self.trace, "no I/O"

    def exceptions(self) -> list[str]:
        outcomes = []
        for n in range(1, len(self.trace) + 1):
            p = fresh(self.work, self.case)
            assert run(self.case, p, Faults(n)), f"no crash at I/O {n}"
            try:
                outcomes.append(verdict(self.case, p, self.old, self.new))
            except AssertionError as e:
                raise AssertionError(f"{self.case.id}: crash at I/O {n}/{len(self.trace)} "
                                     f"{self.trace[n - 1]}: {e}") from None
        assert_monotone(outcomes, self.trace)
        return outcomes

    def power_loss(self) -> int:
        states = 0
        for n in range(1, len(self.trace) + 1):
            p = fresh(self.work, self.case)
            record: dict[str, list[Write]] = {}
            assert run(self.case, p, Faults(n), record)
            pending = [(path, w) for path, ws in record.items() for w in ws]
            rng = random.Random(f"{self.case.id}:{n}")
            plans = plan_power_loss([w for _, w in pending], rng, max_subsets=4, cuts=1)
            snap = self.work / "snap"
            shutil.rmtree(snap, ignore_errors=True)
            shutil.copytree(p.parent, snap)
            for label, chosen in plans:
                shutil.rmtree(p.parent)
                shutil.copytree(snap, p.parent)
                _materialize(pending, chosen)
                try:
                    verdict(self.case, p, self.old, self.new)
                except AssertionError as e:
                    raise AssertionError(f"{self.case.id}: power loss at I/O {n} {label}: "
                                         f"{e}") from None
                states += 1
        return states


def _materialize(pending: list[tuple[str, Write]], chosen: list[tuple[int, int | None]]) -> None:
    """Undo every unflushed write (newest first), then re-apply *chosen*.

    A file the operation removed while unwinding from the crash (a member
    named by nothing) has nothing to rebuild."""
    pending = [(path, w) if os.path.exists(path) else ("", w) for path, w in pending]
    for path, w in reversed(pending):
        if not path:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, w.old, w.offset)
            if os.fstat(fd).st_size > w.size_before:
                os.ftruncate(fd, w.size_before)
        finally:
            os.close(fd)
    for i, cut in chosen:
        path, w = pending[i]
        if not path:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, w.new if cut is None else w.new[:cut], w.offset)
        finally:
            os.close(fd)


@pytest.mark.parametrize("cid", list(CASES))
def test_exception_at_every_io(cid: str, work: Path) -> None:
    s = Sweep(CASES[cid], work)
    outcomes = s.exceptions()
    print(f"{cid}: {len(outcomes)} crash points: {''.join(o[0] for o in outcomes)}")


@pytest.mark.parametrize("cid", ["split-new", "split-into-existing", "merge", "merge-encrypted",
                                 "place-new-sections", "put-into-member",
                                 "grow-data-into-member", "grow-data-into-new-member",
                                 "grow-live-into-raw-member"])
def test_power_loss_at_every_io(cid: str, work: Path) -> None:
    states = Sweep(CASES[cid], work).power_loss()
    print(f"{cid}: {states} disk states")


def test_exception_at_every_io_qcow2_member(work: Path) -> None:
    """A qcow2 member (QEMU's own code, through the FUSE export) of a raw image."""
    case = Case("split-qcow2", lambda p: build(p), _split(["vtpm"], "qcow2"))
    outcomes = Sweep(case, work).exceptions()
    print(f"split into qcow2: {len(outcomes)} crash points")


# ---------------------------------------------------------------- kill (SIGKILL)


def _cli_outcome(img: Path, key_args: list[object], old: list[object],
                 new: list[object]) -> str:
    c = cli("check", img, "-O", "json", *key_args)
    assert c.returncode == 0, c.stdout.decode() + c.stderr.decode()
    ls = cli("list", img, "-O", "json")
    assert ls.returncode == 0, ls.stderr.decode()
    where = [(s["name"], s["member"]) for s in json.loads(ls.stdout)["sections"]]
    g = cli("get", img, "vtpm", *key_args)
    assert g.returncode == 0 and g.stdout == rand(6000, "vtpm"), g.stderr.decode()
    assert where in (old, new), where
    return "old" if where == old else "new"


@pytest.mark.parametrize("op", ["split", "merge"])
def test_kill_cli_split_and_merge(op: str, work: Path) -> None:
    raw_key = os.urandom(32)
    keyf = write_key(work / "k", raw_key)
    key_args: list[object] = ["--key-file", keyf]
    case = Case(op, lambda p: build(p, key=Kek(raw_key),
                                    member=["vtpm", "efivars"] if op == "merge" else None),
                lambda img, p: None)

    def command(p: Path) -> list[object]:
        m = member_path(p)
        return (["split", p, "vtpm", "efivars", "--into", m, *key_args] if op == "split"
                else ["merge", p, m, *key_args])

    split_where = [("efivars", 1), ("vtpm", 1), ("eeprom", None), ("canary", None)]
    local = [(n, None) for n, _ in split_where]
    old, new = (local, split_where) if op == "split" else (split_where, local)
    p = fresh(work, case)
    total = io_count(faultrun(0, *command(p)))
    assert _cli_outcome(p, key_args, old, new) == "new"
    outcomes = []
    for n in range(1, total + 1):
        p = fresh(work, case)
        r = faultrun(n, *command(p))
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        got = _cli_outcome(p, key_args, old, new)
        if got == "old":
            again = cli(*command(p))
            assert again.returncode == 0, f"kill at {n}: retry failed: {again.stderr.decode()}"
            assert _cli_outcome(p, key_args, old, new) == "new"
        outcomes.append(got)
    assert_monotone(outcomes, [("kill", n, 0) for n in range(1, total + 1)])
    print(f"cli {op}: {total} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_put_into_member(work: Path) -> None:
    """``nvmgr put`` of a section a member holds, SIGKILLed at every I/O:
    the old bytes or the new, check clean, the section still in its member."""
    raw_key = os.urandom(32)
    keyf = write_key(work / "k", raw_key)
    new_bytes = rand(5000, "vtpm2")
    (work / "data").write_bytes(new_bytes)
    case = Case("put", lambda p: build(p, key=Kek(raw_key), member=["vtpm"]),
                lambda img, p: None)

    def outcome(p: Path) -> str:
        c = cli("check", p, "--key-file", keyf)
        assert c.returncode == 0, c.stdout.decode() + c.stderr.decode()
        g = cli("get", p, "vtpm", "--key-file", keyf)
        assert g.returncode == 0, g.stderr.decode()
        assert g.stdout in (rand(6000, "vtpm"), new_bytes), "neither old nor new"
        with Image.open(str(p), kek=Kek(raw_key)) as img:
            assert img.section("vtpm").member == 1
        return "old" if g.stdout == rand(6000, "vtpm") else "new"

    def command(p: Path) -> list[object]:
        return ["put", p, "vtpm", work / "data", "--key-file", keyf]

    p = fresh(work, case)
    total = io_count(faultrun(0, *command(p)))
    assert outcome(p) == "new"
    outcomes = []
    for n in range(1, total + 1):
        p = fresh(work, case)
        r = faultrun(n, *command(p))
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        outcomes.append(outcome(p))
    assert_monotone(outcomes, [("kill", n, 0) for n in range(1, total + 1)])
    print(f"cli put into a member: {total} kill points: {''.join(o[0] for o in outcomes)}")
