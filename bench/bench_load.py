#!/usr/bin/env python3
"""Many VMs at once: 64 UEFI + TPM 2.0 guests started concurrently by 8 clients.

Two sets of the same small guest (``examples/uefi-tpm.xml``: q35, OVMF 4M,
TPM 2.0 CRB via swtpm, TCG; ``--memory`` MiB, 64 by default; they need not
boot), in one run against the system libvirtd with the nvmgr hook installed:

(a) **nvmgr**: ``--vms`` domains defined by ``nvmgr define`` (UEFI vars a raw
    slice of each domain's image, TPM state staged at prepare and collected
    at release, every crc checked at every start);
(b) **plain**: ``--vms`` domains as the example is, with libvirt's own
    ``<nvram>`` file and swtpm state directory (the hook is installed and is
    run for them, and its sh front end returns at once: the system libvirtd
    is shared, so it is not restarted without hooks as ``bench_hook.py``
    does; ``bench_hook.py`` measured that front end at ~1% of a cycle).

Each set first gets one untimed start and destroy per domain (swtpm
manufactures the TPM, libvirt copies the vars template).  Then ``--rounds``
rounds (default 3); in each, both sets take their turn, the order
alternating from round to round: ``--clients`` threads (default 8), each with
its own libvirt connection, start their share of the set's domains one after
the other (``virDomainCreate``, timed) until all of them run, then destroy
them.  Start latency percentiles (p50, p95, p99) per set and their ratios are
the result (target: p95 of (a) within 15% of (b)'s).

Afterwards, and a run with a failure here is reported as failed: every
image passes ``nvmgr check``; no release left staged state (no swtpm state
file in ``/var/lib/libvirt/swtpm/<uuid>/tpm2/``, no ``/run/nvmgr/<uuid>``);
the hook log has exactly one ``prepare begin`` and one ``release end`` line
per start of each (a) domain, and no refusal.

Usage (root, libvirtd, QEMU, swtpm, OVMF; ~15 minutes on 2 cores; run it from a
snapshot of the tree, ``git archive HEAD | tar -x -C DIR``, while others edit the
checkout: the hook still runs the installed checkout's code)::

    bench/bench_load.py [--vms 64] [--clients 8] [--rounds 3] [--memory 64]
                        [--paused] [--no-results] [--keep]

Raw samples go to ``bench/out/load-<stamp>.json`` (and ``load-latest.json``);
a dated section is appended to ``bench/RESULTS.md``.  Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench.bench_hook import machine_info  # noqa: E402
from tests.e2e import vmlib  # noqa: E402

OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
SETS = ("nvmgr", "plain")
LABELS = {
    "nvmgr": "(a) nvmgr: nvmgr-defined domains (image, staged TPM, crc checks)",
    "plain": "(b) plain libvirt: libvirt's own <nvram> file and swtpm state",
}


def nvmgr(*args: str | os.PathLike[str], check: bool = True) -> Any:
    """This checkout's ``nvmgr`` (run from a snapshot of the tree, it is the snapshot's)."""
    return vmlib.run([sys.executable, "-m", "nvmgr", *args], check=check,
                     env={"PYTHONPATH": str(ROOT)})


def log(msg: str) -> None:
    print(f"bench_load: {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], p: float) -> float:
    """The *p*-th percentile (0-100) by linear interpolation between order statistics."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Domain:
    def __init__(self, kind: str, i: int, memory: int, work: Path) -> None:
        self.kind = kind
        self.name = vmlib.new_name(f"h2load-{kind[0]}{i:02d}")
        self.uuid = str(uuid.uuid4())
        xml = vmlib.domain_xml(self.name, self.uuid)
        xml = re.sub(r"<memory unit='MiB'>\d+</memory>", f"<memory unit='MiB'>{memory}</memory>",
                     xml)
        self.xml_path = work / f"{self.name}.xml"
        self.xml_path.write_text(xml)
        self.starts = 0

    @property
    def image(self) -> Path:
        return vmlib.image_of(self.name)


