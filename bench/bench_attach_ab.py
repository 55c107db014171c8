#!/usr/bin/env python3
"""The library path of ``nvmgr attach --live`` before and after a change, side by side.

Two warm worker processes on one running UEFI + TPM 2.0 guest (TCG, at
OVMF's shell, spare PCIe root ports): one imports nvmgr from this checkout,
the other from ``--base`` (a git revision, exported with ``git archive`` into
a temporary directory; default ``main``).  Each round both call
:func:`nvmgr.virt.attach.attach` once (a 1 MiB ``block`` section with a
``virtio-blk-pci`` device, ``--live``), the order alternating; each call is
timed inside its worker (``time.perf_counter``), so process start and
imports stay out (the CLI's own cost is ``bench/bench_attach.py``'s).  Beside
them ``virsh attach-device --live`` of a 1 MiB raw disk, interleaved the same
way, as the reference the issue's target names.

Both workers see the same machine and the same guest, its root ports taken
one more per attach by each: the cost that grows with taken ports grows for
both alike.  Medians and their ratios are printed and appended to
``bench/RESULTS.md`` (``--no-results``: not).  Needs root, libvirtd, QEMU,
swtpm, OVMF and the nvmgr hook; waits for the e2e lock.  About two minutes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_attach import SIZE, domain_xml, timed  # noqa: E402
from bench_hook import machine_info  # noqa: E402
from benchlib import compile_bytecode  # noqa: E402

from tests.e2e import vmlib  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
NS = vmlib.NVMGR_NS

#: The worker: nvmgr from the directory in argv[1]; one attach per stdin line.
WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import nvmgr
from nvmgr.virt.attach import attach
assert nvmgr.__file__.startswith(sys.argv[1]), nvmgr.__file__
print("ready", flush=True)
for line in sys.stdin:
    name, xml = json.loads(line)
    t0 = time.perf_counter()
    attach(name, xml, live=True)
    print(json.dumps(time.perf_counter() - t0), flush=True)
"""


def log(msg: str) -> None:
    print(f"bench_attach_ab: {msg}", file=sys.stderr, flush=True)


def export(rev: str, into: Path) -> str:
    """*rev*'s nvmgr package (and the schema it links to) under *into*; its commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                            capture_output=True, text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nvmgr", "schemas"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    # Bytecode written first, as an installed tree has it (a lazy import inside
    # the first call would otherwise time the compiler on one side only).
    compile_bytecode(sys.executable, into)
    return commit


class Worker:
    def __init__(self, root: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, str(root)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=tempfile.gettempdir())
        assert self.p.stdout is not None
        line = self.p.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"bench_attach_ab: worker for {root} did not start ({line!r})")

    def attach(self, name: str, xml: str) -> float:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps([name, xml]) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit("bench_attach_ab: a worker died")
        return float(json.loads(line))

    def close(self) -> None:
        if self.p.stdin is not None:
            self.p.stdin.close()
        self.p.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_attach_ab.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="the git revision to compare (default main)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (the system libvirtd)")
        return 2
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-attach-ab-"))
    base_root = work / "base"
    base_root.mkdir()
    base = export(args.base, base_root)
    samples: dict[str, list[float]] = {"new": [], "base": [], "virsh": []}
    disks: list[Path] = []
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vmlib.ensure_services()
        name, dom_uuid = vmlib.new_name("bench-ab"), uuid.uuid4()
        workers: dict[str, Worker] = {}
        try:
            vmlib.ensure_hook(work)
            info = machine_info()
            xml = work / "dom.xml"
            xml.write_text(domain_xml(name, str(dom_uuid), 3 * args.rounds + 2))
            vmlib.nvmgr("define", xml)
            vmlib.start(name)
            vmlib.wait_for_shell(name, 300)
            workers = {"new": Worker(ROOT), "base": Worker(base_root)}
            for i in range(args.rounds):
                disk = vmlib.IMAGE_DIR / f"{name}-disk{i}.img"
                with open(disk, "wb") as f:
                    f.truncate(SIZE)
                disks.append(disk)
                dev = work / f"disk{i}.xml"
                dev.write_text(f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                               f"<source file='{disk}'/><target dev='vd{chr(ord('b') + i)}' "
                               "bus='virtio'/></disk>")
                order = ["new", "base", "virsh"]
                order = order[i % 3:] + order[:i % 3]
                for label in (order if i % 2 == 0 else order[::-1]):
                    if label == "virsh":
                        samples[label].append(timed(["virsh", "-c", vmlib.URI, "attach-device",
                                                     name, str(dev), "--live"]))
                        continue
                    sec = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='{label}{i}' size='1M' "
                           f"binding='block' driver='virtio-blk-pci' "
                           f"device='nvmgr-{label}{i}'/>")
                    samples[label].append(workers[label].attach(name, sec))
                log(f"round {i + 1}/{args.rounds}: " + ", ".join(
                    f"{k} {v[-1] * 1000:.0f} ms" for k, v in samples.items()))
            vmlib.destroy(name)
            vmlib.nvmgr("check", "--domain", name)
        finally:
            for w in workers.values():
                w.close()
            vmlib.cleanup_domain(name, str(dom_uuid), disks)
            shutil.rmtree(work, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(samples[k]) * 1000

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lines = [
        f"\n## nvmgr attach --live, the library call: {head} vs {args.base} ({base}) "
        f"({info['date']})\n",
        f"Machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), {info['memory']}, "
        f"kernel {info['kernel']}; {info['libvirt']}; {info['qemu']}; "
        f"load average at start {info['loadavg_at_start']}.",
        f"Command: `bench/bench_attach_ab.py --base {args.base}` "
        f"({time.monotonic() - t0:.0f} s); order rotated and reversed each round.\n",
        "| step | n | median ms | min ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for label, k in ((f"`attach(..., live=True)`, this branch ({head})", "new"),
                     (f"`attach(..., live=True)`, {args.base} ({base})", "base"),
                     ("`virsh attach-device --live`, 1 MiB raw disk (whole command)", "virsh")):
        xs = samples[k]
        lines.append(f"| {label} | {len(xs)} | {med(k):.1f} | {min(xs) * 1000:.1f} | "
                     f"{max(xs) * 1000:.1f} |")
    lines.append(f"\nRatios of medians: this branch / {args.base} {med('new') / med('base'):.2f}x; "
                 f"this branch / virsh {med('new') / med('virsh'):.2f}x; "
                 f"{args.base} / virsh {med('base') / med('virsh'):.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_results:
        with open(RESULTS, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
