#!/usr/bin/env python3
"""What the nvmgr libvirt hook costs a VM's start and stop.

The same UEFI + TPM 2.0 guest (``examples/uefi-tpm.xml``, TCG) is started and
destroyed ``--cycles`` times (default 20) in each of six set-ups, in one
run, interleaved:

(a) **nvmgr**: the hook installed, the domain defined by ``nvmgr define``
    (UEFI vars a raw slice of the image; TPM state staged at prepare and
    collected at release; every crc checked at each start), and the hook
    server running (``nvmgr hook-server``, as ``nvmgr-hook.service`` runs it);
(a') the same without the hook server: each hook call starts Python and
    imports nvmgr, lxml and cryptography;
(b) **plain**: what users have today: the hook directory empty (libvirtd
    restarted so it runs no hooks at all), the domain as the example is,
    with libvirt's own ``<nvram>`` file and swtpm state directory;
(c) **plain + hook**: (b)'s domain with the hook installed; the hook runs
    for it at every step and returns at once (no nvmgr metadata);
(d) **nvmgr, no hook**: (a)'s domain with the hook directory empty; its
    prepare and release run by hand, in process, before and after the timed
    cycle, so swtpm finds the same staged state.  (a) / (d) is the hook's own
    cost; (d) / (b) what the domain's shape costs libvirt and QEMU;
(e) **any hook**: (b)'s domain with the hook directory's one file replaced
    by ``#!/bin/sh`` + ``exit 0`` (swapped in place: no restart): (e) / (b)
    is what libvirtd's running of a hook costs a cycle whatever the hook
    does (five fork+exec+wait per cycle), a floor under (a) / (b).

libvirtd reads its hook directory only when it starts, so switching between
"installed" and "empty" restarts it; restarts (and a warm-up call after each)
are outside the timed region.  The order of the set-ups alternates from one
round to the next.  A cycle is ``virDomainCreate`` then ``virDomainDestroy``
through libvirt-python, timed with ``time.perf_counter``; the first start of
each domain (TPM manufacture, vars template copy) is a warm-up, not timed.

Target (issue 6): the hook adds under 5% to the cycle, i.e.
``median(a) / median(b) < 1.05``.

libvirtd is run under ``scripts/subreaper`` (``scripts/services``): on a
machine whose PID 1 reaps orphans late, every destroy would otherwise wait
1-2 s for QEMU's reap, which systemd does at once.

Usage (root, libvirtd, QEMU, swtpm, OVMF; ~4 minutes)::

    bench/bench_hook.py [--cycles N] [--quick] [--no-results] [--keep]

Raw samples go to ``bench/out/hook-<stamp>.json`` (and ``hook-latest.json``);
a dated section is appended to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from tests.e2e import vmlib  # noqa: E402

OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
LABELS = {
    "nvmgr": "(a) nvmgr: hook installed, nvmgr-defined domain, hook server running",
    "nvmgr-noserver": "(a') as (a), no hook server (each call imports nvmgr)",
    "plain": "(b) plain libvirt: no hooks, libvirt's <nvram> file and swtpm state",
    "plain+hook": "(c) plain libvirt domain, nvmgr hook installed (returns at once)",
    "nvmgr-nohook": "(d) the (a) domain with no hook installed; prepare and release run "
                    "by hand outside the timed region",
    "plain+exit0": "(e) (b)'s domain, the hook directory holding only `#!/bin/sh` + "
                   "`exit 0`: what libvirt's running of any hook costs",
}
#: The hook of set-up (e): libvirtd forks and execs it at each of a cycle's
#: five calls (prepare, start, started, stopped, release) and it does nothing.
TRIVIAL_HOOK = "#!/bin/sh\nexit 0\n"


#: The lock every end-to-end session holds (tests/e2e/conftest.py).
E2E_LOCK = "/run/lock/nvmgr-e2e.lock"


def log(msg: str) -> None:
    print(f"bench_hook: {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (p.stdout or p.stderr).strip()


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    git = sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", str(ROOT), "status", "--porcelain"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
        "libvirt": sh(["libvirtd", "--version"]),
        "qemu": sh(["qemu-system-x86_64", "--version"]).splitlines()[0],
        "swtpm": sh(["swtpm", "--version"]).splitlines()[0],
        "ovmf": sh(["dpkg-query", "-W", "-f", "${Version}", "ovmf"]),
        "python": f"{platform.python_version()} ({sys.executable})",
        "git": git + (" + uncommitted changes" if dirty else ""),
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_table(info: dict[str, str]) -> str:
    """The machine as a two-column Markdown table (RESULTS.md's form)."""
    rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in info.items())
    return f"| machine | |\n|---|---|\n{rows}"


