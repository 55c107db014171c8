"""Writers racing on one image: real ``nvmgr`` processes at once, raw and qcow2.

Six client threads each run ``nvmgr`` commands back to back for a bounded
time (a few seconds, and at least one round of every kind of call) on one
image: ``put`` (an ordinary section, a live one,
an encrypted one), ``get``, ``grow``, ``resize``, ``rekey`` (keeping the old
key, so every client's key stays good) and ``remove`` (of a section the
same client grew).  Half of the calls give ``--wait``.  The contract:

- a call without ``--wait`` succeeds (exit 0) or finds the image busy
  (exit 7); a call with ``--wait`` succeeds;
- every ``get`` returns one of the values written to that section;
- at the end ``nvmgr check`` passes, each shared section holds one of the
  values written to it, every section a client grew and did not remove is
  there, and none it removed.

Also the libvirt hook (prepare and release of a starting and stopping VM, run
as libvirtd runs it) racing CLI writers on the same image: the hook never
fails (it waits for the lock), a write to the live UEFI section while the
"VM" runs is refused with exit 7 (its in-use mark), and the image ends clean.

The time bound makes these tests take about as long everywhere; how many
calls collide depends on the machine (counts are printed with ``-s``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_key
from hookdom import wired_domain

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLIENTS = 6
SHARED = {"plain": "opaque", "efivars": "pflash", "secret": "tpm"}
#: Each client cycles through these, starting at its own place.
OPS = ("put", "grow", "get", "put", "resize", "rekey", "remove", "put", "get")
MIN_CALLS = 6  # client 0 then grows (call 1) before it removes (call 6)
CAPACITY = 8192


def nvmgr(*args: object, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "nvmgr", *map(str, args)], input=input,
                          capture_output=True, env=ENV, check=False, timeout=120)


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclasses.dataclass
class Ledger:
    """What the clients did and saw (guarded by one lock)."""

    written: dict[str, set[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set))
    read: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    exits: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    bad: list[str] = dataclasses.field(default_factory=list)
    grown: set[str] = dataclasses.field(default_factory=set)
    removed: set[str] = dataclasses.field(default_factory=set)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def outcome(self, what: str, waited: bool, r: subprocess.CompletedProcess[bytes]) -> bool:
        """Record a call's exit; False (and a complaint) unless 0, or 7 without --wait."""
        ok = r.returncode == 0 or (r.returncode == 7 and not waited)
        with self.lock:
            self.exits[f"{what}{' --wait' if waited else ''}: {r.returncode}"] += 1
            if not ok:
                self.bad.append(f"{what} (wait={waited}) exited {r.returncode}: "
                                f"{r.stderr.decode()[-400:]}")
        return r.returncode == 0


def client(n: int, img: Path, key: Path, key2: Path, work: Path, until: float,
           led: Ledger) -> None:
    rng = random.Random(f"client{n}")
    keys = ["--key-file", key]
    mine: list[str] = []
    i = 0
    # At least MIN_CALLS each: from their six starting places, every kind of call is made.
    while time.monotonic() < until or i < MIN_CALLS:
        i += 1
        waited = rng.random() < 0.5
        wait = ["--wait", "60"] if waited else []
        op = OPS[(n + i) % len(OPS)]
        if op == "put":
            name = rng.choice(sorted(SHARED))
            data = (f"client {n} call {i} ".encode()
                    + rng.randbytes(rng.randrange(0, 4000)))
            if name == "efivars":
                data = data.ljust(CAPACITY, b"\0")  # a live slice is written whole
            f = work / f"c{n}.{i}.bin"
            f.write_bytes(data)
            with led.lock:
                led.written[name].add(h(data))  # before the call: a get may see it at once
            led.outcome("put", waited, nvmgr("put", img, name, f, *wait, *keys))
        elif op == "get":
            name = rng.choice(sorted(SHARED))
            r = nvmgr("get", img, name, *wait, *keys)
            if led.outcome("get", waited, r):
                with led.lock:
                    led.read.append((name, h(r.stdout)))
        elif op == "grow" and len(mine) < 3:
            name = f"c{n}-{i}"
            if led.outcome("grow", waited, nvmgr("grow", img, "-s", f"{name}:4K", *wait)):
                mine.append(name)
                with led.lock:
                    led.grown.add(name)
        elif op == "resize":
            name = rng.choice(["plain", "secret"])
            size = rng.choice(["8K", "12K", "20K"])  # never below what a put wrote
            led.outcome("resize", waited, nvmgr("resize", img, name, size, *wait))
        elif op == "rekey":
            r = nvmgr("rekey", img, *keys, "--new-key-file", key2, "--keep-old", *wait)
            led.outcome("rekey", waited, r)
        elif op == "remove" and mine:
            name = mine.pop(0)
            if led.outcome("remove", waited, nvmgr("remove", img, name, *wait)):
                with led.lock:
                    led.removed.add(name)
            else:
                mine.append(name)


