"""Crash safety, proved by fault injection at every I/O of every write path.

The promise (``nvmgr/image.py``): a crash or kill at any point of a write
leaves every section with its old or its new bytes, never a mix, and
``check`` passes.  Each operation is first run once with a counting fault
hook (``Container.fault``, called before every write, flush and resize) to
learn its K I/Os; then, for EVERY N in 1..K, a fresh copy of the prepared
image gets the operation with a crash injected at the N-th I/O, in one of
three models:

exception
    the hook raises :class:`Crash` at the N-th I/O, which therefore does not
    happen; every earlier write is in the page cache (or in QEMU's, for
    qcow2), as after a crashed process.
power loss
    a recording :class:`RawContainer` (:class:`RecordingRaw`) logs every
    write since the last flush with the bytes it overwrote.  At the crash the
    disk is rebuilt with (a) none, (b) all, (c) subsets and (d) torn prefixes
    (cut at a 512-byte sector boundary inside one write, plus one cut at an
    arbitrary byte, which is stronger than disks promise) of those writes.
kill
    ``tests/faultrun.py`` SIGKILLs a real ``nvmgr`` CLI process at the N-th
    I/O; ``nvmgr check`` and ``nvmgr get`` then judge the image.  For qcow2,
    the crash can also SIGKILL ``qemu-storage-daemon`` (QEMU loses whatever it
    had not flushed, its qcow2 metadata cache included; ``qemu-img check``
    must then find no corruption).

After every crash (:func:`recover_and_verify`): the image is opened
read-only first (which must not change a byte of the file); ``check()`` must
have no errors (crc32 and, with the key, the MAC of every section); the whole
observable state (section names and order, capacities, in-use flags, every
section's payload, which candidate keys unlock it) must equal exactly the
state before the operation or exactly the state after it; then a writable
open (which finishes a pending live copy) must observe the same state, and a
put into the untouched ``canary`` section must leave both header copies valid
and everything else as it was.  In the exception model the outcomes over N
must also be monotone: old ... old, new ... new (a crash never undoes a
commit), starting with old at N = 1 and ending with new at N = K.

Also: a crash inside the writable open that finishes a pending live copy
(recovery crashing in turn), and random operation histories in which earlier
steps were themselves cut by a power loss (hypothesis, bounded examples).

The sanity tests near the end run deliberately broken protocols (a put that
writes the current slot in place, a put that commits before flushing its
data, a commit that overwrites the current header copy, a rekey in two
commits, a payload mixed across two commits) through the same harness and
require it to fail, each for the expected reason.

Images live on tmpfs when there is one (see :func:`workdir`); the whole file
runs in about 40 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import nvmgr.image.image as image_mod
from nvmgr.crypto.cipher import Kek, unlock
from nvmgr.errors import WrongKeyError
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding, Directory, Section
from nvmgr.image.image import CHUNK, Image, Progress
from nvmgr.provision.prepare import grow
from nvmgr.storage.container import Container, RawContainer, probe_format

ROOT = Path(__file__).resolve().parent.parent
FAULTRUN = ROOT / "tests" / "faultrun.py"
SECTOR = 512
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
WORKERS = max(2, min(4, os.cpu_count() or 2))


# ======================================================================
# fault hooks and the power-loss recorder
# ======================================================================


class Crash(Exception):
    """The injected crash.

    An ``Exception`` on purpose: code that wrongly swallows errors and carries
    on is then caught by the check that no I/O follows the crash.
    """


class Faults:
    """Fault hook: records every I/O; raises :class:`Crash` at the *at*-th (1-based).

    With ``at=None`` it only counts (the dry run).  Any I/O attempted after the
    crash is recorded in :attr:`after` and refused with another :class:`Crash`.
    """

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.trace: list[tuple[str, int, int]] = []
        self.after: list[tuple[str, int, int]] = []

    def __call__(self, kind: str, offset: int, length: int) -> None:
        if self.at is not None and len(self.trace) >= self.at:
            self.after.append((kind, offset, length))
            raise Crash(f"I/O after the crash: {kind} {offset}+{length}")
        self.trace.append((kind, offset, length))
        if len(self.trace) == self.at:
            raise Crash(f"crash at I/O {self.at}: {kind} {offset}+{length}")


@dataclasses.dataclass
class Write:
    """One write not yet made durable: where, what it overwrote, what it wrote."""

    offset: int
    old: bytes
    new: bytes
    size_before: int


class RecordingRaw(RawContainer):
    """A RawContainer that remembers the writes issued since the last flush.

    ``flush`` and ``resize`` (ftruncate + fsync) make everything before them
    durable.  A write refused by the fault hook is not recorded: it never
    happened.
    """

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        super().__init__(path, writable=writable, wait=wait)
        self.unflushed: list[Write] = []

    def write(self, offset: int, data: bytes | memoryview) -> None:
        new = bytes(data)
        old, size = self.read(offset, len(new)), self.size()
        super().write(offset, new)
        self.unflushed.append(Write(offset, old, new, size))

    def flush(self) -> None:
        super().flush()
        self.unflushed.clear()

    def resize(self, size: int) -> None:
        super().resize(size)
        self.unflushed.clear()


@contextlib.contextmanager
def injected(hook: Faults, *, record: bool = False) -> Iterator[list[Container]]:
    """Every container :class:`Image` opens meanwhile gets *hook* (and records
    its unflushed writes when *record*)."""
    opened: list[Container] = []
    real = image_mod.open_container

    def opener(
        path: str, *, writable: bool = False, wait: float = 0.0, fmt: str | None = None
    ) -> Container:
        c: Container
        if record:
            assert (fmt or probe_format(path)) == "raw", "the power-loss model is raw-only"
            c = RecordingRaw(path, writable=writable, wait=wait)
        else:
            c = real(path, writable=writable, wait=wait, fmt=fmt)
        c.fault = hook
        opened.append(c)
        return c

    with mock.patch.object(image_mod, "open_container", opener):
        yield opened


def run_crashing(
    open_image: Callable[[], Image], op: Callable[[Image], object], hook: Faults, record: bool,
    on_crash: Callable[[], None] | None = None,
) -> tuple[bool, list[Write]]:
    """Open (a writable open may already do I/O: a pending live copy) and run
    *op* under *hook*; return whether it crashed and the unflushed writes.
    *on_crash* runs at the crash, before the image is closed."""
    with injected(hook, record=record) as opened:
        img: Image | None = None
        try:
            img = open_image()
            op(img)
            crashed = False
        except Crash:
            crashed = True
            if on_crash is not None:
                on_crash()
        finally:
            if img is not None:
                img.close()
    assert not hook.after, f"I/O was attempted after the crash: {hook.after}"
    assert len(opened) == 1
    c = opened[0]
    return crashed, list(c.unflushed) if isinstance(c, RecordingRaw) else []


Choice = list[tuple[int, int | None]]  # (index of unflushed write, cut or None = whole)


def plan_power_loss(
    unflushed: Sequence[Write], rng: random.Random, *, max_subsets: int = 6, cuts: int = 2,
    edges: bool = True, byte_cut: bool = True,
) -> list[tuple[str, Choice]]:
    """Disk states a power cut may leave: which unflushed writes (or prefixes) landed.

    Torn writes are cut at *cuts* random sector boundaries inside each write
    (plus the first and last ones with *edges*), and once at a random byte.
    """
    k = len(unflushed)
    out: list[tuple[str, Choice]] = [("(a) none of the unflushed writes landed", [])]
    if not k:
        return out
    out.append((f"(b) all {k} unflushed writes landed", [(i, None) for i in range(k)]))
    subsets = [s for r in range(1, k) for s in itertools.combinations(range(k), r)]
    if len(subsets) > max_subsets:
        subsets = rng.sample(subsets, max_subsets)
    for s in subsets:
        out.append((f"(c) writes {list(s)} of {k} landed", [(i, None) for i in s]))
    for i, w in enumerate(unflushed):
        inside = range(SECTOR, len(w.new), SECTOR)
        picks = set()
        if len(inside):
            if edges:
                picks |= {inside[0], inside[-1]}
            picks |= set(rng.sample(inside, min(cuts, len(inside))))
        if byte_cut and len(w.new) > 1:
            picks.add(rng.randrange(1, len(w.new)))  # sub-sector: stronger than disks promise
        for cut in sorted(picks):
            others = [j for j in range(k) if j != i and rng.random() < 0.5]
            chosen: Choice = sorted([(j, None) for j in others] + [(i, cut)])
            kind = "sector" if cut % SECTOR == 0 else "byte"
            out.append(
                (
                    f"(d) write {i} torn at {kind} {cut} of {len(w.new)} bytes, "
                    f"with writes {others} of {k}",
                    chosen,
                )
            )
    return out


def materialize(src: Path, unflushed: Sequence[Write], chosen: Choice, dst: Path) -> None:
    """*dst* = *src* with the unflushed writes undone, then *chosen* re-applied."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDWR)
    try:
        for w in reversed(unflushed):
            os.pwrite(fd, w.old, w.offset)
            if os.fstat(fd).st_size > w.size_before:
                os.ftruncate(fd, w.size_before)
        for i, cut in chosen:
            w = unflushed[i]
            os.pwrite(fd, w.new if cut is None else w.new[:cut], w.offset)
    finally:
        os.close(fd)


