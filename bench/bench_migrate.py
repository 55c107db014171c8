#!/usr/bin/env python3
"""Live migration time of an nvmgr VM against the same VM with libvirt's own nvram.

Two private libvirt hosts on this machine (``tests/e2e/hosts.py``: each
libvirtd in its own mount/UTS/network namespace, the nvmgr hook installed in
both), the migration stream over a unix socket.  Two guests, both
``examples/uefi-tpm.xml`` (OVMF 4M, TPM 2.0 through swtpm, 256 MiB, TCG),
booted once to OVMF's shell:

(a) **nvmgr**: defined by ``nvmgr define``; its image on storage both hosts
    see (UEFI vars a live slice of it; the hooks hand the image over);
(b) **plain**: the example as users write it today: libvirt's own
    ``<nvram>`` file and swtpm state directory (per host; QEMU's pflash
    contents and swtpm's state travel in the migration stream).

Each round migrates both guests A->B then B->A, in alternating order; one
sample is the wall time of ``virsh migrate --live`` (the whole command: the
destination's hooks before the memory moves, the source's after it resumed
the guest).  The first round is a warm-up, not timed.

Target: (a) within 10% of (b), i.e. ``median(a) / median(b) < 1.10``.

Usage (root; libvirtd, QEMU, swtpm, OVMF installed; ~3 minutes)::

    bench/bench_migrate.py [--rounds N] [--no-results]

Raw samples go to ``bench/out/migrate-<stamp>.json``; a dated section is
appended to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import hosts, vmlib  # noqa: E402


def migrate(src: hosts.Host, dst: hosts.Host, name: str, shared: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["virsh", "-c", src.uri, "migrate", "--live", name, dst.uri,
                        "--migrateuri", hosts.migrate_uri(shared)],
                       capture_output=True, text=True, timeout=600, check=False)
    took = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"virsh migrate {name} failed: {p.stderr.strip()}")
    dst.wait_state(name, "running")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (each: A->B, B->A)")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()
    samples: dict[str, list[float]] = {"nvmgr": [], "plain": []}
    with hosts.two_hosts("bench-mig") as (a, b, shared):
        names = {}
        for kind in ("nvmgr", "plain"):
            name = f"nvmgr-bench-mig-{kind}-{uuid.uuid4().hex[:6]}"
            xml = shared / f"{name}.xml"
            xml.write_text(vmlib.domain_xml(name, str(uuid.uuid4())))
            if kind == "nvmgr":
                vmlib.nvmgr("define", "--connect", a.uri, "--image", shared / f"{name}.nvram", xml)
            else:
                a.virsh("define", str(xml))
            a.virsh("start", name)
            names[kind] = name
        for kind, name in names.items():
            a.wait_for_shell(name, 180)
            print(f"{kind}: booted to OVMF's shell", file=sys.stderr)
        where = {k: a for k in names}
        for rnd in range(args.rounds + 1):
            order = ["nvmgr", "plain"] if rnd % 2 == 0 else ["plain", "nvmgr"]
            for _leg in range(2):
                for kind in order:
                    src = where[kind]
                    dst = b if src is a else a
                    took = migrate(src, dst, names[kind], shared)
                    where[kind] = dst
                    if rnd:
                        samples[kind].append(took)
                    print(f"round {rnd} {kind} {src.name}->{dst.name}: {took:.2f} s"
                          + ("" if rnd else " (warm-up)"), file=sys.stderr)
        logs = a.hook_log_lines() + b.hook_log_lines()
        served = sum(1 for ln in logs if ln.startswith("hook-server[") and ": exit " in ln)
        handed_back = sum(1 for ln in logs if ln.startswith("hook-server[") and "fallback" in ln)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["nvmgr"] / med["plain"]
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "out" / f"migrate-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"samples": samples, "median": med, "ratio": ratio,
                               "hook_server_calls": served, "hook_server_fallbacks": handed_back},
                              indent=1))
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()[0]
    lines = [
        "",
        f"## {started:%Y-%m-%d %H:%M:%S} UTC: live migration, nvmgr vs libvirt's own nvram",
        "",
        f"Command: `bench/bench_migrate.py --rounds {args.rounds}`. Raw samples: "
        f"`bench/out/{out.name}`.",
        "",
        "| machine |  |",
        "|---|---:|",
        f"| nproc | {os.cpu_count()} |",
        f"| kernel | {platform.release()} |",
        f"| qemu | {qemu} |",
        f"| git | {git} |",
        f"| loadavg at start / end | {' '.join(f'{x:.2f}' for x in load0)} / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
        "",
        "Two private libvirtd hosts (`tests/e2e/hosts.py`), the stream over a unix socket; "
        "`examples/uefi-tpm.xml` (256 MiB, OVMF 4M, TPM 2.0, TCG) at OVMF's shell; "
        "wall time of `virsh migrate --live`, both guests in each round, order alternating.",
        "",
        "| variant | n | median | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in samples.items():
        lines.append(f"| {k} | {len(v)} | {med[k]:.2f} s | {min(v):.2f} s | {max(v):.2f} s |")
    verdict = "MET" if ratio < 1.10 else "NOT MET"
    lines += ["", f"**Target: nvmgr within 10% of plain: {verdict}** - "
                  f"median ratio {ratio:.3f}.", "",
              f"Hook calls the hosts' hook servers ran: {served}; handed back to the hook: "
              f"{handed_back} (each host runs `nvmgr hook-server` in its own namespaces, as "
              "`nvmgr-hook.service` would; libvirtd under `scripts/subreaper`).", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