class Load:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.sets: dict[str, list[Domain]] = {
            k: [Domain(k, i, args.memory, work) for i in range(args.vms)] for k in SETS}
        self.samples: dict[str, list[dict[str, Any]]] = {k: [] for k in SETS}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def all(self) -> list[Domain]:
        return [d for k in SETS for d in self.sets[k]]

    def define(self) -> None:
        def one(d: Domain) -> None:
            if d.kind == "nvmgr":
                nvmgr("define", d.xml_path)
            else:
                vmlib.virsh("define", str(d.xml_path))

        with ThreadPoolExecutor(self.args.clients) as pool:
            list(pool.map(one, self.all()))
        log(f"defined {len(self.all())} domains")

    def phase(self, kind: str, label: str, timed: bool) -> None:
        """All of a set's domains started by the clients at once, then destroyed."""
        import libvirt

        doms = self.sets[kind]
        n = self.args.clients
        shares = [doms[i::n] for i in range(n)]
        barrier = threading.Barrier(n)
        flags = libvirt.VIR_DOMAIN_START_PAUSED if self.args.paused else 0

        def client(c: int) -> None:
            conn = libvirt.open(vmlib.URI)
            try:
                handles = [(d, conn.lookupByName(d.name)) for d in shares[c]]
                barrier.wait()
                for d, h in handles:
                    t0 = time.perf_counter()
                    try:
                        h.createWithFlags(flags)
                    except libvirt.libvirtError as e:
                        with self._lock:
                            self.errors.append(f"{label}: start {d.name}: {e}")
                        continue
                    dt = time.perf_counter() - t0
                    d.starts += 1
                    if timed:
                        with self._lock:
                            self.samples[kind].append({"label": label, "client": c,
                                                       "domain": d.name, "start_s": dt})
                barrier.wait()  # every domain of the set runs now
                for d, h in handles:
                    t0 = time.perf_counter()
                    try:
                        if h.isActive():
                            h.destroy()
                    except libvirt.libvirtError as e:
                        with self._lock:
                            self.errors.append(f"{label}: destroy {d.name}: {e}")
                    if timed:
                        with self._lock:
                            for s in reversed(self.samples[kind]):
                                if s["domain"] == d.name and s["label"] == label:
                                    s["destroy_s"] = time.perf_counter() - t0
                                    break
            finally:
                conn.close()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(client, range(n)))
        took = time.perf_counter() - t0
        lat = [s["start_s"] for s in self.samples[kind] if s["label"] == label]
        log(f"{label}: {len(doms)} started and destroyed in {took:.1f} s"
            + (f"; start p50 {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s"
               if lat else ""))

    def run(self) -> None:
        for kind in SETS:
            self.phase(kind, f"warm-up {kind}", timed=False)
        for r in range(self.args.rounds):
            order = SETS if r % 2 == 0 else SETS[::-1]
            for kind in order:
                self.phase(kind, f"round {r + 1} {kind}", timed=True)

    # -- afterwards

    def verify(self, hook_mark: int) -> dict[str, Any]:
        problems: list[str] = []
        checks = {}

        def check(d: Domain) -> tuple[str, int, str]:
            p = nvmgr("check", d.image, check=False)
            return d.name, p.returncode, p.stdout[-300:] + p.stderr[-300:]

        with ThreadPoolExecutor(self.args.clients) as pool:
            for name, rc, out in pool.map(check, self.sets["nvmgr"]):
                checks[name] = rc
                if rc != 0:
                    problems.append(f"nvmgr check {name}: exit {rc}: {out}")
        staged = []
        for d in self.sets["nvmgr"]:
            tpm = vmlib.SWTPM_ROOT / d.uuid / "tpm2"
            left = sorted(p.name for p in tpm.glob("tpm2-00.*")) if tpm.is_dir() else []
            if left or (vmlib.RUNTIME_ROOT / d.uuid).exists():
                staged.append(f"{d.name}: {left or ''} {vmlib.RUNTIME_ROOT / d.uuid}")
        problems += [f"staged state left: {s}" for s in staged]
        lines = vmlib.hook_log_lines()[hook_mark:]
        counts = {}
        for d in self.sets["nvmgr"]:
            mine = [ln for ln in lines if f" {d.name} " in ln and not ln.startswith("hook-server")]
            prep = sum(f" {d.name} prepare begin: " in ln for ln in mine)
            rel = sum(f" {d.name} release end: " in ln for ln in mine)
            refused = [ln for ln in mine if ": refused:" in ln or "internal error" in ln]
            counts[d.name] = {"starts": d.starts, "prepare": prep, "release": rel}
            if prep != d.starts or rel != d.starts or refused:
                problems.append(f"hook log for {d.name}: {d.starts} starts, {prep} prepare, "
                                f"{rel} release, refusals {refused[:2]}")
        served = sum(1 for ln in lines if ln.startswith("hook-server[") and ": exit " in ln)
        handed_back = sum(1 for ln in lines if ln.startswith("hook-server[") and "fallback" in ln)
        plain_lines = sum(1 for ln in lines for d in self.sets["plain"] if f" {d.name} " in ln)
        if plain_lines:
            problems.append(f"the hook logged {plain_lines} lines for plain domains")
        return {"problems": problems, "check_exit": checks, "hook_counts": counts,
                "hook_server_calls": served, "hook_server_fallbacks": handed_back,
                "images_checked": len(checks), "staged_left": staged}

    def cleanup(self) -> None:
        def one(d: Domain) -> list[str]:
            return vmlib.cleanup_domain(d.name, d.uuid, [d.xml_path])

        with ThreadPoolExecutor(self.args.clients) as pool:
            for problems in pool.map(one, self.all()):
                for p in problems:
                    log(f"cleanup: {p}")


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, rows in samples.items():
        lat = [r["start_s"] for r in rows]
        des = [r["destroy_s"] for r in rows if "destroy_s" in r]
        out[kind] = {
            "n": len(lat),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
            "p99_s": percentile(lat, 99), "mean_s": statistics.fmean(lat) if lat else 0.0,
            "min_s": min(lat, default=0.0), "max_s": max(lat, default=0.0),
            "destroy_p50_s": percentile(des, 50) if des else float("nan"),
            "per_round_p95_s": {
                lbl: percentile([r["start_s"] for r in rows if r["label"] == lbl], 95)
                for lbl in sorted({r["label"] for r in rows})},
        }
    for q in ("p50", "p95", "p99"):
        out[f"ratio_{q}"] = out["nvmgr"][f"{q}_s"] / out["plain"][f"{q}_s"]
    return out