# ======================================================================
# what an image holds, and the verdict after a crash
# ======================================================================


def digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:24]}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class State:
    """Everything a user can observe of an image (payloads by length:sha256)."""

    sections: tuple[tuple[str, int, bool, str], ...]  # name, capacity, in use, payload
    unlocks: frozenset[str]  # names of the candidate keys that open it
    domain: str | None

    def with_section(self, name: str, payload: bytes) -> State:
        secs = tuple(
            (n, cap, dirty, digest(payload) if n == name else p)
            for n, cap, dirty, p in self.sections
        )
        return dataclasses.replace(self, sections=secs)


def observe(img: Image, keks: dict[str, Kek]) -> State:
    """The image's state; asserts check() is clean and the keys are coherent."""
    report = img.check()
    assert report.ok, f"check() found errors: {report.errors}"
    slots = img.directory.key_slots
    unlocks: set[str] = set()
    if slots is not None:
        for name, k in keks.items():
            try:
                unlock(slots, k)
            except WrongKeyError:
                continue
            unlocks.add(name)
        assert unlocks, "no key opens the image any more"
        assert {s.key_id for s in slots} == {keks[n].key_id for n in unlocks}, (
            "the directory lists a key slot no candidate key opens"
        )
        img.kek = keks[sorted(unlocks)[0]]
        report = img.check()  # again, now verifying every MAC
        assert report.ok, f"check() with the key found errors: {report.errors}"
    secs = tuple(
        (s.name, s.capacity, s.dirty, digest(img.get(s.name))) for s in img.directory.sections
    )
    dom = str(img.directory.domain_uuid) if img.directory.domain_uuid else None
    return State(secs, frozenset(unlocks), dom)


def observe_path(path: Path, keks: dict[str, Kek]) -> State:
    with Image.open(str(path)) as img:
        return observe(img, keks)


def explain(got: State, old: State, new: State) -> str:
    lines = ["state after the crash is neither the old nor the new one:"]
    for label, st_ in (("got", got), ("old", old), ("new", new)):
        lines.append(f"  {label}: unlocks={sorted(st_.unlocks)} domain={st_.domain}")
        lines += [f"    {s}" for s in st_.sections]
    return "\n".join(lines)


def recover_and_verify(path: Path, keks: dict[str, Kek], old: State, new: State) -> str:
    """Judge a crashed image; return ``"old"`` or ``"new"``."""
    before = file_digest(path)
    with Image.open(str(path)) as img:  # read-only, before any writable open
        got = observe(img, keks)
    assert file_digest(path) == before, "a read-only open changed the image file"
    assert got in (old, new), explain(got, old, new)
    with Image.open(str(path), writable=True) as img:  # finishes a pending live copy
        assert all(s.home is None for s in img.directory.sections), "pending copy left"
        again = observe(img, keks)
        assert again == got, "the writable open changed what the image holds"
        fresh = os.urandom(700)
        img.put("canary", fresh)
    with Image.open(str(path)) as img:
        after = observe(img, keks)  # check() decodes both header copies
        assert [h.error for h in img.headers] == [None, None], [h.error for h in img.headers]
    assert after == got.with_section("canary", fresh), "a put after recovery disturbed the image"
    return "old" if got == old else "new"


def assert_monotone(outcomes: list[str], trace: list[tuple[str, int, int]]) -> None:
    assert outcomes, "no crash points"
    assert outcomes[0] == "old", "a crash before the first I/O must leave the old state"
    assert outcomes[-1] == "new", "a crash at the last flush (after the commit write) is new"
    first_new = outcomes.index("new")
    assert all(o == "new" for o in outcomes[first_new:]), (
        "a later crash went back to the old state: "
        + ", ".join(f"{n}:{o}:{t[0]}" for n, (o, t) in enumerate(zip(outcomes, trace, strict=True), 1))
    )


# ======================================================================
# prepared images and scenarios
# ======================================================================


def rand(n: int, seed: object) -> bytes:
    return random.Random(str(seed)).randbytes(n)


def kek(seed: str) -> Kek:
    return Kek(hashlib.sha256(seed.encode()).digest(), seed)


K_OLD, K_NEW = kek("old"), kek("new")

SMALL = [
    SectionSpec("efivars", 8192, Binding.PFLASH),
    SectionSpec("vtpm", 16384, Binding.TPM),
    SectionSpec("eeprom", 256, Binding.OPAQUE, device="net0"),
    SectionSpec("canary", 1024, Binding.OPAQUE),
]
BIG = 9 << 20  # three CHUNK writes: 4 + 4 + 1 MiB
BIG_PLAN = {"max_subsets": 2, "cuts": 1, "edges": False}
assert BIG > 2 * CHUNK


