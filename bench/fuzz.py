#!/usr/bin/env python3
"""The long fuzz run: at least a million inputs across nvmgr's three fuzz targets.

    .venv/bin/python bench/fuzz.py                      # 1,000,000 inputs, 2 workers
    .venv/bin/python bench/fuzz.py --inputs 20000 --jobs 1
    .venv/bin/python bench/fuzz.py --coverage 20000     # line coverage of nvmgr, per target

The targets, the mutators and the contract are ``tests/fuzz/harness.py``'s
(the test suite runs them for a few seconds).  Here each target runs in
worker processes, each with

- its own deterministic seed (``--seed`` + worker number);
- an address-space limit of its size after start-up plus 200 MB
  (``RLIMIT_AS``): an input that makes nvmgr allocate more fails with
  MemoryError, which breaks the contract and is reported;
- a watchdog of ``--hang`` seconds per input (``SIGALRM``): an input that
  blocks (a FIFO opened for reading, a loop) is reported as a hang;
- the 1 s contract: an input slower than ``--limit`` is reported as slow.

Every failure is minimized and written to ``bench/out/fuzz-failures/``;
keep those worth keeping in ``tests/data/fuzz-corpus/TARGET/`` as regression
inputs.  The summary (inputs, rate, slowest input, peak memory, failures)
goes to standard output and ``bench/out/fuzz.json``.  Not run by CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
#: Share of the inputs each target gets (the image target is the slowest per input).
SHARES = {"der": 0.45, "image": 0.15, "xml": 0.40}
MEMORY_BUDGET = 200 << 20


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(target_name: str, seed: int, count: int, limit: float, hang: float) -> dict[str, object]:
    """Run one target for *count* inputs in this process; return its stats."""
    from tests.fuzz import harness

    target = harness.TARGETS[target_name]()
    target.seeds()  # warm up: imports and seed images before the limit is set

    class Hang(Exception):
        pass

    def alarm(_sig: int, _frame: object) -> None:
        raise Hang(f"no result after {hang} s")

    signal.signal(signal.SIGALRM, alarm)
    base = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (base + MEMORY_BUDGET, resource.RLIM_INFINITY))
    failures: list[dict[str, object]] = []
    fail_dir = OUT / "fuzz-failures"

    def record(f: harness.Failure) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            small = harness.minimize(target, f, budget=300) if f.kind not in ("timeout",
                                                                              "Hang") else f.data
        except Exception:  # noqa: BLE001 - keep the unminimized input
            small = f.data
        fail_dir.mkdir(parents=True, exist_ok=True)
        name = f"{f.target}-{f.kind}-{hashlib.sha256(small).hexdigest()[:12]}.bin"
        (fail_dir / name).write_bytes(small)
        failures.append({"target": f.target, "kind": f.kind, "detail": f.detail,
                         "file": str(fail_dir / name), "bytes": len(small)})
        print(f"fuzz: {f.target}: {f.kind}: {f.detail[:160]} -> {name}", file=sys.stderr,
              flush=True)

    original_run = target.run

    def guarded(data: bytes) -> None:
        signal.setitimer(signal.ITIMER_REAL, hang)
        try:
            original_run(data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    target.run = guarded  # type: ignore[method-assign]
    progress_file = OUT / "fuzz-progress" / f"{target_name}-{seed}.json"
    progress_file.parent.mkdir(parents=True, exist_ok=True)

    def progress(st: harness.RunStats) -> None:
        progress_file.write_text(json.dumps({
            "target": target_name, "seed": seed, "inputs": st.inputs, "seconds": st.seconds,
            "slowest": st.slowest, "failures": len(failures),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))

    stats = harness.fuzz(target, seed=seed, count=count, limit=limit, on_failure=record,
                         progress=progress)
    progress(stats)
    target.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"target": target_name, "seed": seed, "inputs": stats.inputs,
            "seconds": stats.seconds, "slowest": stats.slowest, "peak_rss": peak,
            "rss_budget": MEMORY_BUDGET, "failures": failures}


def run_workers(total: int, jobs: int, seed: int, limit: float, hang: float) -> list[dict[str, object]]:
    plan: list[tuple[str, int, int]] = []
    n = 0
    for name, share in SHARES.items():
        count = int(total * share)
        per = [count // jobs + (1 if i < count % jobs else 0) for i in range(jobs)]
        for c in per:
            plan.append((name, seed + n, c))
            n += 1
    results: list[dict[str, object]] = []
    running: list[tuple[subprocess.Popen[str], tuple[str, int, int]]] = []
    queue = list(plan)
    while queue or running:
        while queue and len(running) < jobs:
            name, s, c = queue.pop(0)
            cmd = [sys.executable, __file__, "--worker", name, "--seed", str(s),
                   "--inputs", str(c), "--limit", str(limit), "--hang", str(hang)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                             cwd=ROOT), (name, s, c)))
            print(f"fuzz: started {name} seed {s} for {c:,} inputs", file=sys.stderr, flush=True)
        time.sleep(0.5)
        for proc, job in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, job))
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode != 0:
                results.append({"target": job[0], "seed": job[1], "inputs": 0, "seconds": 0.0,
                                "slowest": 0.0, "peak_rss": 0,
                                "failures": [{"target": job[0], "kind": "worker died",
                                              "detail": f"exit {proc.returncode}"}]})
                continue
            r = json.loads(out.strip().splitlines()[-1])
            print(f"fuzz: {r['target']} seed {r['seed']}: {r['inputs']:,} inputs in "
                  f"{r['seconds']:.0f} s, {len(r['failures'])} failure(s)", file=sys.stderr,
                  flush=True)
            results.append(r)
    return results


def coverage_run(count: int, seed: int) -> dict[str, object]:
    """Line coverage of nvmgr's modules by *count* inputs of each target, in process."""
    import coverage

    cov = coverage.Coverage(source=["nvmgr"], data_file=None, branch=False)
    cov.start()
    from tests.fuzz import harness

    per_target = {}
    for name in SHARES:
        target = harness.TARGETS[name]()
        stats = harness.fuzz(target, seed=seed, count=count, limit=10.0)
        target.close()
        per_target[name] = {"inputs": stats.inputs, "failures": len(stats.failures)}
    cov.stop()
    modules: dict[str, tuple[int, int]] = {}
    data = cov.get_data()
    for path in sorted(data.measured_files()):
        rel = os.path.relpath(path, ROOT)
        _, statements, _, missing, _ = cov.analysis2(path)
        modules[rel] = (len(statements), len(statements) - len(missing))
    packages: dict[str, list[int]] = {}
    for rel, (n, hit) in modules.items():
        parts = Path(rel).parts
        pkg = "/".join(parts[:2]) if len(parts) > 2 else parts[-1]
        acc = packages.setdefault(pkg, [0, 0])
        acc[0] += n
        acc[1] += hit
    total = [sum(v[0] for v in modules.values()), sum(v[1] for v in modules.values())]
    # Every module of nvmgr counts, measured or not (a module never imported is 0 %).
    for path in sorted((ROOT / "nvmgr").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in modules:
            _, statements, _, _, _ = cov.analysis2(str(path))
            modules[rel] = (len(statements), 0)
            total[0] += len(statements)
            parts = Path(rel).parts
            pkg = "/".join(parts[:2]) if len(parts) > 2 else parts[-1]
            packages.setdefault(pkg, [0, 0])[0] += len(statements)
    return {"inputs_per_target": count, "targets": per_target,
            "total": {"statements": total[0], "covered": total[1]},
            "packages": {k: {"statements": v[0], "covered": v[1]} for k, v in packages.items()},
            "modules": {k: {"statements": v[0], "covered": v[1]} for k, v in modules.items()}}


def results_section() -> str:
    """A bench/RESULTS.md section from the last run's and coverage run's JSON."""
    run = json.loads((OUT / "fuzz.json").read_text())
    cov = json.loads((OUT / "fuzz-coverage.json").read_text())
    m = run["machine"]
    lines = [f"## {m['date']}: fuzzing, {run['total_inputs']:,} inputs across three targets", "",
             "Command: `.venv/bin/python bench/fuzz.py` (1,000,000 inputs, 2 worker processes, "
             "niced, while other test runs shared the machine), then "
             f"`bench/fuzz.py --coverage {cov['inputs_per_target']}`. Targets, mutators and the "
             "contract: `tests/fuzz/harness.py`. Each worker ran under an address-space limit "
             "of its start-up size + 200 MB and a 20 s hang watchdog; an input slower than "
             "1 s counts as a failure.", "",
             "| machine |  |", "|---|---|", f"| date | {m['date']} |", f"| uname | {m['uname']} |",
             f"| cpus | {m['cpus']} |", f"| python | {m['python']} |", "",
             "| target | inputs | rate per worker (inputs/s, wall clock, shared machine) | slowest input (s) "
             "| peak RSS of a worker (MB) | contract failures |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in run["targets"].items():
        lines.append(f"| {name} | {int(s['inputs']):,} | "
                     f"{s['inputs'] / max(s['cpu_seconds'], 1e-9):,.0f} | {s['slowest']:.3f} | "
                     f"{s['peak_rss'] / 1e6:.0f} | {int(s['failures'])} |")
    total = run["total_inputs"]
    lines += ["", f"Total: {total:,} inputs in {run['wall_seconds']:,.0f} s wall "
              f"({total / run['wall_seconds']:,.0f} inputs/s with {run['jobs']} workers on a "
              "shared machine).", ""]
    t = cov["total"]
    lines += [f"Line coverage of nvmgr's modules by {cov['inputs_per_target']:,} inputs of each "
              f"target (coverage.py, one process): {t['covered']:,} of {t['statements']:,} "
              f"lines, {100 * t['covered'] / t['statements']:.1f} % of all of nvmgr (the CLI, "
              "hook, virt and provision layers are outside the targets by design).", "",
              "| module | lines | covered |", "|---|---:|---:|"]
    for mod in ("nvmgr/format/der.py", "nvmgr/format/reader.py", "nvmgr/format/codec.py",
                "nvmgr/format/model.py", "nvmgr/format/layout.py", "nvmgr/image/image.py",
                "nvmgr/crypto/cipher.py", "nvmgr/storage/raw.py", "nvmgr/domain/xmlparse.py",
                "nvmgr/domain/elements.py", "nvmgr/domain/metadata.py",
                "nvmgr/domain/profiles.py", "nvmgr/domain/plan.py", "nvmgr/domain/qemuargs.py"):
        v = cov["modules"].get(mod)
        if v:
            lines.append(f"| `{mod}` | {v['statements']} | "
                         f"{100 * v['covered'] / max(v['statements'], 1):.1f} % |")
    lines += ["", "| package | lines | covered |", "|---|---:|---:|"]
    for pkg, v in sorted(cov["packages"].items()):
        if v["statements"]:
            lines.append(f"| `{pkg}` | {v['statements']} | "
                         f"{100 * v['covered'] / v['statements']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs in total (default 1e6)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at once (default 2)")
    ap.add_argument("--seed", type=int, default=1000, help="first worker's seed")
    ap.add_argument("--limit", type=float, default=1.0, help="seconds an input may take (1)")
    ap.add_argument("--hang", type=float, default=20.0,
                    help="seconds after which an input counts as a hang (20)")
    ap.add_argument("--coverage", type=int, metavar="N",
                    help="instead: line coverage of nvmgr by N inputs of each target")
    ap.add_argument("--report", action="store_true",
                    help="instead: print a bench/RESULTS.md section from bench/out/fuzz.json "
                         "and bench/out/fuzz-coverage.json")
    ap.add_argument("--worker", metavar="TARGET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        print(results_section())
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, args.inputs, args.limit, args.hang)))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "uname": " ".join(platform.uname()),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.coverage:
        cov = coverage_run(args.coverage, args.seed)
        cov["machine"] = machine
        (OUT / "fuzz-coverage.json").write_text(json.dumps(cov, indent=1))
        t = cov["total"]
        print(f"coverage of nvmgr by {args.coverage:,} inputs per target: "
              f"{t['covered']:,}/{t['statements']:,} lines "  # type: ignore[index]
              f"({100 * t['covered'] / t['statements']:.1f} %)")  # type: ignore[index]
        for pkg, v in sorted(cov["packages"].items()):  # type: ignore[union-attr]
            print(f"  {pkg:24} {v['covered']:5}/{v['statements']:5} "
                  f"{100 * v['covered'] / max(v['statements'], 1):5.1f} %")
        return 0
    start = time.time()
    results = run_workers(args.inputs, args.jobs, args.seed, args.limit, args.hang)
    wall = time.time() - start
    summary: dict[str, dict[str, float]] = {}
    for r in results:
        s = summary.setdefault(str(r["target"]), {"inputs": 0, "cpu_seconds": 0.0, "slowest": 0.0,
                                                  "peak_rss": 0, "failures": 0})
        s["inputs"] += int(r["inputs"])  # type: ignore[call-overload]
        s["cpu_seconds"] += float(r["seconds"])  # type: ignore[arg-type]
        s["slowest"] = max(s["slowest"], float(r["slowest"]))  # type: ignore[arg-type]
        s["peak_rss"] = max(s["peak_rss"], int(r["peak_rss"]))  # type: ignore[call-overload]
        s["failures"] += len(r["failures"])  # type: ignore[arg-type]
    total = sum(int(s["inputs"]) for s in summary.values())
    report = {"machine": machine, "wall_seconds": wall, "jobs": args.jobs, "total_inputs": total,
              "targets": summary, "workers": results}
    (OUT / "fuzz.json").write_text(json.dumps(report, indent=1))
    print(f"{total:,} inputs in {wall:.0f} s wall ({total / wall:,.0f}/s with {args.jobs} "
          "workers)")
    print("| target | inputs | rate per worker (/s) | slowest input (s) | peak RSS (MB) | failures |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {int(s['inputs']):,} | {s['inputs'] / max(s['cpu_seconds'], 1e-9):,.0f} "
              f"| {s['slowest']:.3f} | {s['peak_rss'] / 1e6:.0f} | {int(s['failures'])} |")
    return 1 if any(s["failures"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
