"""The libvirt hook SIGKILLed at every I/O of prepare and of release.

``tests/faultrun.py --hook`` runs the real hook entry in its own process, the
domain XML on stdin as libvirtd gives it, and SIGKILLs it before its N-th I/O:
every image write, flush and resize and every write, fsync, rename and
unlink of a staged swtpm or runtime file.  For every N of each call:

- the image is never damaged: ``check`` passes (a live section may still be
  marked in use);
- the TPM state is never lost: the newest state swtpm left is in the image,
  or still staged in swtpm's directory (whole, never a torn or zeroed file),
  where the next prepare collects it;
- the start goes on: a killed prepare is a failed start (libvirtd refuses it
  and runs release); the next prepare, with or without that release first,
  succeeds and stages the newest state, and one more run and release leaves
  the image clean with the newest TPM state and the guest's UEFI variables,
  and nothing staged.

Prepare is killed on a first start (the image created) and on a later start;
release after a run in which swtpm and the guest both wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hookdom
import pytest
from hookdom import HookDomain, wired_domain

from nvmgr.image.image import Image

WORKERS = max(2, min(4, os.cpu_count() or 2))
PERMALL = "tpm2-00.permall"
S0 = b"TPM state as swtpm manufactured it " * 100
S1 = b"TPM state after the guest ran " * 120
V1 = b"UEFI variables the guest wrote " * 1000


def staged(d: HookDomain) -> bytes | None:
    p = d.tpm_dir / PERMALL
    return p.read_bytes() if p.exists() else None


def guest_run(d: HookDomain, state: bytes, vars_: bytes) -> None:
    """What a run does between prepare and release: swtpm rewrites its state
    file, QEMU writes UEFI variables into the live slice."""
    d.tpm_dir.mkdir(parents=True, exist_ok=True)
    (d.tpm_dir / PERMALL).write_bytes(state)
    with Image.open(str(d.image)) as img:
        off = img.section("uefi-vars").offset
    with open(d.image, "r+b") as f:
        f.seek(off)
        f.write(vars_)


def image_state(d: HookDomain) -> tuple[bytes, bytes]:
    """(TPM section, UEFI vars) of a sound image; asserts check() passes."""
    with Image.open(str(d.image)) as img:
        report = img.check()
        assert report.ok, report.errors
        return img.get("tpm-permall"), img.get("uefi-vars")


def ok(r: object) -> None:
    assert r.returncode == 0, r.stderr.decode()  # type: ignore[attr-defined]


def snapshot(d: HookDomain, to: Path) -> None:
    shutil.rmtree(to, ignore_errors=True)
    to.mkdir()
    if d.image.exists():
        shutil.copy2(d.image, to / "image")
    shutil.copytree(d.swtpm_root, to / "swtpm")
    shutil.copytree(d.runtime_root, to / "run")


def restore(d: HookDomain, frm: Path) -> None:
    if (frm / "image").exists():
        shutil.copy2(frm / "image", d.image)
    elif d.image.exists():
        d.image.unlink()
    for sub, dst in (("swtpm", d.swtpm_root), ("run", d.runtime_root)):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(frm / sub, dst)


def clone(d: HookDomain, work: Path, n: int) -> HookDomain:
    """The same domain in a directory of its own (the sweep runs in parallel)."""
    w = work / f"p{n}"
    w.mkdir()
    image = w / d.image.name
    return HookDomain(d.name, d.uuid, d.xml.replace(str(d.image), str(image)), image,
                      w / "swtpm", hookdom.volatile_dir(f"run-p{n}"), w / "hook.log")


def finish_and_verify(d: HookDomain, newest: bytes, vars_: bytes, *,
                      release_first: bool) -> None:
    """After a kill: (release,) prepare, a run, release; nothing lost, image clean."""
    if release_first:
        ok(d.hook("release", "end"))  # libvirtd's answer to a failed start
    ok(d.hook("prepare", "begin"))
    assert staged(d) == newest, "prepare did not stage the newest TPM state"
    tpm, got_vars = image_state(d)
    assert tpm == newest
    assert got_vars[:len(vars_)] == vars_
    guest_run(d, S1 + b" and once more", vars_)
    ok(d.hook("release", "end"))
    tpm, got_vars = image_state(d)
    assert tpm == S1 + b" and once more"
    assert got_vars[:len(vars_)] == vars_
    assert staged(d) is None, "release left the TPM state staged"
    assert not (d.runtime_root / d.uuid).exists()
    with Image.open(str(d.image)) as img:
        assert not any(s.dirty for s in img.directory.sections), "a mark was left"


def sweep(d: HookDomain, work: Path, op: str, sub: str,
          judge: Callable[[HookDomain, int], str]) -> list[str]:
    """Kill ``op sub`` at every one of its I/Os, each on a fresh copy of d's state."""
    base = work / "base"
    snapshot(d, base)
    dry = clone(d, work, 0)
    restore(dry, base)
    total = dry.ios(op, sub)

    def one(n: int) -> str:
        c = clone(d, work, n)
        restore(c, base)
        r = c.hook(op, sub, kill_at=n)
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr.decode())
        try:
            return judge(c, n)
        except AssertionError as e:
            raise AssertionError(f"{op} killed at I/O {n}/{total}: {e}") from None
        finally:
            shutil.rmtree(work / f"p{n}", ignore_errors=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(one, range(1, total + 1)))
    print(f"{op} {sub}: {total} kill points: {' '.join(outcomes)}")
    return outcomes