def build_small(path: str, fmt: str, *, key: Kek | None = None, canary_puts: int = 1) -> None:
    with Image.create(path, SMALL, fmt=fmt, kek=key) as img:
        img.put("efivars", rand(8192, "efivars"))
        img.put("vtpm", rand(6000, "vtpm"))
        img.put("eeprom", rand(256, "eeprom"))
        for i in range(canary_puts):
            img.put("canary", rand(1000, f"canary{i}"))


def build_big(path: str, fmt: str, binding: Binding) -> None:
    specs = [SectionSpec("blob", BIG, binding), SectionSpec("canary", 1024, Binding.OPAQUE)]
    with Image.create(path, specs, fmt=fmt) as img:
        img.put("blob", rand(BIG - 4096, "blob-old"))
        img.put("canary", rand(1000, "canary"))


def build_in_use(path: str, fmt: str) -> None:
    """efivars in use by a 'VM' that then rewrote it in place (as QEMU does)."""
    build_small(path, fmt)
    with Image.open(path, writable=True) as img:
        img.set_in_use(["efivars"], True)
        off = img.section("efivars").offset
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(rand(8192, "qemu wrote"))


@dataclasses.dataclass
class Scenario:
    id: str
    build: Callable[[str, str], None]
    op: Callable[[Image], object]
    keks: dict[str, Kek] = dataclasses.field(default_factory=dict)
    open_with: str | None = None  # candidate key the operation is given
    image_cls: type[Image] = Image


def _encrypted(path: str, fmt: str) -> None:
    build_small(path, fmt, key=K_OLD)


def _commit_op(img: Image) -> None:
    d = img._copy_dir()
    d.domain_uuid = uuid.UUID(int=0x5EED)
    img._commit(d)


GROW = [SectionSpec("vpd", 32768, Binding.FWCFG), SectionSpec("flash2", 16384, Binding.PFLASH)]
#: A live grow (nvmgr attach --live, the watcher on a running VM): a block
#: section and an opaque one, each with its first bytes, into an image whose
#: live section a "running VM" holds (in use, rewritten in place as QEMU does).
GROW_LIVE = [SectionSpec("state0", 16384, Binding.BLOCK), SectionSpec("fru", 4096)]


def _grow_live(img: Image) -> None:
    grow(img, GROW_LIVE, contents={"state0": rand(10000, "state0"), "fru": rand(3000, "fru")})


def build_in_use_with_hole(path: str, fmt: str) -> None:
    """A running VM's image (see :func:`build_in_use`) with a hole: a removed
    section's two slots, full of its old bytes, which the live grow reuses."""
    build_in_use(path, fmt)
    with Image.open(path, writable=True) as img:
        img.put("eeprom", rand(256, "eeprom2"))  # both slots hold bytes
        img.remove("eeprom")
ENC = {"old": K_OLD}
BOTH = {"old": K_OLD, "new": K_NEW}

SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in [
        Scenario("put", build_small, lambda i: i.put("vtpm", rand(7001, "vtpm-new"))),
        Scenario("put-live", build_small, lambda i: i.put("efivars", rand(8192, "efi-new"))),
        Scenario("put-live-short", build_small, lambda i: i.put("efivars", rand(3000, "efi-s"))),
        Scenario(
            "put-encrypted", _encrypted, lambda i: i.put("vtpm", rand(7001, "v-n")), ENC, "old"
        ),
        Scenario("commit", build_small, _commit_op),
        Scenario("grow", build_small, lambda i: i.add_sections(GROW)),
        Scenario("grow-encrypted", _encrypted, lambda i: i.add_sections(GROW), ENC),
        Scenario("grow-live", build_in_use, _grow_live),
        Scenario("grow-live-reuse", build_in_use_with_hole, _grow_live),
        Scenario("grow-live-encrypted", _encrypted, _grow_live, ENC, "old"),
        Scenario("resize-move", build_small, lambda i: i.resize_section("vtpm", 65536)),
        Scenario("resize-last", build_small, lambda i: i.resize_section("canary", 20000)),
        Scenario(
            "resize-last-same-slot",
            lambda p, f: build_small(p, f, canary_puts=2),
            lambda i: i.resize_section("canary", 20000),
        ),
        Scenario("resize-in-place", build_small, lambda i: i.resize_section("vtpm", 12000)),
        Scenario("rekey", _encrypted, lambda i: i.rekey(K_NEW), BOTH, "old"),
        Scenario("rekey-keep-old", _encrypted, lambda i: i.rekey(K_NEW, keep_old=True), BOTH, "old"),
        Scenario("remove", build_small, lambda i: i.remove("eeprom")),
        # Dropping an encrypted section that holds data changes what the
        # directory's MAC covers: it needs the key.
        Scenario("remove-encrypted", _encrypted, lambda i: i.remove("vtpm"), ENC, "old"),
        Scenario("set-in-use", build_small, lambda i: i.set_in_use(["efivars"], True)),
        Scenario("reseal", build_in_use, lambda i: i.reseal()),
        Scenario(
            "big-put",
            lambda p, f: build_big(p, f, Binding.OPAQUE),
            lambda i: i.put("blob", rand(BIG, "blob-new")),
        ),
        Scenario(
            "big-put-live",
            lambda p, f: build_big(p, f, Binding.PFLASH),
            lambda i: i.put("blob", rand(BIG, "blob-new")),
        ),
    ]
}

#: Crash points injected per scenario and model (printed with -s / -rP).
POINTS: dict[str, int] = {}