def append_results(text: str, results: Path = RESULTS) -> None:
    """Append a dated section to ``bench/RESULTS.md`` (its title first, when new)."""
    new = not results.exists()
    with open(results, "a") as f:
        if new:
            f.write("# nvmgr benchmark results\n\nEach run appends a dated section.\n\n")
        f.write("\n" + text.lstrip("\n"))
    print(f"appended to {results}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, work: Path, cycles: int) -> None:
        self.work = work
        self.cycles = cycles
        self.conn: Any = None
        self.hook_installed = vmlib.HOOK.exists()
        self.real_hook: bytes | None = None
        self.restarts = 0
        self.a = (vmlib.new_name("bench-nvmgr"), str(uuid.uuid4()))
        self.b = (vmlib.new_name("bench-plain"), str(uuid.uuid4()))
        self.samples: dict[str, list[tuple[float, float]]] = {k: [] for k in LABELS}

    # -- libvirt

    def connect(self) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda *_: None, None)
        if self.conn is not None:
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
        self.conn = libvirt.open(vmlib.URI)
        self.conn.getCapabilities()  # warm-up after a (re)start, not timed

    def set_trivial(self, trivial: bool) -> None:
        """Swap the installed hook's file for (e)'s ``exit 0`` and back, in place:
        the hook directory never empties, so libvirtd needs no restart."""
        if trivial:
            if self.real_hook is None:
                self.real_hook = vmlib.HOOK.read_bytes()
            body = TRIVIAL_HOOK.encode()
        elif self.real_hook is None:
            return
        else:
            body, self.real_hook = self.real_hook, None
        tmp = vmlib.HOOK.with_name(".nvmgr-bench.tmp")
        tmp.write_bytes(body)
        tmp.chmod(0o755)
        os.replace(tmp, vmlib.HOOK)

    def set_hook(self, installed: bool) -> None:
        if installed:
            self.set_trivial(False)
        if installed and not vmlib.HOOK.exists():
            self.restarts += vmlib.install_hook()
        elif not installed and vmlib.HOOK.exists():
            self.restarts += vmlib.uninstall_hook()
        else:
            return
        self.connect()

    def set_server(self, running: bool) -> None:
        if running and vmlib.hook_server_pid() is None:
            vmlib.start_hook_server()
        elif not running and vmlib.hook_server_pid() is not None:
            vmlib.stop_hook_server()

    def hook_by_hand(self, name: str, op: str, sub: str) -> None:
        """Run one hook call of this checkout in process, untimed: (d) gets the
        TPM state staged and collected as (a) does, with no hook in libvirtd."""
        import io

        from nvmgr.hook import entry

        xml = self.conn.lookupByName(name).XMLDesc(0).encode()
        err = io.StringIO()
        rc = entry.main(["qemu", name, op, sub, "-"], io.BytesIO(xml), io.StringIO(), err)
        if rc:
            raise RuntimeError(f"hook {op} {sub} by hand exited {rc}: {err.getvalue()}")

    def cycle_without_hook(self, name: str) -> tuple[float, float]:
        self.hook_by_hand(name, "prepare", "begin")
        try:
            return self.cycle(name)
        finally:
            self.hook_by_hand(name, "release", "end")

    def cycle(self, name: str) -> tuple[float, float]:
        dom = self.conn.lookupByName(name)
        t0 = time.perf_counter()
        dom.create()
        t1 = time.perf_counter()
        dom.destroy()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    # -- set-up and tear-down

    def setup(self) -> None:
        a_name, a_uuid = self.a
        b_name, b_uuid = self.b
        xa = self.work / "a.xml"
        xa.write_text(vmlib.domain_xml(a_name, a_uuid))
        xb = self.work / "b.xml"
        xb.write_text(vmlib.domain_xml(b_name, b_uuid))
        self.set_hook(True)
        if self.conn is None:
            self.connect()
        vmlib.nvmgr("define", xa)
        vmlib.virsh("define", str(xb))
        log(f"(a) {a_name}: nvmgr define; (b)/(c) {b_name}: virsh define")
        for name in (a_name, b_name):  # TPM manufacture, vars copied from the template
            self.cycle(name)
        log("warm-up cycles done")

    def teardown(self, keep: bool) -> None:
        try:
            self.set_trivial(False)
            self.set_hook(self.hook_installed)
        finally:
            if not keep:
                for name, dom_uuid in (self.a, self.b):
                    vmlib.cleanup_domain(name, dom_uuid)
            if self.conn is not None:
                self.conn.close()

    # -- the measurement

    def run(self, rng: random.Random) -> None:
        a_name, b_name = self.a[0], self.b[0]
        phases = [("installed", True, [("nvmgr", a_name), ("plain+hook", b_name)]),
                  ("trivial", False, [("plain+exit0", b_name)]),
                  ("installed", False, [("nvmgr-noserver", a_name)]),
                  ("empty", False, [("plain", b_name), ("nvmgr-nohook", a_name)])]
        for i in range(self.cycles):
            for hook_state, server, runs in (phases if i % 2 == 0 else phases[::-1]):
                self.set_hook(hook_state != "empty")
                self.set_trivial(hook_state == "trivial")
                self.set_server(server)
                runs = list(runs)
                rng.shuffle(runs)
                for label, name in runs:
                    s, d = (self.cycle_without_hook(name) if label == "nvmgr-nohook"
                            else self.cycle(name))
                    self.samples[label].append((s, d))
            line = ", ".join(f"{k} {sum(v[-1]):.2f} s" for k, v in self.samples.items())
            log(f"round {i + 1}/{self.cycles}: {line}")


