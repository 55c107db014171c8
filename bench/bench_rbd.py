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

nvmgr runs in two set-ups, in the same shuffled rounds: "served", through a
private ``nvmgr cli-server`` (as ``nvmgr-cli.service`` runs it on a host: the
command hands its command line to a resident process with the imports done),
and "alone", with no server (``NVMGR_CLI_SOCKET=``: a fresh Python process that
imports nvmgr).  Ratio = nvmgr / the faster of the two tools, the median of the
per-round ratios.  Target (issue 12): within 2x, judged on the served rows; the
alone rows are shown beside them.  ``--baseline CHECKOUT`` times that checkout's
nvmgr (its ``.venv``; served too when it has ``nvmgr cli-server``) in the same
rounds: a before/after in one run.  Every tree's modules are byte-compiled first,
as an installed package's are.  Results are appended to ``bench/RESULTS.md`` with
the machine and the date.  Needs root and Ceph's packages (``scripts/setup``).

Example: ``bench/bench_rbd.py --rounds 7 --baseline /path/to/another/checkout``
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


#: Commands "alone" run without any CLI server (as with none installed).
ALONE_ENV = {**os.environ, "NVMGR_CLI_SOCKET": ""}


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    p = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=600, env=env or ALONE_ENV)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench_rbd: {' '.join(argv)} failed ({p.returncode}): "
                         f"{p.stderr.decode(errors='replace')}")
    return dt


def start_cli_server(nvmgr: str, sock: Path) -> subprocess.Popen[bytes]:
    """``nvmgr cli-server`` of one tree on a socket of the bench's own (a system
    one is not used); its environment for commands that ask it."""
    logf = open(sock.with_suffix(".log"), "wb")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen([nvmgr, "cli-server", "--socket", str(sock)], stdout=logf,
                         stderr=subprocess.STDOUT, env=ALONE_ENV)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_rbd: the CLI server did not start: "
                             f"{sock.with_suffix('.log').read_text()}")
        time.sleep(0.05)
    return p


def served_by_server(nvmgr: str, env: dict[str, str], log_path: Path) -> bool:
    """Whether *nvmgr* ``--version`` was run by the server (its log names the call):
    a server that hands calls back would time "alone" under the "served" label."""
    before = log_path.read_text() if log_path.exists() else ""
    # The worker logs its call before it sends the exit code: no wait needed.
    subprocess.run([nvmgr, "--version"], check=True, env=env, stdout=subprocess.DEVNULL)
    return log_path.read_text().count(": exit 0 in ") > before.count(": exit 0 in ")


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
    # (label, argv, env) per set-up: each tree served by its own private server
    # (when it has one), and alone.
    variants: list[tuple[str, list[str], dict[str, str]]] = []
    servers: list[subprocess.Popen[bytes]] = []
    for tag, tree in trees.items():
        exe = str(tree / ".venv" / "bin" / "nvmgr")
        if (tree / "nvmgr" / "cli" / "server.py").exists():
            sock = work / f"cli{len(servers)}.sock"
            servers.append(start_cli_server(exe, sock))
            env = {**os.environ, "NVMGR_CLI_SOCKET": str(sock)}
            if not served_by_server(exe, env, sock.with_suffix(".log")):
                raise SystemExit(f"bench_rbd: {exe}'s CLI server hands its calls back: "
                                 f"{sock.with_suffix('.log').read_text()}")
            variants.append((f" served{tag}", [exe], env))
        variants.append((f" alone{tag}", [exe], ALONE_ENV))
    t_start = time.monotonic()
    rng = random.Random(1)
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        samples = run_rounds(work, variants, args.rounds, rng, info)
    finally:
        for p in servers:
            p.terminate()
            p.wait(timeout=30)
    elapsed = time.monotonic() - t_start
    return report(args, info, trees, variants, samples, elapsed)