class Harness:
    """One scenario on one prepared image: dry run, then crashes at every I/O."""

    def __init__(self, scn: Scenario, workdir: Path, fmt: str = "raw") -> None:
        self.scn, self.workdir, self.fmt = scn, workdir, fmt
        self.prefix = f"{scn.id}.{fmt}.{uuid.uuid4().hex[:8]}"
        self.template = workdir / f"{self.prefix}.template"
        scn.build(str(self.template), fmt)
        self.old = observe_path(self.template, scn.keks)
        p = self.copy("dry")
        hook = Faults()
        crashed, _ = self.run_op(p, hook)
        assert not crashed
        self.trace = hook.trace
        self.total = len(hook.trace)
        self.new = observe_path(p, scn.keks)
        p.unlink()
        assert self.total > 0, "the operation did no I/O"
        assert self.old != self.new, "the operation changes nothing observable"

    def copy(self, tag: str) -> Path:
        p = self.workdir / f"{self.prefix}.{tag}"
        shutil.copyfile(self.template, p)
        return p

    def run_op(self, path: Path, hook: Faults, record: bool = False,
               kill_daemon: bool = False) -> tuple[bool, list[Write]]:
        key = self.scn.keks[self.scn.open_with] if self.scn.open_with else None
        cls, op = self.scn.image_cls, self.scn.op
        return run_crashing(lambda: cls.open(str(path), writable=True, kek=key), op, hook, record,
                            (lambda: kill_daemons(path)) if kill_daemon else None)

    def where(self, n: int) -> str:
        kind, off, length = self.trace[n - 1]
        return f"{self.scn.id}/{self.fmt}: crash at I/O {n}/{self.total} ({kind} {off}+{length})"

    def exceptions(self, kill_daemon: bool = False) -> list[str]:
        """Crash at every I/O; with *kill_daemon* (qcow2) the crash also
        SIGKILLs qemu-storage-daemon, losing whatever QEMU had not flushed
        (its qcow2 metadata cache included)."""
        model = "daemon SIGKILL" if kill_daemon else "exception"
        outcomes = []
        for n in range(1, self.total + 1):
            p = self.copy(f"exc{n}")
            crashed, _ = self.run_op(p, Faults(n), kill_daemon=kill_daemon)
            assert crashed, f"{self.where(n)}: no crash happened"
            try:
                if kill_daemon:
                    qemu_img_check(p)
                outcomes.append(recover_and_verify(p, self.scn.keks, self.old, self.new))
            except AssertionError as e:
                raise AssertionError(f"{self.where(n)} [{model}]: {e}") from None
            p.unlink()
        assert_monotone(outcomes, self.trace)
        POINTS[f"{self.scn.id}/{self.fmt}/{model}"] = self.total
        return outcomes

    def power_loss(self, **plan: Any) -> int:
        states = 0
        for n in range(1, self.total + 1):
            p = self.copy(f"pl{n}")
            crashed, unflushed = self.run_op(p, Faults(n), record=True)
            assert crashed, f"{self.where(n)}: no crash happened"
            rng = random.Random(f"{self.scn.id}:{n}")
            for k, (label, chosen) in enumerate(plan_power_loss(unflushed, rng, **plan)):
                q = self.workdir / f"{p.name}.{k}"
                materialize(p, unflushed, chosen, q)
                try:
                    recover_and_verify(q, self.scn.keks, self.old, self.new)
                except AssertionError as e:
                    raise AssertionError(f"{self.where(n)} [power loss, {label}]: {e}") from None
                q.unlink()
                states += 1
            p.unlink()
        POINTS[f"{self.scn.id}/{self.fmt}/power-loss"] = self.total
        POINTS[f"{self.scn.id}/{self.fmt}/power-loss disk states"] = states
        return states


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Where the images live: tmpfs when there is one.

    The crash models are simulated above the file system, so the medium does
    not matter, but the big scenarios copy hundreds of MiB; on tmpfs that costs
    no disk writes and their fsyncs are free.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30:
        with tempfile.TemporaryDirectory(prefix="nvmgr-crash-", dir=shm) as d:
            yield Path(d)
    else:
        yield tmp_path


# ======================================================================
# the tests: exception and power loss, every operation, every I/O
# ======================================================================

RAW_IDS = list(SCENARIOS)


@pytest.mark.parametrize("sid", RAW_IDS)
def test_exception_at_every_io_raw(sid: str, workdir: Path) -> None:
    h = Harness(SCENARIOS[sid], workdir)
    outcomes = h.exceptions()
    print(f"{sid}: {h.total} crash points: {''.join(o[0] for o in outcomes)}")


@pytest.mark.parametrize("sid", ["put", "put-live", "put-encrypted", "grow", "resize-move"])
def test_exception_at_every_io_qcow2(sid: str, workdir: Path) -> None:
    h = Harness(SCENARIOS[sid], workdir, "qcow2")
    outcomes = h.exceptions()
    print(f"{sid}/qcow2: {h.total} crash points: {''.join(o[0] for o in outcomes)}")


@pytest.mark.parametrize("sid", ["put", "put-live", "put-encrypted", "grow"])
def test_daemon_kill_at_every_io_qcow2(sid: str, workdir: Path) -> None:
    h = Harness(SCENARIOS[sid], workdir, "qcow2")
    outcomes = h.exceptions(kill_daemon=True)
    print(f"{sid}/qcow2 daemon SIGKILL: {h.total} crash points: {''.join(o[0] for o in outcomes)}")


@pytest.mark.parametrize("sid", RAW_IDS)
def test_power_loss_at_every_io(sid: str, workdir: Path) -> None:
    big = sid.startswith("big")
    h = Harness(SCENARIOS[sid], workdir)
    # Big: three 4 MiB chunks in flight; sample their landings more sparsely.
    states = h.power_loss(**(BIG_PLAN if big else {}))
    print(f"{sid}: {h.total} crash points, {states} disk states")


def test_expected_io_sequences(workdir: Path) -> None:
    """The protocols do what the module docstring says, I/O by I/O (so the
    crash points above land where they matter: between data and commit,
    between the two commits of a live put, between chunks)."""
    def kinds(sid: str) -> str:
        h = Harness(SCENARIOS[sid], workdir)
        return " ".join(k[0][0] for k in h.trace)

    assert kinds("put") == "w f w f"  # data into spare; commit
    assert kinds("put-live") == "w f w f w f w f"  # scratch; commit; home; commit
    assert kinds("grow") == "w w f"  # resize (fault "write", 0 bytes); commit
    assert kinds("rekey") == "w f"
    assert kinds("big-put") == "w w w f w f"  # three 4 MiB chunks, then the commit
    assert kinds("big-put-live") == "w w w f w f w w w f w f"


@pytest.mark.parametrize("sid", ["grow-live", "grow-live-reuse"])
def test_live_grow_never_writes_a_live_slice_or_the_current_header(sid: str,
                                                                  workdir: Path) -> None:
    """The live grow's I/O, one by one: none lands on a live section (QEMU
    reads and writes those in place while the VM runs), on any existing
    section, or on the header copy that is current when it starts; the
    reuse case does go into the hole (first fit), not past the end."""
    h = Harness(SCENARIOS[sid], workdir)
    with Image.open(str(h.template)) as img:
        d = img.directory
        current = img._slot
    taken = [(off, n, what) for off, n, what in d.extents()
             if what.startswith("section") or what == f"header {'AB'[current]}"]
    assert any(s.live for s in d.sections)
    writes = [(off, n) for kind, off, n in h.trace if kind == "write" and n]
    for off, n in writes:
        for o, m, what in taken:
            assert off + n <= o or o + m <= off, f"{sid}: a write at {off}+{n} hits {what}"
    end = d.image_size
    if sid == "grow-live-reuse":
        assert any(off < end for off, _n in writes if off >= d.data_start), (
            "the grow did not reuse the freed space")