HOOK_OPS = (("prepare", "begin"), ("start", "begin"), ("started", "begin"),
            ("stopped", "end"), ("release", "end"))


def time_hook_calls(name: str, rounds: int, server: bool) -> dict[str, list[float]]:
    """Wall time of each hook call libvirtd makes in one cycle, run by hand.

    The installed hook, with the domain's live XML on stdin, in libvirtd's
    order, with the VM stopped: prepare stages and flags, release collects and
    reseals, exactly as around a real run (minus QEMU).
    """
    import libvirt

    if server:
        vmlib.start_hook_server()
    else:
        vmlib.stop_hook_server()
    conn = libvirt.open(vmlib.URI)
    try:
        xml = conn.lookupByName(name).XMLDesc(0).encode()
    finally:
        conn.close()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": "/root"}
    out: dict[str, list[float]] = {f"{op} {sub}": [] for op, sub in HOOK_OPS}
    for _ in range(rounds):
        for op, sub in HOOK_OPS:
            t0 = time.perf_counter()
            p = subprocess.run([str(vmlib.HOOK), name, op, sub, "-"], input=xml, env=env,
                               capture_output=True, check=False)
            out[f"{op} {sub}"].append(time.perf_counter() - t0)
            if p.returncode:
                raise RuntimeError(f"hook {op} {sub} exited {p.returncode}: {p.stderr!r}")
    return out


