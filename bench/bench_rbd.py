#!/usr/bin/env python3
"""nvmgr put/get on an image in Ceph RBD, against Ceph's and QEMU's own copy tools.

A single-node cluster (``tests/ceph_cluster.py``) is started for the run.  For
4 KiB, 512 KiB and 64 MiB payloads, each round times, as whole processes and in
a shuffled order:

- ``nvmgr put`` of the payload into a section of an nvmgr image on RBD, against
  ``rbd import`` of the same file into a new RBD image and ``qemu-img convert -n``
  of it into an existing one;
- ``nvmgr get`` of the section, against ``rbd export`` and ``qemu-img convert``
  of an RBD image of that size to a file.

Ratio = nvmgr / the faster of the two tools, the median of the per-round ratios.
Target (issue 12): within 2x.  ``--baseline CHECKOUT`` times that checkout's nvmgr
(its ``.venv``) in the same shuffled rounds too: a before/after in one run.  Both
trees' modules are byte-compiled first, as an installed package's are.  Results are appended to ``bench/RESULTS.md`` with
the machine and the date.  Needs root and Ceph's packages (``scripts/setup``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_hook import append_results, machine_info, machine_table  # noqa: E402
from benchlib import compile_bytecode  # noqa: E402

from tests.ceph_cluster import CephCluster, missing_tools  # noqa: E402

OUT = ROOT / "bench" / "out"
SIZES = {"4 KiB": 4 << 10, "512 KiB": 512 << 10, "64 MiB": 64 << 20}


def log(msg: str) -> None:
    print(f"bench_rbd: {msg}", file=sys.stderr, flush=True)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=600)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_rbd.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="another checkout (with its .venv) whose nvmgr is timed alongside")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or missing_tools():
        log(f"needs root and Ceph ({', '.join(missing_tools()) or 'root'} missing)")
        return 2
    info = machine_info()
    trees = {"": ROOT}
    if args.baseline:
        base = Path(args.baseline).resolve()
        trees[" (baseline)"] = base
        info["baseline"] = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
    for tree in trees.values():  # bytecode, as an installed package has it
        compile_bytecode(tree / ".venv" / "bin" / "python", tree)
    work = Path(tempfile.mkdtemp(prefix="nvmgr-bench-rbd-"))
    t_start = time.monotonic()
    rng = random.Random(1)
    samples: dict[str, dict[str, list[float]]] = {}
    with CephCluster(work / "ceph") as c:
        info["ceph"] = c.run("ceph", "--version").strip()
        _u, keyring, _k = c.client("bench")
        where = f":conf={c.conf}:id=bench:keyring={keyring}"
        nvmgrs = {tag: [str(tree / ".venv" / "bin" / "python"), "-m", "nvmgr"]
                  for tag, tree in trees.items()}
        nvmgr = nvmgrs[""]
        pool = c.pool
        for label, size in SIZES.items():
            data = work / f"data-{size}"
            data.write_bytes(os.urandom(size))
            img = f"rbd:{pool}/nv-{size}{where}"
            cap = f"{max(size, 4096) // 1024}K"
            subprocess.run([*nvmgr, "create", img, "-s", f"s:{cap}"], check=True,
                           stdout=subprocess.DEVNULL, timeout=600)
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                            f"rbd:{pool}/plain-{size}{where}", str(size)], check=True)
            subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data),
                            f"rbd:{pool}/plain-{size}{where}"], check=True)
            s: dict[str, list[float]] = {k: [] for k in (
                *(f"nvmgr {op}{tag}" for tag in trees for op in ("put", "get")),
                "rbd import", "qemu-img convert in", "rbd export", "qemu-img convert out")}
            for r in range(args.rounds):
                out = work / "out"
                jobs = [
                    *((f"nvmgr put{tag}", [*cmd, "put", img, "s", str(data)], None)
                      for tag, cmd in nvmgrs.items()),
                    *((f"nvmgr get{tag}", [*cmd, "get", img, "s", "-o", str(out)], out)
                      for tag, cmd in nvmgrs.items()),
                    ("rbd import", ["rbd", "-c", str(c.conf), "--id", "bench", "--keyring",
                                    str(keyring), "import", str(data),
                                    f"{pool}/imp-{size}-{r}"], None),
                    ("qemu-img convert in", ["qemu-img", "convert", "-n", "-f", "raw", "-O",
                                             "raw", str(data),
                                             f"rbd:{pool}/plain-{size}{where}"], None),
                    ("rbd export", ["rbd", "-c", str(c.conf), "--id", "bench", "--keyring",
                                    str(keyring), "export", f"{pool}/plain-{size}",
                                    str(out)], out),
                    ("qemu-img convert out", ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                              f"rbd:{pool}/plain-{size}{where}", str(out)],
                     out),
                ]
                rng.shuffle(jobs)
                for name, cmd, target in jobs:
                    if target is not None and target.exists():
                        target.unlink()
                    s[name].append(timed(cmd))
                log(f"{label}: round {r + 1}/{args.rounds}")
            samples[label] = s
    elapsed = time.monotonic() - t_start
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(exist_ok=True)
    (OUT / f"rbd-{stamp}.json").write_text(json.dumps({"machine": info, "samples": samples}))
    rows = []
    worst = 0.0
    for label, s in samples.items():
        for op, tools in (("put", ("rbd import", "qemu-img convert in")),
                          ("get", ("rbd export", "qemu-img convert out"))):
            best = [min(a, b) for a, b in zip(s[tools[0]], s[tools[1]], strict=True)]
            for tag in trees:
                mine = s[f"nvmgr {op}{tag}"]
                ratio = statistics.median(m / b for m, b in zip(mine, best, strict=True))
                if not tag:
                    worst = max(worst, ratio)
                rows.append(f"| {op} {label}{tag} | {statistics.median(mine) * 1000:.0f} | "
                            f"{statistics.median(s[tools[0]]) * 1000:.0f} | "
                            f"{statistics.median(s[tools[1]]) * 1000:.0f} | {ratio:.2f}x |")
    machine = machine_table(info)
    text = f"""## {info['date']}: nvmgr put/get on Ceph RBD against rbd and qemu-img

Command: `bench/bench_rbd.py --rounds {args.rounds}{' --baseline ' + str(args.baseline) if args.baseline else ''}` ({elapsed:.0f} s). A single-node cluster
(`tests/ceph_cluster.py`: one mon, one mgr, one bluestore OSD on a sparse file on this
machine's disk), a cephx client user. Whole processes, shuffled within each round; ratio =
median over rounds of nvmgr / the faster tool of that round. Raw samples:
`bench/out/rbd-{stamp}.json`.

{machine}

| operation | nvmgr ms | rbd import/export ms | qemu-img convert ms | nvmgr / faster tool |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

**Target: within 2x of Ceph's and QEMU's own tools: {'MET' if worst <= 2 else 'NOT MET'}**
(worst {worst:.2f}x).
"""
    print(text)
    if not args.no_results:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