def test_crash_while_finishing_a_pending_live_copy(workdir: Path) -> None:
    """A live put crashed after its first commit leaves a copy pending; the
    writable open that finishes it can crash too, at every one of its I/Os,
    in both models, and the next open still sees the new bytes."""
    for sid in ("put-live", "big-put-live"):
        h = Harness(SCENARIOS[sid], workdir)
        # scratch chunk(s), flush, commit, flush, home chunk(s), ...: crashing
        # at the first home write leaves the copy pending.
        first_home = [i for i, t in enumerate(h.trace, 1) if t[0] == "flush"][1] + 1
        pending = h.copy("pending")
        crashed, _ = h.run_op(pending, Faults(first_home))
        assert crashed
        with Image.open(str(pending)) as img:
            assert img.directory.find("blob" if sid.startswith("big") else "efivars").home is not None
        count = Faults()
        probe = workdir / "probe"
        shutil.copyfile(pending, probe)
        with injected(count):
            Image.open(str(probe), writable=True).close()
        assert [k[0] for k in count.trace] == ["write"] * (3 if sid.startswith("big") else 1) + [
            "flush", "write", "flush"]
        points = 0
        for m in range(1, len(count.trace) + 1):
            for record in (False, True):
                p = workdir / f"rec{m}{record}"
                shutil.copyfile(pending, p)
                hook = Faults(m)
                with injected(hook, record=record) as opened, pytest.raises(Crash):
                    Image.open(str(p), writable=True)
                assert not hook.after
                unflushed = list(opened[0].unflushed) if record else []
                opened[0].close()
                plan = BIG_PLAN if sid.startswith("big") else {}
                choices = (plan_power_loss(unflushed, random.Random(m), **plan) if record
                           else [("", [])])
                for k, (label, chosen) in enumerate(choices):
                    q = p
                    if record:
                        q = workdir / f"rec{m}.{k}"
                        materialize(p, unflushed, chosen, q)
                    try:
                        assert recover_and_verify(q, {}, h.old, h.new) == "new"
                    except AssertionError as e:
                        raise AssertionError(f"{sid}: recovery crash at I/O {m} {label}: {e}") from None
                    points += 1
        POINTS[f"{sid}/recovery crash"] = len(count.trace)
        print(f"{sid}: {len(count.trace)} recovery crash points, {points} states")


# ======================================================================
# random sequences of operations, then a power cut (hypothesis)
# ======================================================================

OPS: dict[str, Callable[[Image, random.Random], object]] = {
    "put-vtpm": lambda i, r: i.put("vtpm", r.randbytes(r.randrange(0, 16385))),
    "put-efivars": lambda i, r: i.put("efivars", r.randbytes(r.choice([0, 512, 4000, 8192])),
                                      force=True),  # "in-use" may have marked it
    "put-eeprom": lambda i, r: i.put("eeprom", r.randbytes(r.randrange(1, 257)))
    if i.directory.find("eeprom") else i.put("vtpm", b"x"),
    "remove-eeprom": lambda i, r: i.remove("eeprom") if i.directory.find("eeprom")
    else i.put("vtpm", b"y"),
    "grow": lambda i, r: i.add_sections(
        [SectionSpec(f"s{len(i.directory.sections)}", r.choice([512, 8192, 20480]),
                     r.choice([Binding.OPAQUE, Binding.PFLASH]))]
    ),
    "resize-vtpm": lambda i, r: i.resize_section(
        "vtpm", r.choice([16384, 20000, 40000, 70000]) + len(i.directory.sections)
    ),
    "in-use": lambda i, r: i.set_in_use(["efivars"], not i.section("efivars").dirty)
    if r.random() < 0.5 else i.reseal(),
    "rekey": lambda i, r: i.rekey(K_NEW if i.kek is K_OLD else K_OLD)
    if i.directory.encrypted else i.put("canary", b"z"),
}


def _run(path: Path, name: str, seed: int, hook: Faults, record: bool = False,
         key: Kek | None = None) -> tuple[bool, list[Write]]:
    return run_crashing(lambda: Image.open(str(path), writable=True, kek=key),
                        lambda img: OPS[name](img, random.Random(seed)), hook, record)


def _current_key(path: Path) -> Kek | None:
    with Image.open(str(path)) as img:
        if not img.directory.encrypted:
            return None
        ids = {s.key_id for s in img.directory.key_slots or []}
        return K_OLD if K_OLD.key_id in ids else K_NEW


step = st.tuples(
    st.sampled_from(sorted(OPS)),
    st.integers(0, 2**32),
    st.floats(0, 1),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow])
@given(encrypted=st.booleans(), steps=st.lists(step, min_size=1, max_size=5),
       plan_seed=st.integers(0, 2**32))
def test_random_histories_then_power_cut(
    encrypted: bool, steps: list[tuple[str, int, float, bool]], plan_seed: int
) -> None:
    """Random operation histories where earlier steps may themselves have been
    cut by a power loss (so slots, torn header copies and pending live copies
    are in every arrangement); the last step is cut at a random I/O with a
    random landing of its unflushed writes, and must leave old or new."""
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cur = work / "img"
        build_small(str(cur), "raw", key=K_OLD if encrypted else None)
        keks = BOTH if encrypted else {}
        *history, last = steps
        for i, (name, seed, where, cut) in enumerate(history):
            count = Faults()
            probe = work / "probe"
            shutil.copyfile(cur, probe)
            _run(probe, name, seed, count, key=_current_key(cur))
            if not cut or not count.trace:
                shutil.move(probe, cur)
                continue
            n = 1 + int(where * (len(count.trace) - 1))
            shutil.copyfile(cur, probe)
            crashed, unflushed = _run(probe, name, seed, Faults(n), True, _current_key(cur))
            assert crashed
            rng = random.Random(plan_seed + i)
            _label, chosen = rng.choice(plan_power_loss(unflushed, rng))
            materialize(probe, unflushed, chosen, cur)
        name, seed, where, _ = last
        old = observe_path(cur, keks)
        key = _current_key(cur)
        full = work / "full"
        shutil.copyfile(cur, full)
        count = Faults()
        _run(full, name, seed, count, key=key)
        new = observe_path(full, keks)
        if not count.trace:
            return
        n = 1 + int(where * (len(count.trace) - 1))
        crashed_p = work / "crashed"
        shutil.copyfile(cur, crashed_p)
        crashed, unflushed = _run(crashed_p, name, seed, Faults(n), True, key)
        assert crashed
        rng = random.Random(plan_seed)
        for k, (label, chosen) in enumerate(plan_power_loss(unflushed, rng, max_subsets=2,
                                                             cuts=1)):
            q = work / f"state{k}"
            materialize(crashed_p, unflushed, chosen, q)
            try:
                recover_and_verify(q, keks, old, new)
            except AssertionError as e:
                raise AssertionError(
                    f"after {[h[0] for h in history]}: {name} cut at I/O {n}/"
                    f"{len(count.trace)} ({count.trace[n - 1]}), {label}: {e}"
                ) from None


# ======================================================================
# kill: a real nvmgr process SIGKILLed at every I/O (tests/faultrun.py)
# ======================================================================


def cli(*args: object, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "nvmgr", *map(str, args)],
                          capture_output=True, env=ENV, input=input, check=False)


def faultrun(n: int, *args: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(FAULTRUN), str(n), "--", *map(str, args)],
                          capture_output=True, env=ENV, check=False)


