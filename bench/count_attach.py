#!/usr/bin/env python3
"""What one ``nvmgr attach --live`` of a block section does, counted: libvirt
calls, QMP commands (through libvirt's monitor passthrough), domain-XML
parses, image opens and directory commits, and the time of each phase.

On one running UEFI + TPM 2.0 guest (``examples``' domain of the e2e tests,
TCG, with spare PCIe root ports, at OVMF's shell), ``--rounds`` library calls
of :func:`nvmgr.virt.attach.attach` (each a 1 MiB ``block`` section with a
``virtio-blk-pci`` device) in this process, every counted thing wrapped.  It
prints a table per round (counts) and the median time; it asserts nothing and
writes nothing to ``bench/RESULTS.md`` (the timing bench is
``bench/bench_attach.py``).

Needs root, libvirtd, QEMU, swtpm, OVMF and the nvmgr hook; waits for the e2e
lock (/run/lock/nvmgr-e2e.lock).  About a minute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

import libvirt  # noqa: E402
from bench_attach import domain_xml  # noqa: E402

from nvmgr.image.image import Image  # noqa: E402
from nvmgr.virt import attach as attach_mod  # noqa: E402
from nvmgr.virt import hotplug  # noqa: E402
from tests.e2e import vmlib  # noqa: E402

NS = vmlib.NVMGR_NS


class Counter:
    def __init__(self) -> None:
        self.n: collections.Counter[str] = collections.Counter()
        self.t: collections.Counter[str] = collections.Counter()

    def wrap(self, owner: Any, attr: str, label: str,
             detail: Callable[..., str] | None = None) -> Callable[[], None]:
        real = getattr(owner, attr)

        def counted(*a: Any, **k: Any) -> Any:
            key = label + (f" {detail(*a, **k)}" if detail else "")
            self.n[key] += 1
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(owner, attr, counted)
        return lambda: setattr(owner, attr, real)


@contextlib.contextmanager
def counting(c: Counter) -> Iterator[None]:
    undo = [
        c.wrap(libvirt, "open", "libvirt open"),
        c.wrap(libvirt, "openReadOnly", "libvirt openReadOnly"),
        c.wrap(libvirt.virConnect, "lookupByName", "libvirt lookupByName"),
        c.wrap(libvirt.virDomain, "XMLDesc", "libvirt XMLDesc"),
        c.wrap(libvirt.virDomain, "isActive", "libvirt isActive"),
        c.wrap(libvirt.virDomain, "isPersistent", "libvirt isPersistent"),
        c.wrap(libvirt.virDomain, "setMetadata", "libvirt setMetadata"),
        c.wrap(libvirt.virDomain, "metadata", "libvirt metadata (get)"),
        c.wrap(libvirt.virDomain, "attachDeviceFlags", "libvirt attachDeviceFlags"),
        c.wrap(hotplug, "qmp", "QMP", lambda _d, cmd, *_a, **_k: cmd),
        c.wrap(attach_mod, "parse_domain", "domain XML parse"),
        c.wrap(Image, "open", "Image.open"),
        c.wrap(Image, "_commit", "directory commit"),
        c.wrap(attach_mod, "plan_for", "plan_for"),
        c.wrap(attach_mod, "grow", "grow"),
        c.wrap(hotplug, "plug", "hotplug.plug"),
        c.wrap(attach_mod, "_live_metadata", "live metadata"),
    ]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/count_attach.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--profile-cli", action="store_true",
                    help="then one `nvmgr attach --live` process under cProfile (top 60 lines)")
    args = ap.parse_args(argv)
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vmlib.ensure_services()
        work = Path(tempfile.mkdtemp(prefix="count-attach-"))
        name, dom_uuid = vmlib.new_name("count-attach"), uuid.uuid4()
        try:
            vmlib.ensure_hook(work)
            xml = work / "dom.xml"
            xml.write_text(domain_xml(name, str(dom_uuid), args.rounds + 2))
            vmlib.nvmgr("define", xml)
            vmlib.start(name)
            vmlib.wait_for_shell(name, 300)
            times = []
            for i in range(args.rounds):
                c = Counter()
                lib = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='lib{i}' size='1M' "
                       f"binding='block' driver='virtio-blk-pci' device='nvmgr-lib{i}'/>")
                with counting(c):
                    t0 = time.perf_counter()
                    attach_mod.attach(name, lib, live=True)
                    times.append(time.perf_counter() - t0)
                print(f"round {i + 1}: {times[-1] * 1000:.1f} ms")
                for key in sorted(c.n):
                    print(f"  {c.n[key]:3d} x {key:40s} {c.t[key] * 1000:7.1f} ms")
            print(f"median {statistics.median(times) * 1000:.1f} ms over {len(times)}")
            if args.profile_cli:  # one `nvmgr attach --live` process under cProfile
                sec = work / "cli.xml"
                sec.write_text(f"<nvmgr:section xmlns:nvmgr='{NS}' name='cli0' size='1M' "
                               "binding='block' driver='virtio-blk-pci' device='nvmgr-cli0'/>")
                out = subprocess.run([sys.executable, "-m", "cProfile", "-s", "cumtime", "-m",
                                      "nvmgr", "attach", name, str(sec), "--live"],
                                     capture_output=True, text=True, check=True)
                print("\n".join(out.stdout.splitlines()[:60]))
            vmlib.destroy(name)
        finally:
            vmlib.cleanup_domain(name, str(dom_uuid), [])
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