def report(info: dict[str, str], s: dict[str, Any], v: dict[str, Any], cmdline: str,
           elapsed: float, stamp: str, args: argparse.Namespace, errors: list[str]) -> str:
    verdict = "MET" if s["ratio_p95"] <= 1.15 else "NOT MET"
    rows = []
    for kind in SETS:
        k = s[kind]
        rows.append(f"| {LABELS[kind]} | {k['n']} | {k['p50_s'] * 1000:.0f} | "
                    f"{k['p95_s'] * 1000:.0f} | {k['p99_s'] * 1000:.0f} | "
                    f"{k['min_s'] * 1000:.0f}-{k['max_s'] * 1000:.0f} | "
                    f"{k['destroy_p50_s'] * 1000:.0f} |")
    rounds = "; ".join(
        f"{lbl} {p * 1000:.0f} ms" for kind in SETS
        for lbl, p in s[kind]["per_round_p95_s"].items())
    machine = "\n".join(f"| {k} | {str(val).replace('|', '/')} |" for k, val in info.items())
    ok = not v["problems"] and not errors
    checks = (f"{v['images_checked']} images, every one `nvmgr check` exit 0"
              if all(rc == 0 for rc in v["check_exit"].values()) else "FAILURES (below)")
    counts = v["hook_counts"].values()
    starts = sum(c["starts"] for c in counts)
    return f"""## {info['date']}: many VMs at once, {args.vms} + {args.vms} UEFI + TPM 2.0 guests, {args.clients} clients

Command: `{cmdline}` (`bench/bench_load.py`; {elapsed:.0f} s). Guests: `examples/uefi-tpm.xml`
(q35, OVMF 4M, TPM 2.0 CRB via swtpm, TCG, {args.memory} MiB, no disk){', started paused' if args.paused else ', running (not waited for)'}.
{args.vms} domains per set, started concurrently by {args.clients} clients (one libvirt connection
each, {args.vms // args.clients} domains each, one after the other) until all {args.vms} ran, then
destroyed; one untimed warm-up start per domain, then {args.rounds} timed rounds with the two sets'
turns alternating. The nvmgr hook was installed throughout (the system libvirtd is shared: (b)
pays for the hook's sh front end, which returns at once). Raw samples:
`bench/out/load-{stamp}.json`.

| machine | |
|---|---|
{machine}

| set | starts | p50 ms | p95 ms | p99 ms | range ms | destroy p50 ms |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- **Target: p95 start latency of (a) within 15% of (b): {verdict}** - p95 ratio
  {s['ratio_p95']:.3f} (p50 {s['ratio_p50']:.3f}, p99 {s['ratio_p99']:.3f}).
- p95 per round: {rounds}.
- Afterwards: {checks}; staged state left by a release: {len(v['staged_left'])} domains;
  hook log: {starts} starts of (a) domains, each with exactly one `prepare begin` and one
  `release end` line and no refusal: {'yes' if not [p for p in v['problems'] if p.startswith('hook log')] else 'NO'}.
- Start or destroy errors: {len(errors)}.{(chr(10) + '  ' + chr(10) + '  '.join(errors[:5])) if errors else ''}
- Hook calls run by the hook server: {v.get('hook_server_calls', 'n/a')} (handed back to the
  hook: {v.get('hook_server_fallbacks', 'n/a')}){'; no hook server was started' if getattr(args, 'no_hook_server', False) else ''}.
- Verdict on the checks: {'all passed' if ok else 'FAILED: ' + '; '.join(v['problems'][:5])}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_load.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=64, help="domains per set (default 64)")
    ap.add_argument("--clients", type=int, default=8, help="parallel clients (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--memory", type=int, default=64, help="guest RAM in MiB (default 64)")
    ap.add_argument("--paused", action="store_true",
                    help="start the guests paused (no TCG load from the running guests)")
    ap.add_argument("--no-results", action="store_true",
                    help="do not append to bench/RESULTS.md (JSON is still written)")
    ap.add_argument("--keep", action="store_true", help="keep the domains and images")
    ap.add_argument("--no-hook-server", action="store_true",
                    help="do not start nvmgr hook-server (each hook call imports nvmgr itself)")
    ap.add_argument("--render", metavar="JSON",
                    help="print the RESULTS.md section of an earlier run's raw samples, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        stamp = Path(args.render).stem.removeprefix("load-")
        print(report(raw["machine"], raw["summary"], raw["verify"], raw["command"],
                     raw["elapsed_s"], stamp, argparse.Namespace(**raw["args"]), raw["errors"]))
        return 0
    if os.geteuid() != 0:
        ap.error("run as root: it drives the system libvirtd")
    if args.vms < 1 or args.clients < 1 or args.vms % args.clients:
        ap.error("--vms must be a positive multiple of --clients")
    cmdline = "bench/bench_load.py" + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    vmlib.ensure_services()
    if not vmlib.HOOK.exists():
        ap.error(f"the nvmgr hook is not installed ({vmlib.HOOK}): nvmgr install-hook")
    info = machine_info()
    if not (ROOT / ".git").exists():  # run from a snapshot of the tree (git archive)
        info["git"] = os.environ.get("NVMGR_BENCH_GIT", "a snapshot (no .git)")
    log("machine: " + json.dumps(info))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="nvmgr-bench-load-"))
    load = Load(args, work)
    if not args.no_hook_server:
        vmlib.start_hook_server()  # as nvmgr-hook.service would run it
    mark = len(vmlib.hook_log_lines())
    try:
        load.define()
        load.run()
        verify = load.verify(mark)
    finally:
        if not args.no_hook_server:
            vmlib.stop_hook_server()
        if not args.keep:
            load.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = summarize(load.samples)
    OUT.mkdir(parents=True, exist_ok=True)
    raw = {"command": cmdline, "machine": info, "elapsed_s": elapsed, "args": vars(args),
           "labels": LABELS, "summary": summary, "verify": verify, "errors": load.errors,
           "samples": load.samples}
    for suffix in (stamp, "latest"):
        (OUT / f"load-{suffix}.json").write_text(json.dumps(raw, indent=1))
    md = report(info, summary, verify, cmdline, elapsed, stamp, args, load.errors)
    print(md)
    if not args.no_results:
        with open(RESULTS, "a") as f:
            f.write("\n" + md)
        log(f"appended to {RESULTS}")
    for p in verify["problems"] + load.errors:
        log(f"PROBLEM: {p}")
    return 1 if verify["problems"] or load.errors else 0


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