def io_count(r: subprocess.CompletedProcess[bytes]) -> int:
    assert r.returncode == 0, r.stderr.decode()
    last = r.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("faultrun: ios="), last
    return int(last.split("=")[1])


def write_key(path: Path, k: bytes) -> Path:
    path.write_bytes(k)
    path.chmod(0o600)
    return path


@dataclasses.dataclass
class CliCase:
    """A CLI command to kill at every I/O, and how to read its outcome."""

    template: Path
    command: Callable[[Path], list[object]]
    key_args: list[object]
    section: str  # whose bytes are old-or-new
    old: bytes
    new: bytes
    names_old: list[str]
    names_new: list[str]
    kek: Kek | None = None


def cli_outcome(case: CliCase, img: Path) -> str:
    """``nvmgr check`` (exit 0; its JSON names the sections) and ``nvmgr get``."""
    c = cli("check", img, "-O", "json", *case.key_args)
    assert c.returncode == 0, f"nvmgr check: rc {c.returncode}: {c.stdout.decode()}{c.stderr.decode()}"
    names = [s["name"] for s in json.loads(c.stdout)["sections"]]
    g = cli("get", img, case.section, *case.key_args)
    assert g.returncode == 0, g.stderr.decode()
    assert g.stdout in (case.old, case.new), f"get returned {digest(g.stdout)}: a mix"
    assert names in (case.names_old, case.names_new), names
    got = (g.stdout, names)
    assert got in ((case.old, case.names_old), (case.new, case.names_new)), (
        "payload and section list disagree about the outcome"
    )
    return "old" if got == (case.old, case.names_old) else "new"


def kill_sweep(case: CliCase, work: Path) -> list[str]:
    dry = work / "dry"
    shutil.copyfile(case.template, dry)
    total = io_count(faultrun(0, *case.command(dry)))
    assert cli_outcome(case, dry) == "new"

    def one(n: int) -> str:
        img = work / f"kill{n}"
        shutil.copyfile(case.template, img)
        r = faultrun(n, *case.command(img))
        if n > total:
            assert r.returncode == 0, r.stderr.decode()
        else:
            assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        outcome = cli_outcome(case, img)  # read-only opens first
        canary = work / f"canary{n}"
        canary.write_bytes(os.urandom(500))
        p = cli("put", img, "canary", canary, *case.key_args)  # writable: finishes pending
        assert p.returncode == 0, p.stderr.decode()
        with Image.open(str(img), kek=case.kek) as after:  # in-process: cheaper
            assert after.check().ok
            assert all(s.home is None for s in after.directory.sections)
            assert after.get(case.section) == (case.old if outcome == "old" else case.new)
            assert after.get("canary") == canary.read_bytes()
        return outcome

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(one, range(1, total + 2)))
    assert outcomes[-1] == "new"
    outcomes = outcomes[:-1]
    assert_monotone(outcomes, [("kill", n, 0) for n in range(1, total + 1)])
    return outcomes


def _cli_template(work: Path, key: Kek | None = None, fmt: str = "raw") -> Path:
    t = work / f"template.{fmt}"
    build_small(str(t), fmt, key=key)
    return t