def run_rounds(work: Path, variants: list[tuple[str, list[str], dict[str, str]]],
               rounds: int, rng: random.Random, info: dict[str, str]
               ) -> dict[str, dict[str, list[float]]]:
    """Each size: its images made, then *rounds* shuffled rounds of every job."""
    samples: dict[str, dict[str, list[float]]] = {}
    with CephCluster(work / "ceph") as c:
        info["ceph"] = c.run("ceph", "--version").strip()
        _u, keyring, _k = c.client("bench")
        where = f":conf={c.conf}:id=bench:keyring={keyring}"
        nvmgr = variants[0][1]
        pool = c.pool
        for label, size in SIZES.items():
            data = work / f"data-{size}"
            data.write_bytes(os.urandom(size))
            img = f"rbd:{pool}/nv-{size}{where}"
            cap = f"{max(size, 4096) // 1024}K"
            subprocess.run([*nvmgr, "create", img, "-s", f"s:{cap}"], check=True,
                           stdout=subprocess.DEVNULL, timeout=600, env=ALONE_ENV)
            # The payload stored once untimed: a get shuffled before the round's first
            # put then reads it too (every put stores the same bytes).
            subprocess.run([*nvmgr, "put", img, "s", str(data)], check=True,
                           stdout=subprocess.DEVNULL, timeout=600, env=ALONE_ENV)
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                            f"rbd:{pool}/plain-{size}{where}", str(size)], check=True)
            subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data),
                            f"rbd:{pool}/plain-{size}{where}"], check=True)
            s: dict[str, list[float]] = {k: [] for k in (
                *(f"nvmgr {op}{tag}" for tag, _c, _e in variants for op in ("put", "get")),
                "rbd import", "qemu-img convert in", "rbd export", "qemu-img convert out")}
            for r in range(rounds):
                out = work / "out"
                jobs: list[tuple[str, list[str], Path | None, dict[str, str] | None]] = [
                    *((f"nvmgr put{tag}", [*cmd, "put", img, "s", str(data)], None, env)
                      for tag, cmd, env in variants),
                    *((f"nvmgr get{tag}", [*cmd, "get", img, "s", "-o", str(out)], out, env)
                      for tag, cmd, env in variants),
                    ("rbd import", ["rbd", "-c", str(c.conf), "--id", "bench", "--keyring",
                                    str(keyring), "import", str(data),
                                    f"{pool}/imp-{size}-{r}"], None, None),
                    ("qemu-img convert in", ["qemu-img", "convert", "-n", "-f", "raw", "-O",
                                             "raw", str(data),
                                             f"rbd:{pool}/plain-{size}{where}"], None, None),
                    ("rbd export", ["rbd", "-c", str(c.conf), "--id", "bench", "--keyring",
                                    str(keyring), "export", f"{pool}/plain-{size}",
                                    str(out)], out, None),
                    ("qemu-img convert out", ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                              f"rbd:{pool}/plain-{size}{where}", str(out)],
                     out, None),
                ]
                rng.shuffle(jobs)
                for name, cmd, target, env in jobs:
                    if target is not None and target.exists():
                        target.unlink()
                    s[name].append(timed(cmd, env))
                    if name.startswith("nvmgr get") and target is not None \
                            and target.read_bytes() != data.read_bytes():
                        raise SystemExit(f"bench_rbd: {name} wrote other bytes than were put")
                log(f"{label}: round {r + 1}/{rounds}")
            samples[label] = s
    return samples


def report(args: argparse.Namespace, info: dict[str, str], trees: dict[str, Path],
           variants: list[tuple[str, list[str], dict[str, str]]],
           samples: dict[str, dict[str, list[float]]], elapsed: float) -> int:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    OUT.mkdir(exist_ok=True)
    (OUT / f"rbd-{stamp}.json").write_text(json.dumps({"machine": info, "samples": samples}))
    rows = []
    #: The verdict's set-up: this tree served, else (no server) this tree alone.
    judged = " served" if any(tag == " served" for tag, _c, _e in variants) else " alone"
    worst = {tag: 0.0 for tag, _c, _e in variants}
    for label, s in samples.items():
        for op, tools in (("put", ("rbd import", "qemu-img convert in")),
                          ("get", ("rbd export", "qemu-img convert out"))):
            best = [min(a, b) for a, b in zip(s[tools[0]], s[tools[1]], strict=True)]
            for tag, _c, _e in variants:
                mine = s[f"nvmgr {op}{tag}"]
                ratio = statistics.median(m / b for m, b in zip(mine, best, strict=True))
                worst[tag] = max(worst[tag], ratio)
                rows.append(f"| {op} {label}{tag} | {statistics.median(mine) * 1000:.0f} | "
                            f"{statistics.median(s[tools[0]]) * 1000:.0f} | "
                            f"{statistics.median(s[tools[1]]) * 1000:.0f} | {ratio:.2f}x |")
    machine = machine_table(info)
    others = ", ".join(f"{tag.strip()} {w:.2f}x" for tag, w in worst.items() if tag != judged)
    text = f"""## {info['date']}: nvmgr put/get on Ceph RBD against rbd and qemu-img

Command: `bench/bench_rbd.py --rounds {args.rounds}{' --baseline ' + str(args.baseline) if args.baseline else ''}` ({elapsed:.0f} s). A single-node cluster
(`tests/ceph_cluster.py`: one mon, one mgr, one bluestore OSD on a sparse file on this
machine's disk), a cephx client user. Whole processes, shuffled within each round; ratio =
median over rounds of nvmgr / the faster tool of that round. "served": the `nvmgr` command
handed to a private `nvmgr cli-server` (as nvmgr-cli.service runs on a host); "alone": no
server (`NVMGR_CLI_SOCKET=`, a fresh Python importing nvmgr). Raw samples:
`bench/out/rbd-{stamp}.json`.

{machine}

| operation | nvmgr ms | rbd import/export ms | qemu-img convert ms | nvmgr / faster tool |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

**Target: within 2x of Ceph's and QEMU's own tools ({judged.strip()}): {'MET' if worst[judged] <= 2 else 'NOT MET'}**
(worst {worst[judged]:.2f}x{'; ' + others if others else ''}).
"""
    print(text)
    if not args.no_results:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
