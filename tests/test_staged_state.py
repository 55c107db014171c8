"""swtpm's staged state files are written by swtpm's user, then read by the
root hook at release (and at prepare after a crash): hostile ones are refused
or skipped, never followed, never read without bound."""

from __future__ import annotations

import os
from pathlib import Path

from hookdom import wired_domain

from nvmgr.errors import ExitCode


def _started(tmp_path: Path, tag: str):  # type: ignore[no-untyped-def]
    d = wired_domain(tmp_path, tag)
    r = d.hook("prepare", "begin")
    assert r.returncode == 0, r.stderr.decode()
    # What swtpm's first run leaves (nothing was staged: a new image's TPM is
    # manufactured by swtpm_setup at the first start).
    d.tpm_dir.mkdir(parents=True, exist_ok=True)
    permall = d.tpm_dir / "tpm2-00.permall"
    permall.write_bytes(os.urandom(6110))
    return d, permall


def test_a_state_file_larger_than_its_section_is_refused_unread(tmp_path: Path) -> None:
    d, permall = _started(tmp_path, "big")
    before = d.image.read_bytes()
    with open(permall, "r+b") as f:  # sparse: 64 MiB that the hook must not read
        f.truncate(64 << 20)
    r = d.hook("release", "end")
    assert r.returncode == ExitCode.INVALID_INPUT, r.stderr.decode()
    err = r.stderr.decode()
    assert f"swtpm state file {permall} holds {64 << 20} bytes" in err, err
    assert d.image.read_bytes() == before  # nothing collected, nothing sealed
    assert permall.stat().st_size == 64 << 20  # left for whoever looks into it


def test_a_link_or_a_fifo_in_place_of_a_state_file_is_never_read(tmp_path: Path) -> None:
    d, permall = _started(tmp_path, "link")
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's secret " * 100)
    secret.chmod(0o600)
    permall.unlink()
    permall.symlink_to(secret)
    volatile = d.tpm_dir / "tpm2-00.volatilestate"
    if volatile.exists():
        volatile.unlink()
    os.mkfifo(volatile)  # a read would block the hook for ever
    r = d.hook("release", "end")
    assert r.returncode == 0, r.stderr.decode()
    assert b"root's secret" not in d.image.read_bytes()
    # The next start stages the image's own state again.
    r = d.hook("prepare", "begin")
    assert r.returncode == 0, r.stderr.decode()