def test_kill_cli_put(workdir: Path) -> None:
    new = workdir / "new.bin"
    new.write_bytes(rand(7001, "cli-new"))
    case = CliCase(_cli_template(workdir), lambda p: ["put", p, "vtpm", new], [], "vtpm",
                   rand(6000, "vtpm"), new.read_bytes(), [s.name for s in SMALL],
                   [s.name for s in SMALL])
    outcomes = kill_sweep(case, workdir)
    POINTS["cli put/kill"] = len(outcomes)
    print(f"cli put: {len(outcomes)} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_put_encrypted(workdir: Path) -> None:
    raw_key = os.urandom(32)
    key = write_key(workdir / "k", raw_key)
    new = workdir / "new.bin"
    new.write_bytes(rand(7001, "cli-enc"))
    case = CliCase(_cli_template(workdir, Kek(raw_key)),
                   lambda p: ["put", p, "vtpm", new, "--key-file", key], ["--key-file", key],
                   "vtpm", rand(6000, "vtpm"), new.read_bytes(), [s.name for s in SMALL],
                   [s.name for s in SMALL], Kek(raw_key))
    outcomes = kill_sweep(case, workdir)
    POINTS["cli put encrypted/kill"] = len(outcomes)
    print(f"cli put --key-file: {len(outcomes)} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_put_live(workdir: Path) -> None:
    new = workdir / "new.bin"
    new.write_bytes(rand(8192, "cli-live"))
    case = CliCase(_cli_template(workdir), lambda p: ["put", p, "efivars", new], [], "efivars",
                   rand(8192, "efivars"), new.read_bytes(), [s.name for s in SMALL],
                   [s.name for s in SMALL])
    outcomes = kill_sweep(case, workdir)
    POINTS["cli put live/kill"] = len(outcomes)
    print(f"cli put live: {len(outcomes)} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_grow(workdir: Path) -> None:
    names = [s.name for s in SMALL]
    case = CliCase(_cli_template(workdir),
                   lambda p: ["grow", p, "-s", "vpd:32K:fwcfg", "-s", "flash2:16K:pflash"], [],
                   "vtpm", rand(6000, "vtpm"), rand(6000, "vtpm"), names,
                   [*names, "flash2", "vpd"])
    outcomes = kill_sweep(case, workdir)
    POINTS["cli grow/kill"] = len(outcomes)
    print(f"cli grow: {len(outcomes)} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_grow_live(workdir: Path) -> None:
    """``nvmgr grow --content`` on a running VM's image (live section in use),
    SIGKILLed at every I/O: the new sections are absent, or present with
    exactly their first bytes; everything else as it was."""
    template = workdir / "template.raw"
    build_in_use_with_hole(str(template), "raw")
    state0, fru = workdir / "state0.bin", workdir / "fru.bin"
    state0.write_bytes(rand(10000, "cli-state0"))
    fru.write_bytes(rand(3000, "cli-fru"))
    names = [s.name for s in SMALL if s.name != "eeprom"]

    def command(p: Path) -> list[object]:
        return ["grow", p, "-s", "state0:16K:block", "-s", "fru:4K",
                "--content", f"state0={state0}", "--content", f"fru={fru}"]

    shutil.copyfile(template, workdir / "dry")
    total = io_count(faultrun(0, *command(workdir / "dry")))
    vtpm = rand(6000, "vtpm")

    def one(n: int) -> str:
        img = workdir / f"kill{n}"
        shutil.copyfile(template, img)
        r = faultrun(n, *command(img))
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        c = cli("check", img, "-O", "json")
        assert c.returncode == 0, c.stdout.decode() + c.stderr.decode()
        got = [s["name"] for s in json.loads(c.stdout)["sections"]]
        assert cli("get", img, "vtpm").stdout == vtpm
        if got == names:
            return "old"
        assert got == [*names, "state0", "fru"], got
        assert cli("get", img, "state0").stdout == state0.read_bytes()
        assert cli("get", img, "fru").stdout == fru.read_bytes()
        return "new"

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(one, range(1, total + 1)))
    assert_monotone(outcomes + ["new"], [("kill", n, 0) for n in range(1, total + 2)])
    POINTS["cli grow live/kill"] = len(outcomes)
    print(f"cli grow live: {len(outcomes)} kill points: {''.join(o[0] for o in outcomes)}")


def test_kill_cli_rekey(workdir: Path) -> None:
    """Killed mid-rekey: exactly one of the two keys opens the image, and it
    is the one the directory names."""
    old_raw, new_raw = os.urandom(32), os.urandom(32)
    old_k, new_k = write_key(workdir / "old.key", old_raw), write_key(workdir / "new.key", new_raw)
    template = _cli_template(workdir, Kek(old_raw))
    cmd = ["--key-file", old_k, "--new-key-file", new_k]
    dry = workdir / "dry"
    shutil.copyfile(template, dry)
    total = io_count(faultrun(0, "rekey", dry, *cmd))
    outcomes = []
    for n in range(1, total + 2):
        img = workdir / f"kill{n}"
        shutil.copyfile(template, img)
        r = faultrun(n, "rekey", img, *cmd)
        assert r.returncode == (0 if n > total else -signal.SIGKILL), r.stderr.decode()
        opens = {}
        for name, k in (("old", old_k), ("new", new_k)):
            g = cli("get", img, "vtpm", "--key-file", k)
            assert g.returncode in (0, 5), g.stderr.decode()  # 5: wrong key
            if g.returncode == 0:
                assert g.stdout == rand(6000, "vtpm")
                opens[name] = k
        assert len(opens) == 1, f"kill at I/O {n}: keys that open the image: {sorted(opens)}"
        (name, k), = opens.items()
        info = json.loads(cli("info", img, "-O", "json").stdout)
        ids = [s["key_id"] for s in info["key_slots"]]
        assert ids == [Kek(old_raw if name == "old" else new_raw).key_id.hex()]
        c = cli("check", img, "--key-file", k)
        assert c.returncode == 0, c.stdout.decode()
        outcomes.append(name)
    assert outcomes[-1] == "new"
    assert_monotone(outcomes[:-1], [("kill", n, 0) for n in range(1, total + 1)])
    POINTS["cli rekey/kill"] = total
    print(f"cli rekey: {total} kill points: {''.join(o[0] for o in outcomes[:-1])}")


def kill_daemons(path: Path) -> None:
    """SIGKILL the qemu-storage-daemon serving *path* (one this test started)."""
    pids = _daemons_serving(path)
    assert pids, f"no qemu-storage-daemon serves {path}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert not _wait_daemons_gone(path)


def qemu_img_check(path: Path) -> None:
    """QEMU's own view: no corruption (exit 2); leaked clusters (exit 3) are fine."""
    r = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode in (0, 3), f"qemu-img check: rc {r.returncode}: {r.stdout}{r.stderr}"


def _daemons_serving(path: Path) -> list[int]:
    """Pids of qemu-storage-daemon processes whose command line names *path*."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-storage-daemon") and any(
            str(path).encode() in a for a in cmd
        ):
            out.append(int(pid))
    return out


def test_kill_cli_put_qcow2_leaves_old_or_new(workdir: Path) -> None:
    """Killing nvmgr mid-put on a qcow2 image: the bytes are old or new (read-only
    opens, which share the image with whatever still holds it)."""
    img = _cli_template(workdir, fmt="qcow2")
    new = workdir / "new.bin"
    new.write_bytes(rand(7001, "q-new"))
    dry = workdir / "dry.qcow2"
    shutil.copyfile(img, dry)
    total = io_count(faultrun(0, "put", dry, "vtpm", new))
    outcomes = []
    try:
        for n in range(1, total + 1):
            p = workdir / f"kill{n}.qcow2"
            shutil.copyfile(img, p)
            r = faultrun(n, "put", p, "vtpm", new)
            assert r.returncode == -signal.SIGKILL, r.stderr.decode()
            assert not _wait_daemons_gone(p)  # it holds the flock until it is gone
            assert cli("check", p).returncode == 0
            g = cli("get", p, "vtpm").stdout
            assert g in (rand(6000, "vtpm"), new.read_bytes())
            outcomes.append("old" if g == rand(6000, "vtpm") else "new")
    finally:
        for n in range(1, total + 1):
            for pid in _daemons_serving(workdir / f"kill{n}.qcow2"):
                os.kill(pid, signal.SIGTERM)
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    POINTS["cli put qcow2/kill"] = total


def _wait_daemons_gone(path: Path, timeout: float = 15.0) -> list[int]:
    """Wait for the daemons serving *path* to exit; return those still there.

    A daemon told to stop by its parent-death signal shuts down cleanly (flush,
    unmount): seconds on a busy machine (5 s was once too short in a full run)."""
    deadline = time.monotonic() + timeout
    while (left := _daemons_serving(path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_kill_cli_qcow2_takes_its_daemon_along(workdir: Path) -> None:
    """A SIGKILLed nvmgr must not leave a qemu-storage-daemon holding the image
    (QEMU's write lock would make it look like a running VM forever)."""
    img = _cli_template(workdir, fmt="qcow2")
    new = workdir / "new.bin"
    new.write_bytes(rand(7001, "q-new"))
    with Image.open(str(img)):
        assert _daemons_serving(img), "the daemon detector finds nothing: the test is blind"
    assert not _wait_daemons_gone(img)
    try:
        for n in (1, 3):  # before any write; between the data and the commit
            r = faultrun(n, "put", img, "vtpm", new)
            assert r.returncode == -signal.SIGKILL
            assert not _wait_daemons_gone(img), "qemu-storage-daemon outlived the killed nvmgr"
        p = cli("put", img, "vtpm", new)
        assert p.returncode == 0, p.stderr.decode()
        assert cli("get", img, "vtpm").stdout == new.read_bytes()
    finally:
        for pid in _daemons_serving(img):  # only daemons our own runs started
            os.kill(pid, signal.SIGTERM)


# ======================================================================
# sanity: the harness catches broken protocols
# ======================================================================


class InPlacePut(Image):
    """BROKEN: put overwrites the CURRENT slot, then commits."""

    def put(self, name: str, data: bytes, *, progress: Progress | None = None) -> Section:
        s = self.section(name)
        self._write_flush(s.offset, data, None)
        new = self._copy_dir()
        ns = new.find(name)
        assert ns is not None
        ns.length, ns.crc32 = len(data), zlib.crc32(data)
        self._commit(new)
        return self.section(name)


class CommitBeforeFlush(Image):
    """BROKEN: put writes the spare slot but commits before flushing it."""

    def put(self, name: str, data: bytes, *, progress: Progress | None = None) -> Section:
        s = self.section(name)
        assert s.spare is not None and s.crypto is None
        self.container.write(s.spare, data)
        new = self._copy_dir()
        ns = new.find(name)
        assert ns is not None
        ns.length, ns.crc32, ns.offset, ns.spare = len(data), zlib.crc32(data), s.spare, s.offset
        self._commit(new)
        return self.section(name)


class CommitInPlace(Image):
    """BROKEN: _commit overwrites the CURRENT header copy."""

    def _commit(self, new: Directory) -> None:
        from nvmgr.format import codec

        new = dataclasses.replace(new, generation=self.directory.generation + 1)
        blob = codec.encode_header(new, self._directory_mac(new))
        pad = max(0, self._written[self._slot] - len(blob))
        self.container.write(self._slot * new.header_area, blob + bytes(pad))
        self.container.flush()
        self._written[self._slot] = len(blob)
        self.directory = new


class TwoStepRekey(Image):
    """BROKEN: rekey adds the new slot in one commit and drops the old in another."""

    def rekey(self, new_kek: Kek, *, keep_old: bool = False) -> None:
        from nvmgr.format.model import KeySlot

        self._get_cipher()
        assert self.directory.key_slots is not None
        both = self._copy_dir()
        both.key_slots = [*self.directory.key_slots,
                          KeySlot(new_kek.key_id, new_kek.wrap(self._data_key), new_kek.label)]
        self._commit(both)
        only = self._copy_dir()
        only.key_slots = [k for k in both.key_slots if k.key_id == new_kek.key_id]
        self._commit(only)


def _broken(sid: str, cls: type[Image], op: Callable[[Image], object] | None = None) -> Scenario:
    return dataclasses.replace(SCENARIOS[sid], id=f"broken-{sid}", image_cls=cls,
                               op=op or SCENARIOS[sid].op)


def test_sanity_in_place_put_is_caught(workdir: Path) -> None:
    scn = _broken("put", InPlacePut)
    with pytest.raises(AssertionError, match=r"crash at I/O [23]/4.*check\(\) found errors"):
        Harness(scn, workdir).exceptions()


def test_sanity_in_place_live_put_is_caught(workdir: Path) -> None:
    scn = _broken("put-live", InPlacePut)
    with pytest.raises(AssertionError, match=r"check\(\) found errors"):
        Harness(scn, workdir).exceptions()


def test_sanity_commit_before_flush_needs_the_power_loss_model(workdir: Path) -> None:
    scn = _broken("put", CommitBeforeFlush)
    Harness(scn, workdir).exceptions()  # a crashed process loses nothing: passes
    with pytest.raises(AssertionError, match=r"power loss.*check\(\) found errors"):
        Harness(scn, workdir).power_loss()


def test_sanity_in_place_header_commit_is_caught_by_torn_writes(workdir: Path) -> None:
    # Encrypted: the header (570 bytes with its MAC) spans two sectors, so even a
    # sector-atomic disk can tear it.
    scn = _broken("put-encrypted", CommitInPlace)
    Harness(scn, workdir).exceptions()  # whole-write crashes cannot tell
    with pytest.raises(AssertionError, match=r"power loss, \(d\) write 0 torn at sector 512"):
        Harness(scn, workdir).power_loss(byte_cut=False)


def test_sanity_two_step_rekey_is_caught(workdir: Path) -> None:
    scn = _broken("rekey", TwoStepRekey)
    with pytest.raises(AssertionError, match=r"unlocks=\['new', 'old'\]"):
        Harness(scn, workdir).exceptions()


def test_sanity_mixed_payload_is_caught(workdir: Path) -> None:
    """A crc-valid but wrong payload (here: the old bytes under a new length) is a mix."""
    def truncate_in_place(img: Image) -> None:
        new = img._copy_dir()
        ns = new.find("vtpm")
        assert ns is not None
        data = img.get("vtpm")[:3000]
        ns.length, ns.crc32 = 3000, zlib.crc32(data)
        img._commit(new)
        new = img._copy_dir()
        ns = new.find("vtpm")
        assert ns is not None
        img._write_flush(ns.spare or 0, rand(7001, "vtpm-new"), None)
        ns.offset, ns.spare = ns.spare or 0, ns.offset
        ns.length, ns.crc32 = 7001, zlib.crc32(rand(7001, "vtpm-new"))
        img._commit(new)

    scn = dataclasses.replace(SCENARIOS["put"], id="broken-mix", op=truncate_in_place)
    with pytest.raises(AssertionError, match="neither the old nor the new"):
        Harness(scn, workdir).exceptions()



def test_sanity_cli_judge_catches_a_mixed_slot(workdir: Path) -> None:
    """The kill sweep's judge (nvmgr check + get) fails on a half-written slot,
    and the monotonicity check on a crash that went back to old."""
    img = _cli_template(workdir)
    with Image.open(str(img)) as i:
        off = i.section("vtpm").offset
    with open(img, "r+b") as f:  # the first sector of the current slot: new bytes
        f.seek(off)
        f.write(rand(512, "vtpm-new"))
    names = [s.name for s in SMALL]
    case = CliCase(img, lambda p: [], [], "vtpm", rand(6000, "vtpm"), rand(6000, "x"), names,
                   names)
    with pytest.raises(AssertionError, match="nvmgr check: rc 4"):
        cli_outcome(case, img)
    with pytest.raises(AssertionError, match="went back to the old state"):
        assert_monotone(["old", "new", "old", "new"], [("w", 0, 0)] * 4)


# ======================================================================
# a damaged header copy: the other must stand in, not section data
# ======================================================================


def test_damaged_copy_b_never_lets_section_data_pose_as_a_header(workdir: Path) -> None:
    from nvmgr.format import codec
    from nvmgr.format.layout import layout

    path = str(workdir / "vm.img")
    specs = [SectionSpec("efivars", 540672, Binding.PFLASH),  # OVMF_VARS_4M-sized
             SectionSpec("vtpm", 65536, Binding.TPM), SectionSpec("canary", 1024)]
    forged = dataclasses.replace(layout([], header_area=131072), generation=1 << 40,
                                 image_size=262144)
    with Image.create(path, specs) as img:
        img.put("vtpm", b"precious TPM state")
        assert img.directory.header_area == 65536
        assert img.section("efivars").offset == 131072  # = a larger header area size
        img.put("efivars", codec.encode_header(forged))  # what a guest may write there
        names = [s.name for s in img.directory.sections]
    # Copy B's first sector is garbage: a media error, or a write torn below
    # sector granularity whose mix no longer parses (e.g. when the commit
    # changed the header's DER length form).
    with open(path, "r+b") as f:
        f.seek(65536)
        f.write(b"\xff" * 16)
    with Image.open(path) as img:
        assert [s.name for s in img.directory.sections] == names, "a foreign directory"
        assert img.directory.header_area == 65536
        assert img.get("vtpm") == b"precious TPM state"
    with Image.open(path, writable=True) as img:
        img.put("canary", b"after")
    with Image.open(path) as img:
        assert img.get("vtpm") == b"precious TPM state"
        assert img.check().ok
