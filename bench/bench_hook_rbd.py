#!/usr/bin/env python3
"""What a VM's start and stop cost with its image on Ceph RBD, against a local file.

Two copies of the same UEFI + TPM 2.0 guest (``examples/uefi-tpm.xml``, TCG),
both defined by ``nvmgr define``, the hook installed and the hook server
running: (a) the image a local raw file, (b) the image in the single-node Ceph
cluster of ``tests/ceph_cluster.py`` (started for the run), reached by QEMU's
rbd driver as a cephx user of its own whose key the prepare hook stages.  A
cycle is ``virDomainCreate`` then ``virDomainDestroy`` through libvirt-python,
timed with ``time.perf_counter``; the first cycle of each domain (TPM
manufacture, vars template) is a warm-up, not timed; the order of (a) and (b)
is shuffled in each round.

Reported: the median start, destroy and cycle of each, and the ratio
median(b) / median(a) of the cycle (issue 12: the hook's cost to a
start+destroy cycle with the image on RBD, against the same VM on a local file).

Usage (root, libvirtd, QEMU, swtpm, OVMF, Ceph's packages; takes the e2e lock)::

    bench/bench_hook_rbd.py [--cycles N] [--no-results]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_hook import append_results, machine_info, machine_table  # noqa: E402

from tests.ceph_cluster import CephCluster, missing_tools  # noqa: E402
from tests.e2e import vmlib  # noqa: E402


def log(msg: str) -> None:
    print(f"bench_hook_rbd: {msg}", file=sys.stderr, flush=True)


def cycle(conn: Any, name: str) -> tuple[float, float]:
    dom = conn.lookupByName(name)
    t0 = time.perf_counter()
    dom.create()
    t1 = time.perf_counter()
    dom.destroy()
    return t1 - t0, time.perf_counter() - t1


def run(cycles: int, work: Path, ceph: CephCluster) -> dict[str, list[tuple[float, float]]]:
    import libvirt

    _user, keyring, _key = ceph.client("bench-qemu")
    keyring.chmod(0o600)
    doms = {"file": (vmlib.new_name("bench-file"), str(uuid.uuid4())),
            "rbd": (vmlib.new_name("bench-rbd"), str(uuid.uuid4()))}
    for label, (name, dom_uuid) in doms.items():
        attrs = {} if label == "file" else {
            "image": f"rbd:{ceph.pool}/{name}:conf={ceph.conf}:id=bench-qemu:keyring={keyring}"}
        xml = work / f"{label}.xml"
        xml.write_text(vmlib.domain_xml(name, dom_uuid, metadata_attrs=attrs or None))
        vmlib.nvmgr("define", xml)
    conn = libvirt.open(vmlib.URI)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in doms}
    try:
        for name, _u in doms.values():
            cycle(conn, name)  # warm-up
        rng = random.Random()
        for i in range(cycles):
            order = list(doms)
            rng.shuffle(order)
            for label in order:
                samples[label].append(cycle(conn, doms[label][0]))
            log(f"round {i + 1}/{cycles}: " + ", ".join(
                f"{k} {sum(v[-1]):.2f} s" for k, v in samples.items()))
    finally:
        conn.close()
        for name, dom_uuid in doms.values():
            vmlib.cleanup_domain(name, dom_uuid)
    return samples


def summarize(samples: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, pairs in samples.items():
        out[label] = {"start": statistics.median(s for s, _ in pairs),
                      "destroy": statistics.median(d for _, d in pairs),
                      "cycle": statistics.median(s + d for s, d in pairs), "n": len(pairs)}
    out["ratio"] = out["rbd"]["cycle"] / out["file"]["cycle"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_hook_rbd.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10, help="rounds (default 10)")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root")
        return 2
    if missing_tools():
        log(f"Ceph is not installed ({', '.join(missing_tools())} missing)")
        return 2
    info = machine_info()
    t0 = time.monotonic()
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the one system libvirtd, one user at a time
        vmlib.ensure_services()
        work = Path(tempfile.mkdtemp(prefix="nvmgr-bench-rbd-", dir="/var/tmp"))
        work.chmod(0o755)
        vmlib.ensure_hook(work)
        vmlib.start_hook_server()
        try:
            with CephCluster(work / "ceph") as ceph:
                samples = run(args.cycles, work, ceph)
        finally:
            vmlib.stop_hook_server()
    summary = summarize(samples)
    print(json.dumps({"machine": info, "summary": summary}, indent=2))
    if not args.no_results:
        rows = "\n".join(
            f"| {label} | {s['start']:.3f} | {s['destroy']:.3f} | {s['cycle']:.3f} | {s['n']} |"
            for label, s in summary.items() if isinstance(s, dict))
        append_results(
            f"## Hook cost with the image on RBD ({info['date']})\n\n"
            f"Command: `bench/bench_hook_rbd.py --cycles {args.cycles}` "
            f"({time.monotonic() - t0:.0f} s). Medians in seconds.\n\n"
            f"{machine_table(info)}\n\n"
            "| image | start | destroy | cycle | n |\n|---|---|---|---|---|\n"
            f"{rows}\n\nRatio rbd/file of the cycle: {summary['ratio']:.3f}.\n")
    log(f"ratio rbd/file {summary['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