def race(img: Path, key: Path, key2: Path, work: Path, seconds: float,
         extra: Callable[[float, Ledger], None] | None = None) -> Ledger:
    led = Ledger()
    for name in SHARED:  # the values the image starts with
        r = nvmgr("get", img, name, "--key-file", key)
        assert r.returncode == 0, r.stderr.decode()
        led.written[name].add(h(r.stdout))
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(n, img, key, key2, work, until, led))
               for n in range(CLIENTS)]
    if extra is not None:
        threads.append(threading.Thread(target=extra, args=(until, led)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return led


def verify(img: Path, key: Path, led: Ledger) -> None:
    print(f"{img.name}: " + ", ".join(f"{k} x{v}" for k, v in sorted(led.exits.items())))
    assert not led.bad, "\n".join(led.bad[:5])
    assert sum(led.exits.values()) >= CLIENTS, "the clients made hardly any calls"
    for name, got in led.read:
        assert got in led.written[name], f"get {name} returned bytes nobody wrote"
    r = nvmgr("check", img, "--key-file", key)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    if any(k.startswith("rekey") and k.endswith(": 0") for k in led.exits):
        r = nvmgr("check", img, "--key-file", key.parent / "k2")  # the key rekey added
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    for name in SHARED:
        r = nvmgr("get", img, name, "--key-file", key)
        assert r.returncode == 0, r.stderr.decode()
        assert h(r.stdout) in led.written[name], f"{name} holds bytes nobody wrote"
    names = set(nvmgr("list", img).stdout.decode().split())
    assert led.grown - led.removed <= names
    assert not (led.removed & names)


def make_image(path: Path, fmt: str, key: Path) -> None:
    args = [f"-s{name}:{CAPACITY}:{binding}" for name, binding in SHARED.items()]
    r = nvmgr("create", path, "-f", fmt, *args, "--key-file", key)
    assert r.returncode == 0, r.stderr.decode()
    for name in SHARED:
        data = os.urandom(CAPACITY if name == "efivars" else 1000)
        r = nvmgr("put", path, name, "-", "--key-file", key, input=data)
        assert r.returncode == 0, r.stderr.decode()


@pytest.mark.parametrize("fmt,seconds", [("raw", 2.0), ("qcow2", 3.0)])
def test_writers_racing_on_one_image(fmt: str, seconds: float, tmp_path: Path) -> None:
    key, key2 = make_key(tmp_path / "k"), make_key(tmp_path / "k2")
    img = tmp_path / f"race.{fmt}"
    make_image(img, fmt, key)
    led = race(img, key, key2, tmp_path, seconds)
    verify(img, key, led)


def test_a_writer_waits_for_the_lock_or_is_told_busy(tmp_path: Path) -> None:
    """The two answers a writer can get while another holds the image, on demand."""
    from nvmgr.image.image import Image

    key = make_key(tmp_path / "k")
    img = tmp_path / "held.raw"
    make_image(img, "raw", key)
    data = tmp_path / "d"
    data.write_bytes(b"after the holder")
    holder = Image.open(str(img), writable=True)
    try:
        r = nvmgr("put", img, "plain", data, "--key-file", key)
        assert r.returncode == 7 and "--wait" in r.stderr.decode(), r.stderr.decode()
        r = nvmgr("get", img, "plain", "--key-file", key, "--wait", "0.2")
        assert r.returncode == 7 and "waited 0.2 s" in r.stderr.decode(), r.stderr.decode()
        waiter = subprocess.Popen(
            [sys.executable, "-m", "nvmgr", "put", img, "plain", data, "--key-file", key,
             "--wait", "60"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert waiter.poll() is None
    finally:
        holder.close()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err.decode()
    assert nvmgr("get", img, "plain", "--key-file", key).stdout == b"after the holder"


def test_the_hook_and_cli_writers_racing_on_a_starting_vm(tmp_path: Path) -> None:
    """prepare and release (a VM started and stopped again and again) racing
    CLI writers on its image: every hook call succeeds, a write into the live
    UEFI section is refused while the VM is marked running, and the image ends
    clean with one of the values written."""
    d = wired_domain(tmp_path, "race")
    r = d.hook("prepare", "begin")  # the first start creates the image
    assert r.returncode == 0, r.stderr.decode()
    d.tpm_dir.mkdir(parents=True, exist_ok=True)  # swtpm_setup manufactures the TPM
    (d.tpm_dir / "tpm2-00.permall").write_bytes(b"TPM state swtpm made")
    assert d.hook("release", "end").returncode == 0
    led = Ledger()
    for name in ("uefi-vars", "tpm-permall"):
        led.written[name].add(h(nvmgr("get", d.image, name).stdout))
    cycles = collections.Counter[str]()
    running = threading.Event()

    def vm(until: float, led: Ledger) -> None:
        n = 0
        while time.monotonic() < until:
            n += 1
            r = d.hook("prepare", "begin")
            if r.returncode != 0:
                led.bad.append(f"prepare exited {r.returncode}: {r.stderr.decode()[-400:]}")
                return
            running.set()
            state = f"TPM state of run {n}".encode()
            with led.lock:
                led.written["tpm-permall"].add(h(state))
            (d.tpm_dir / "tpm2-00.permall").write_bytes(state)  # swtpm at work
            running.clear()
            r = d.hook("release", "end")
            if r.returncode != 0:
                led.bad.append(f"release exited {r.returncode}: {r.stderr.decode()[-400:]}")
                return
            cycles["start-stop"] += 1

    def writer(until: float, led: Ledger, n: int) -> None:
        rng = random.Random(n)
        i = 0
        while time.monotonic() < until:
            i += 1
            name = rng.choice(["uefi-vars", "tpm-permall"])
            size = 540672 if name == "uefi-vars" else 3000
            data = f"writer {n} call {i} ".encode().ljust(size, b"\1")
            f = tmp_path / f"w{n}.{i}"
            f.write_bytes(data)
            with led.lock:
                led.written[name].add(h(data))
            waited = rng.random() < 0.5
            r = nvmgr("put", d.image, name, f, *(["--wait", "60"] if waited else []))
            busy_ok = r.returncode == 7 and (not waited or "in use" in r.stderr.decode())
            with led.lock:
                led.exits[f"put {name}: {r.returncode}"] += 1
                if r.returncode == 7 and "marked in use" in r.stderr.decode():
                    cycles["refused: in use"] += 1
                if r.returncode != 0 and not busy_ok:
                    led.bad.append(f"put {name} exited {r.returncode}: {r.stderr.decode()[-400:]}")

    until = time.monotonic() + 4.0
    threads = [threading.Thread(target=vm, args=(until, led))]
    threads += [threading.Thread(target=writer, args=(until, led, n)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"hook race: {dict(cycles)}; " + ", ".join(f"{k} x{v}" for k, v in led.exits.items()))
    assert not led.bad, "\n".join(led.bad[:5])
    assert cycles["start-stop"] >= 1
    r = nvmgr("check", d.image, "-O", "json")
    assert r.returncode == 0, r.stdout.decode()
    assert b'"warnings": []' in r.stdout, "a live section is still marked in use"
    for name in ("uefi-vars", "tpm-permall"):
        got = nvmgr("get", d.image, name)
        assert got.returncode == 0 and h(got.stdout) in led.written[name], name
    assert not list(d.tpm_dir.glob("tpm2-00.*")), "release left staged TPM state"