def summarize(samples: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, pairs in samples.items():
        totals = [s + d for s, d in pairs]
        out[label] = {
            "n": len(pairs),
            "median_s": statistics.median(totals),
            "median_start_s": statistics.median(s for s, _ in pairs),
            "median_destroy_s": statistics.median(d for _, d in pairs),
            "min_s": min(totals),
            "max_s": max(totals),
            "stdev_s": statistics.stdev(totals) if len(totals) > 1 else 0.0,
        }
    base = out["plain"]["median_s"]
    for label in out:
        out[label]["ratio_to_plain"] = out[label]["median_s"] / base
    paired = [sum(a) - sum(b) for a, b in zip(samples["nvmgr"], samples["plain"], strict=True)]
    out["paired_nvmgr_minus_plain_median_s"] = statistics.median(paired)
    return out


def report(info: dict[str, str], summary: dict[str, Any], cmdline: str, elapsed: float,
           stamp: str, cycles: int, restarts: int, seed: int, hook_dir: list[str]) -> str:
    ratio = summary["nvmgr"]["ratio_to_plain"]
    hook = summary["hook_calls_median_s"]
    hook_sum = sum(hook.values())
    calls = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in hook.items())
    start_d = summary["nvmgr"]["median_start_s"] - summary["plain"]["median_start_s"]
    destroy_d = summary["nvmgr"]["median_destroy_s"] - summary["plain"]["median_destroy_s"]
    added = summary["nvmgr"]["median_s"] - summary["plain"]["median_s"]
    verdict = "MET" if ratio < 1.05 else "NOT MET"
    nohook = summary.get("nvmgr-nohook")
    if nohook:
        own = summary["nvmgr"]["median_s"] / nohook["median_s"]
        shape = nohook["ratio_to_plain"]
        split = (f"- (a) / (d) = {own:.3f}: the hook's own cost to this domain's cycle "
                 f"({(summary['nvmgr']['median_s'] - nohook['median_s']) * 1000:+.0f} ms; "
                 f"{'under' if own < 1.05 else 'not under'} 5%).  (d) / (b) = {shape:.3f}: what "
                 "the nvmgr domain's shape costs libvirt and QEMU with no hook at all (no "
                 "`<nvram>` of libvirt's: pflash and the TPM state through nvmgr's "
                 "`<qemu:commandline>` and staging).\n")
    else:
        split = ""
    floor = ""
    if "plain+exit0" in summary:
        e = summary["plain+exit0"]
        floor = (f"\n- (e) / (b) = {e['ratio_to_plain']:.3f} "
                 f"({(e['median_s'] - summary['plain']['median_s']) * 1000:+.0f} ms): libvirtd "
                 "running a hook that only exits, five times a cycle; any hook pays it.  "
                 f"(a) / (e) = {summary['nvmgr']['median_s'] / e['median_s']:.3f}: nvmgr's hook "
                 "beyond that, its domain's shape included.")
    hook_ns = summary.get("hook_calls_noserver_median_s", {})
    calls_ns = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in hook_ns.items())
    ratio_ns = summary.get("nvmgr-noserver", {}).get("ratio_to_plain", float("nan"))
    rows = []
    for label, title in LABELS.items():
        if label not in summary:
            continue
        s = summary[label]
        rows.append(f"| {title} | {s['n']} | {s['median_s'] * 1000:.0f} | "
                    f"{s['median_start_s'] * 1000:.0f} | {s['median_destroy_s'] * 1000:.0f} | "
                    f"{s['min_s'] * 1000:.0f}-{s['max_s'] * 1000:.0f} | "
                    f"{s['ratio_to_plain']:.3f} |")
    machine = machine_table(info)
    return f"""## {info['date']}: libvirt hook, start + destroy cycle

Command: `{cmdline}` (`bench/bench_hook.py`; {elapsed:.0f} s; {cycles} rounds, set-ups
interleaved, order shuffled with seed {seed}; {restarts} libvirtd restarts, all outside the
timed region). Guest: `examples/uefi-tpm.xml` (q35, OVMF 4M, TPM 2.0 CRB via swtpm, TCG,
256 MiB, no disk). Raw samples: `bench/out/hook-{stamp}.json`. Hook directory during (a)/(c):
{', '.join(hook_dir) or '(empty)'}.

{machine}

| set-up | cycles | median ms | start ms | destroy ms | range ms | ratio to (b) |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- **Target: the hook adds under 5% to a start-and-destroy cycle: {verdict}** end to end -
  median(a) / median(b) = {ratio:.3f} ({added * 1000:+.0f} ms per cycle; median of the
  per-round differences {summary['paired_nvmgr_minus_plain_median_s'] * 1000:+.0f} ms).  The hook's
  own calls alone take {hook_sum / summary['plain']['median_s'] * 100:.1f}% of (b)'s cycle (below).
  Without the hook server, (a') / (b) = {ratio_ns:.3f}.
{split}- (c) / (b) = {summary['plain+hook']['ratio_to_plain']:.3f}: what the installed hook costs
  domains nvmgr does not manage.{floor}
- The hook's own calls for (a), run by hand with the live XML, VM stopped (median of 10),
  with the hook server: {calls}; {hook_sum * 1000:.0f} ms per cycle,
  {hook_sum / summary['plain']['median_s'] * 100:.1f}% of (b)'s cycle.  Without it: {calls_ns or 'not measured'}.
  Against (b), (a)'s start takes {start_d * 1000:+.0f} ms and its destroy {destroy_d * 1000:+.0f} ms
  (the nvmgr domain has no `<nvram>` file of libvirt's, its swtpm state is staged, and its
  QEMU has a `<qemu:commandline>`); (d) above separates the hook from that part.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_hook.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20, help="rounds (default 20)")
    ap.add_argument("--quick", action="store_true", help="5 rounds")
    ap.add_argument("--no-results", action="store_true",
                    help="do not append to bench/RESULTS.md (JSON is still written)")
    ap.add_argument("--keep", action="store_true", help="keep the two domains")
    ap.add_argument("--seed", type=int, default=None, help="seed of the shuffling")
    ap.add_argument("--render", metavar="JSON",
                    help="print the RESULTS.md section of an earlier run's raw samples, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        stamp = Path(args.render).stem.removeprefix("hook-")
        print(report(raw["machine"], raw["summary"], raw["command"], raw["elapsed_s"], stamp,
                     len(raw["samples_start_destroy_s"]["plain"]), raw["restarts"], raw["seed"],
                     raw.get("hook_dir", ["nvmgr"])))
        return 0
    if os.geteuid() != 0:
        ap.error("run as root: it drives the system libvirtd and its hook directory")
    cycles = 5 if args.quick else args.cycles
    if cycles < 2:
        ap.error("--cycles must be at least 2")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    cmdline = "bench/bench_hook.py" + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    # Never beside an end-to-end session: both install their hook into the one
    # system libvirtd and restart it.
    with open(E2E_LOCK, "w") as lock:
        log(f"waiting for {E2E_LOCK}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        vmlib.ensure_services()
        info = machine_info()
        log("machine: " + json.dumps(info))
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="nvmgr-bench-hook-"))
        bench = Bench(work, cycles)
        try:
            bench.setup()
            hook_dir = sorted(p.name for p in vmlib.HOOK_DIR.iterdir())
            bench.run(random.Random(seed))
            bench.set_hook(True)
            hook_calls = time_hook_calls(bench.a[0], 10, server=True)
            hook_calls_noserver = time_hook_calls(bench.a[0], 10, server=False)
        finally:
            vmlib.stop_hook_server()
            bench.teardown(args.keep)
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = summarize(bench.samples)
    summary["hook_calls_median_s"] = {k: statistics.median(v) for k, v in hook_calls.items()}
    summary["hook_calls_noserver_median_s"] = {k: statistics.median(v)
                                               for k, v in hook_calls_noserver.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    raw = {"command": cmdline, "seed": seed, "machine": info, "elapsed_s": elapsed,
           "hook_dir": hook_dir,
           "restarts": bench.restarts, "labels": LABELS, "summary": summary,
           "samples_start_destroy_s": bench.samples, "hook_calls_s": hook_calls,
           "hook_calls_noserver_s": hook_calls_noserver}
    for suffix in (stamp, "latest"):
        (OUT / f"hook-{suffix}.json").write_text(json.dumps(raw, indent=1))
    md = report(info, summary, cmdline, elapsed, stamp, cycles, bench.restarts, seed, hook_dir)
    print(md)
    if not args.no_results:
        append_results(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
