"""The watcher as a service: reconnects when libvirtd restarts, one line per action,
a clean exit on SIGTERM (issue 9, part 5).

Against a libvirtd of the test's own (:mod:`.privatelibvirtd`), which the
test stops and starts again while the watcher runs; the system libvirtd is
never restarted.  No VM is started: defines, undefines and the watcher's
reconciles only.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import vmlib
from .privatelibvirtd import PrivateLibvirtd
from .watchlib import Watcher

pytestmark = pytest.mark.e2e

WIRED = "pflash1=nvmgr-uefi-vars"


@pytest.fixture
def lvd(e2e_env: Path) -> Iterator[PrivateLibvirtd]:
    d = PrivateLibvirtd("watch")
    images: list[Path] = []
    d.images = images  # type: ignore[attr-defined]
    try:
        d.start()
        yield d
    finally:
        d.close()
        for p in images:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _define_asking(lvd: PrivateLibvirtd, tmp_path: Path, what: str) -> str:
    name = vmlib.new_name(what)
    xml = vmlib.domain_xml(name, str(uuid.uuid4()), tpm=False, metadata_attrs={"format": "raw"})
    assert WIRED not in xml
    f = tmp_path / f"{name}.xml"
    f.write_text(xml)
    lvd.images.append(vmlib.image_of(name))  # type: ignore[attr-defined]
    lvd.virsh("define", str(f))
    return name


def _wired(lvd: PrivateLibvirtd, name: str) -> bool:
    return WIRED in lvd.virsh("dumpxml", "--inactive", name).stdout


def test_the_watcher_reconnects_after_a_libvirtd_restart_and_stops_on_sigterm(
        lvd: PrivateLibvirtd, tmp_path: Path) -> None:
    w = Watcher("--connect", lvd.uri)
    try:
        w.wait_line(f"watching libvirt at {lvd.uri}", stream="err")
        first = _define_asking(lvd, tmp_path, "rc1")
        first_uuid = lvd.virsh("domuuid", first).stdout.strip()
        w.wait_line(f"{first}: reconciled", stream="out")
        assert _wired(lvd, first)

        lvd.stop()
        w.wait_line("lost the connection to libvirtd; reconnecting", stream="err")
        w.wait_line("cannot reach libvirt", stream="err")
        # Defined while the watcher was away: the catch-up after the reconnect wires it.
        lvd.start()
        w.wait_line(f"reconnected to libvirt at {lvd.uri}", stream="err")
        second = _define_asking(lvd, tmp_path, "rc2")
        w.wait_line(f"{second}: reconciled", stream="out")
        assert _wired(lvd, second)

        # Undefined behind nvmgr's back: its image is an orphan.
        lvd.virsh("undefine", first)
        w.wait_line(f"{first}: undefined; its image {vmlib.image_of(first)} recorded as "
                    "orphaned", stream="out")
        images = json.loads(vmlib.nvmgr("images", "--orphans", "--connect", lvd.uri,
                                        "--output", "json").stdout)["images"]
        mine = {i["path"]: i for i in images}
        entry = mine[str(vmlib.image_of(first))]
        assert entry["state"] == "orphaned" and entry["domain_uuid"] == first_uuid
        assert entry["domain"] == first and entry["orphaned_since"]  # recorded in the image
        assert str(vmlib.image_of(second)) not in mine  # defined: not an orphan
    finally:
        t0 = time.monotonic()
        code = w.stop()
        took = time.monotonic() - t0
        print("\n".join(w.out + w.err))
    assert code == 0, w.err
    assert w.err[-1] == "nvmgr: stopped on SIGTERM", w.err
    assert not any("Traceback" in line for line in w.err)
    print(f"stopped {took:.2f} s after SIGTERM")
    # One line per action, each action once: no repeats from its own defines' events.
    assert w.out == [f"{first}: reconciled (added uefi-vars)",
                     f"{second}: reconciled (added uefi-vars)",
                     f"{first}: undefined; its image {vmlib.image_of(first)} recorded as "
                     "orphaned (nvmgr images --orphans; nvmgr define --adopt or --fresh)"], w.out