@pytest.fixture
def dom(tmp_path: Path) -> HookDomain:
    return wired_domain(tmp_path, "kill")


def after_first_run(d: HookDomain) -> None:
    """A domain that ran once: its TPM manufactured (S0) and collected."""
    ok(d.hook("prepare", "begin"))
    guest_run(d, S0, b"")
    ok(d.hook("release", "end"))
    assert image_state(d)[0] == S0 and staged(d) is None


def test_prepare_killed_at_every_io_of_a_first_start(dom: HookDomain, tmp_path: Path) -> None:
    def judge(c: HookDomain, n: int) -> str:
        made = "none"
        if c.image.exists():
            if c.image.read_bytes().strip(b"\0"):
                with Image.open(str(c.image)) as img:
                    assert img.check().ok
                made = "image"
            else:  # created, killed before its first header: the next prepare makes it again
                made = "zeros"
        assert staged(c) is None
        r = c.hook("release", "end")  # libvirtd's answer to the failed start
        if made != "zeros":  # (on the remains of a cut-short creation it refuses: no image)
            ok(r)
        ok(c.hook("prepare", "begin"))  # the start tried again
        guest_run(c, S0, V1)  # swtpm manufactures the TPM, the guest writes variables
        ok(c.hook("release", "end"))
        tpm, got_vars = image_state(c)
        assert tpm == S0 and got_vars[:len(V1)] == V1
        assert staged(c) is None
        with Image.open(str(c.image)) as img:
            assert not any(s.dirty for s in img.directory.sections)
        return made

    sweep(dom, tmp_path, "prepare", "begin", judge)


def test_prepare_killed_at_every_io_of_a_later_start(dom: HookDomain, tmp_path: Path) -> None:
    after_first_run(dom)

    def judge(c: HookDomain, n: int) -> str:
        release_first = n % 2 == 1  # libvirtd's release of the failed start, or none
        tpm, _ = image_state(c)
        assert tpm == S0
        left = staged(c)
        assert left in (None, S0), "a staged file that is not the TPM's state"
        finish_and_verify(c, S0, b"", release_first=release_first)
        return "staged" if left else "-"

    sweep(dom, tmp_path, "prepare", "begin", judge)


def test_release_killed_at_every_io(dom: HookDomain, tmp_path: Path) -> None:
    after_first_run(dom)
    ok(dom.hook("prepare", "begin"))
    guest_run(dom, S1, V1)  # swtpm and the guest both wrote

    def judge(c: HookDomain, n: int) -> str:
        tpm, _ = image_state(c)
        left = staged(c)
        assert tpm == S1 or (tpm == S0 and left == S1), (
            f"TPM state lost: image has {'S0' if tpm == S0 else tpm[:20]!r}, staged "
            f"{left[:20] if left else None!r}")
        assert left in (None, S1), "a staged file that is not the TPM's state"
        with open(c.image, "rb") as f:  # the guest's bytes stay in the slice
            with Image.open(str(c.image)) as img:
                f.seek(img.section("uefi-vars").offset)
            assert f.read(len(V1)) == V1
        finish_and_verify(c, S1, V1, release_first=False)
        return "collected" if tpm == S1 else "staged"

    outcomes = sweep(dom, tmp_path, "release", "end", judge)
    assert "staged" in outcomes and "collected" in outcomes
