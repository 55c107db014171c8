#!/usr/bin/env python3
"""The pause ``nvmgr backup`` imposes on a running guest.

One UEFI + TPM 2.0 guest (``examples/uefi-tpm.xml``, TCG), defined by
``nvmgr define`` and booted to OVMF's shell, is backed up ``--rounds`` times
(default 20) in each of two states, interleaved: idle at the shell, and
while the shell runs ``setvar`` (the firmware writing its variable store in
the pflash slice).  The pause is what ``nvmgr backup`` reports: from asking
libvirt to suspend the guest to libvirt's resume returning, so it includes
both libvirt round trips (an upper bound on the time the vCPUs stood still).
The whole ``nvmgr backup`` process time is reported beside it.

Target (issue 9): median pause under 50 ms.  Results are appended to
``bench/RESULTS.md`` with the machine and the date; raw samples go to
``bench/out/backup-*.json``.  Needs root, libvirtd, QEMU, swtpm, OVMF and the
nvmgr hook (``nvmgr install-hook``); about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_hook import append_results, machine_info, machine_table  # noqa: E402

from tests.e2e import vmlib  # noqa: E402

OUT = ROOT / "bench" / "out"
GUID = "6e766d67-7262-6b00-8000-000000000002"


def log(msg: str) -> None:
    print(f"bench_backup: {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_backup.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="backups per state (default 20)")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (it drives the system libvirtd)")
        return 2
    info = machine_info()
    vmlib.ensure_services()
    work = Path(tempfile.mkdtemp(prefix="nvmgr-bench-backup-"))
    vmlib.ensure_hook(work)
    v = vmlib.VM("bench-backup", work, serial_socket=True)
    samples: dict[str, list[dict[str, float]]] = {"idle": [], "writing": []}
    t_start = time.monotonic()
    try:
        v.define()
        v.start()
        assert v.socket is not None
        with vmlib.Shell(v.socket) as sh:
            sh.wait_prompt(vmlib.serial_log(v.name), 120)
            stop = threading.Event()
            writes = [0]

            def writer() -> None:
                while not stop.is_set():
                    sh.command(f'setvar NvmgrBench -guid {GUID} -nv -bs ="{writes[0]:06d}"')
                    writes[0] += 1

            def one(state: str, i: int) -> None:
                out = work / f"{state}-{i}.nvram"
                t0 = time.monotonic()
                r = json.loads(vmlib.nvmgr("backup", "--domain", v.name, out,
                                           "--output", "json").stdout)
                samples[state].append({"paused_ms": r["paused_ms"],
                                       "process_ms": (time.monotonic() - t0) * 1000})
                out.unlink()

            for i in range(args.rounds):
                one("idle", i)
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            for i in range(args.rounds):
                one("writing", i)
            stop.set()
            t.join(120)
        log(f"{writes[0]} setvar commands ran during the 'writing' backups")
    finally:
        problems = v.cleanup()
        if problems:
            log(f"cleanup: {problems}")
    elapsed = time.monotonic() - t_start
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(exist_ok=True)
    (OUT / f"backup-{stamp}.json").write_text(json.dumps({"machine": info, "samples": samples}))
    rows = []
    verdicts = []
    for state, xs in samples.items():
        p = [x["paused_ms"] for x in xs]
        w = [x["process_ms"] for x in xs]
        med = statistics.median(p)
        verdicts.append(med < 50)
        rows.append(f"| {state} | {len(p)} | {med:.1f} | {pct(p, 95):.1f} | {max(p):.1f} | "
                    f"{statistics.median(w):.0f} |")
    machine = machine_table(info)
    text = f"""## {info['date']}: the pause of nvmgr backup on a running guest

Command: `bench/bench_backup.py --rounds {args.rounds}` ({elapsed:.0f} s). Guest:
`examples/uefi-tpm.xml` (OVMF 4M, TPM 2.0, TCG) at OVMF's shell; "writing" = the shell runs
`setvar` in a loop meanwhile. Pause = suspend requested .. resume returned (libvirt round
trips included). Raw samples: `bench/out/backup-{stamp}.json`.

{machine}

| guest | backups | pause median ms | p95 ms | max ms | whole `nvmgr backup` median ms |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

**Target: median pause under 50 ms: {'MET' if all(verdicts) else 'NOT MET'}.**
"""
    print(text)
    if not args.no_results:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
