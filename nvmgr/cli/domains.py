"""Commands about libvirt domains: plan, define, undefine, install-hook, hook-server,
cli-server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nvmgr.cli.common import Result, _add_image, _add_key_args, arguments, command, load_key
from nvmgr.errors import NotFoundError, UsageError
from nvmgr.paths import (
    CLI_SOCKET,
    CLI_UNIT,
    HOOK_DIR,
    HOOK_LOG,
    HOOK_NAME,
    HOOK_SOCKET,
    HOOK_UNIT,
    IMAGE_DIR,
    UNIT_DIR,
    WATCH_UNIT,
)

if TYPE_CHECKING:
    from nvmgr.forkserver import ForkServer


def _read_xml(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError as e:
        raise NotFoundError(f"no such file: {path}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text") from e


@arguments("plan")
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("xml", metavar="DOMAIN.xml", help="a libvirt domain XML file, or -")
    p.add_argument("--encrypted", action="store_true",
                   help="plan encrypted sections (as with a key at define)")


@command("plan", "the sections a domain needs, their offsets and the image size",
         "nvmgr plan examples/uefi-tpm.xml --output json",
         render=lambda r: str(r.pop("_render", "")))
def cmd_plan(args: argparse.Namespace) -> Result:
    from nvmgr.domain.plan import plan_domain, plan_to_json, render_text

    plan = plan_domain(_read_xml(args.xml), encrypted=args.encrypted)
    r: Result = dict(plan_to_json(plan))
    if args.output != "json":
        return {"_text": render_text(plan)}
    return r


@arguments("define")
def _define_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("xml", metavar="DOMAIN.xml", help="a libvirt domain XML file, or -")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"),
                   help="container of a new image (default raw; an existing image keeps its own)")
    p.add_argument("--image", metavar="PATH",
                   help="where the image lives (default /var/lib/libvirt/nvmgr/NAME.nvram)")
    p.add_argument("--print-xml", action="store_true", help="print the XML that was defined")
    _orphan_args(p)
    g = p.add_argument_group("encryption (the key source is recorded in the domain, never the key)")
    g.add_argument("--key-file", metavar="FILE", help="a 0600 key file the hooks will read")
    g.add_argument("--key-secret", metavar="UUID", help="a libvirt secret holding the key")


def _orphan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("an orphan at the image's path (the image of a domain undefined "
                             "elsewhere, see nvmgr images --orphans)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--adopt", dest="orphan", action="store_const", const="adopt",
                   help="take its state: the same UEFI vars and TPM")
    m.add_argument("--fresh", dest="orphan", action="store_const", const="fresh",
                   help="start with a new image; the orphan is moved aside (kept) and its "
                        "new path printed")


def _render_define(r: Result) -> str:
    imported = ", ".join(f"{k} from {v}" for k, v in r["imported"].items()) or "nothing"
    text = (f"defined {r['domain']} with {r['image']}"
            f" ({'created' if r['created'] else 'existing'} image; "
            f"added: {', '.join(r['added']) or 'nothing'}; imported: {imported})")
    if r.get("moved_aside"):
        text += f"\nthe orphaned image that was there is kept as {r['moved_aside']}"
    for name, where in (r.get("in_members") or {}).items():
        text += (f"\nsection {name} placed in member image {where}: the image may not grow "
                 "past its max-image-size")
    return text + (f"\n{r['xml']}" if r.get("xml") else "")


@command("define", "plan, create or grow the image, rewrite and define the domain in libvirt",
         "nvmgr define examples/uefi-tpm.xml --format qcow2 --key-file /etc/nvmgr/vm1.key",
         render=_render_define)
def cmd_define(args: argparse.Namespace) -> Result:
    from nvmgr.virt.define import define

    kek = load_key(args)
    res = define(_read_xml(args.xml), uri=args.connect, fmt=args.format, image=args.image,
                 kek=kek, key_file=args.key_file, key_secret=args.key_secret,
                 orphan=args.orphan, retry=f"nvmgr define {args.xml}")
    r: Result = res.to_json()
    if args.print_xml:
        r["xml"] = res.xml
    return r


@arguments("encrypt")
def _encrypt_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)  # with --domain, the (stopped) domain is defined again naming the key
    _add_key_args(p)


@command("encrypt", "encrypt a plaintext image, its live sections as LUKS volumes (crash-safe; "
         "VM stopped)",
         "nvmgr encrypt --domain vm1 --key-file /etc/nvmgr/vm1.key",
         render=lambda r: (f"encrypted {', '.join(r['encrypted']) or 'nothing (already)'} in "
                           f"{r['image']}" + (f"; domain {r['domain']} rewired"
                                               if r.get("domain") else "")
                           + (f"; live section(s) {', '.join(r['moved'])} moved: run "
                              "'nvmgr reconcile DOMAIN'" if r["moved"] and not r.get("domain")
                              else "")))
def cmd_encrypt(args: argparse.Namespace) -> Result:
    kek = load_key(args)
    if args.domain:
        if args.image:
            raise UsageError("name an IMAGE or give --domain, not both")
        from nvmgr.virt.define import encrypt_domain

        return encrypt_domain(args.domain, uri=args.connect, kek=kek, key_file=args.key_file,
                              key_secret=args.key_secret)
    if not args.image:
        raise UsageError("name an IMAGE or give --domain NAME")
    if kek is None:
        raise UsageError("give the key to encrypt with: --key-file, --key-secret or --key-stdin")
    from nvmgr.image.convert import encrypt
    from nvmgr.storage import absolute

    return encrypt(absolute(args.image), kek)


@arguments("vtpm-secret")
def _vtpm_secret_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)  # --domain VM, or IMAGE (a migration's destination, the domain not defined)
    _add_key_args(p)


@command("vtpm-secret", "give libvirt the vTPM secret swtpm encrypts the TPM state of a domain "
         "with a key with: after a libvirtd restart (ephemeral secret), or on a migration's "
         "destination before migrating (the watcher does the first)",
         "nvmgr vtpm-secret --domain vm1\n"
         "  nvmgr vtpm-secret /var/lib/libvirt/nvmgr/vm1.nvram --key-file /etc/nvmgr/vm1.key",
         render=lambda r: (f"vTPM secret {r['secret']} of domain {r['domain_uuid']} given to "
                           "libvirt" if r["secret"] else
                           f"domain {r['domain']} needs no vTPM secret (no key or no TPM)"))
def cmd_vtpm_secret(args: argparse.Namespace) -> Result:
    from nvmgr.virt import define as vdefine

    if args.domain:
        if args.image:
            raise UsageError("name an IMAGE or give --domain, not both")
        from nvmgr.domain.elements import parse_domain
        from nvmgr.virt import conn as virt

        su = vdefine.restore_vtpm_secret(args.domain, args.connect)
        dom = parse_domain(virt.domain_xml(args.domain, args.connect))
        return {"domain": args.domain, "domain_uuid": str(dom.uuid), "secret": su}
    if not args.image:
        raise UsageError("name an IMAGE or give --domain NAME")
    kek = load_key(args)
    if kek is None:
        raise UsageError("give the image's key: --key-file, --key-secret or --key-stdin")
    return {"domain": None, **vdefine.vtpm_secret_of_image(os.path.abspath(args.image), kek,
                                                          args.connect)}


@arguments("undefine")
def _undefine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-nvram", action="store_true", help="keep the nvmgr image")
    g.add_argument("--remove-nvram", action="store_true",
                   help="delete the nvmgr image too (on RBD: the RBD image and its snapshots; "
                        "in an NBD export: zeros over the image, the export given back blank)")


@command("undefine", "undefine a domain, keeping or removing its image (virsh's semantics)",
         "nvmgr undefine vm1 --remove-nvram",
         render=lambda r: (f"undefined {r['domain']}" + (
             "" if not r["image"] else
             f"; removed its image {r['image']}" if r["image_removed"] else
             f"; kept its image {r['image']}" + (
                 " (recorded as orphaned: nvmgr images --orphans)"
                 if r.get("orphaned") else ""))))
def cmd_undefine(args: argparse.Namespace) -> Result:
    from nvmgr.virt.define import undefine

    return undefine(args.domain, uri=args.connect, keep_nvram=args.keep_nvram,
                    remove_nvram=args.remove_nvram)


@arguments("images")
def _images_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--orphans", action="store_true",
                   help="only images whose domain no longer exists (undefined elsewhere)")
    p.add_argument("--dir", action="append", metavar="DIR",
                   help=f"a directory to look in (default {IMAGE_DIR}; repeatable); images "
                        "that domains name elsewhere are listed too")
    p.add_argument("--image", action="append", metavar="IMAGE", dest="extra",
                   help="an image to look at too, a file or a network location (rbd:..., "
                        "nbd://...; repeatable): no directory lists an RBD pool's images")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")


def _render_images(r: Result) -> str:
    rows = r["images"]
    if not rows:
        return "no orphaned images" if r["orphans_only"] else "no nvmgr images"
    lines = []
    for e in rows:
        who = e["domain"] or e["domain_uuid"] or "-"
        extra = (f" since {e['orphaned_since']}" if e["orphaned_since"] else
                 f": {e['error']}" if e["error"] else "")
        lines.append(f"{e['path']}  {e['state']}{extra}  {who}")
    return "\n".join(lines)


@command("images", "every nvmgr image under the managed directories: its owner domain and "
         "state (running, defined, orphaned, unowned, unreadable)",
         "nvmgr images --orphans --output json", render=_render_images)
def cmd_images(args: argparse.Namespace) -> Result:
    from nvmgr.virt.inventory import images

    found = images(args.dir or (IMAGE_DIR,), args.connect, orphans_only=args.orphans,
                   extra=args.extra or ())
    return {"images": [e.to_json() for e in found], "orphans_only": args.orphans}


@arguments("install-hook")
def _install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hook-dir", default=HOOK_DIR, metavar="DIR",
                   help=f"libvirt's qemu hook directory (default {HOOK_DIR})")
    p.add_argument("--uninstall", action="store_true", help="remove the hook instead")
    p.add_argument("--service", action="store_true",
                   help=f"also install (or remove) the systemd units of the watcher, {WATCH_UNIT} "
                        f"(nvmgr reconcile --all --watch), of the hook server, {HOOK_UNIT} "
                        f"(nvmgr hook-server), and of the CLI server, {CLI_UNIT} "
                        "(nvmgr cli-server)")
    p.add_argument("--systemd-dir", default=UNIT_DIR, metavar="DIR",
                   help=f"where --service puts the unit (default {UNIT_DIR})")


@command("install-hook", "install (or --uninstall) the libvirt qemu hook; restart libvirtd after",
         "nvmgr install-hook --service && systemctl restart libvirtd && "
         "systemctl daemon-reload && systemctl enable --now nvmgr-watch.service nvmgr-hook.service "
         "nvmgr-cli.service")
def cmd_install_hook(args: argparse.Namespace) -> Result:
    target = Path(args.hook_dir) / HOOK_NAME
    tmp = target.with_name(f".{HOOK_NAME}.tmp")
    units = {WATCH_UNIT: "reconcile --all --watch", HOOK_UNIT: "hook-server",
             CLI_UNIT: "cli-server"}
    if args.uninstall:
        existed = target.is_symlink() or target.exists()
        target.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        r: Result = {"hook": str(target), "removed": existed}
        if args.service:
            paths = [Path(args.systemd_dir) / u for u in units]
            r["services"] = [str(p) for p in paths]
            r["services_removed"] = [str(p) for p in paths if p.exists()]
            for p in paths:
                p.unlink(missing_ok=True)
            r["note"] = f"systemctl disable --now {' '.join(units)} first, if they were enabled"
        return r
    from nvmgr import resources
    from nvmgr.cli.hookinstall import check_hook_python, hook_script, hook_values

    values = hook_values()
    body = hook_script(resources.read_text(resources.HOOK_FRONTEND), values)
    nvmgr_file = check_hook_python(values)
    was_empty = not (target.parent.is_dir() and any(target.parent.iterdir()))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(body, encoding="utf-8")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    r = {"hook": str(target), "python": values["PYTHON"], "nvmgr": nvmgr_file}
    notes = []
    if was_empty:
        notes.append("libvirtd looks for hooks when it starts: restart it once "
                     f"({target.parent} was empty)")
    if args.service:
        from nvmgr.cli.hookinstall import service_unit

        r["services"] = []
        for name, cmd in units.items():
            body = service_unit(resources.read_text(name), values["PYTHON"], cmd, name)
            unit = Path(args.systemd_dir) / name
            unit.parent.mkdir(parents=True, exist_ok=True)
            utmp = unit.with_name(f".{name}.tmp")
            utmp.write_text(body, encoding="utf-8")
            os.chmod(utmp, 0o644)
            os.replace(utmp, unit)
            r["services"].append(str(unit))
        notes.append("start the watcher, the hook server and the CLI server: "
                     f"systemctl daemon-reload && systemctl enable --now {' '.join(units)}")
    if notes:
        r["note"] = "; ".join(notes)
    return r


def _server_args(p: argparse.ArgumentParser, default: str, unit: str) -> None:
    p.add_argument("--socket", default=default, metavar="PATH",
                   help=f"where to listen (default {default})")
    p.add_argument("--daemon", action="store_true",
                   help=f"go to the background once listening (lines then go to {HOOK_LOG}); "
                        f"without it, run in the foreground ({unit})")
    p.add_argument("--pidfile", metavar="FILE", help="write the server's pid here")


@arguments("hook-server")
def _hook_server_args(p: argparse.ArgumentParser) -> None:
    _server_args(p, HOOK_SOCKET, HOOK_UNIT)


@command("hook-server", "run the libvirt hook's calls in a process that has nvmgr imported "
         "(nvmgr-hook.service): each start and stop of a VM waits ~30 ms for the hook "
         "instead of ~250 ms; SIGTERM stops it; the hook works without it",
         "nvmgr hook-server --daemon --pidfile /run/nvmgr/hook-server.pid")
def cmd_hook_server(args: argparse.Namespace) -> Result:
    from nvmgr.hook.server import Server

    return _serve(args, "hook-server", Server)


@arguments("cli-server")
def _cli_server_args(p: argparse.ArgumentParser) -> None:
    _server_args(p, CLI_SOCKET, CLI_UNIT)


@command("cli-server", "run nvmgr commands in a process that has nvmgr, lxml and "
         "libvirt-python imported (nvmgr-cli.service): root's nvmgr commands hand their "
         "command line to it and start in ~30 ms instead of ~150 ms; SIGTERM stops it; "
         "nvmgr works without it (NVMGR_CLI_SOCKET= runs a command without asking it)",
         "nvmgr cli-server --daemon --pidfile /run/nvmgr/cli-server.pid")
def cmd_cli_server(args: argparse.Namespace) -> Result:
    from nvmgr.cli.server import Server

    return _serve(args, "cli-server", Server)


def _serve(args: argparse.Namespace, label: str,
           make: Callable[..., ForkServer]) -> Result:
    """Run the server *make* builds until SIGTERM, SIGINT or SIGHUP (or its code
    changes on disk); in the foreground, or with --daemon in the background."""
    import signal

    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.daemon:
        return _daemonize(args, label, make, stopping)
    # Its own copy of stdout: a worker's fd 1 is its caller's stdout.
    report = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", errors="replace")

    def say(line: str) -> None:
        report.write(f"{label}: {line}\n")
        report.flush()

    server = make(args.socket, say=say)
    if args.pidfile:
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    say(f"listening on {args.socket} (pid {os.getpid()})")
    server.serve(stop=lambda: bool(stopping))
    why = "its code changed on disk" if server.stale else \
        signal.Signals(stopping[0]).name if stopping else "stop"
    say(f"stopped ({why})")
    return {"_silent": True}


def _daemonize(args: argparse.Namespace, label: str, make: Callable[..., ForkServer],
               stopping: list[int]) -> Result:
    """Fork; the child listens, then tells the parent, which returns (like libvirtd -d)."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        with os.fdopen(r, "rb") as f:
            word = f.read().decode("utf-8", "replace")
        if not word.startswith("ok "):
            raise UsageError(f"the {label} did not start: {word or 'it died'}")
        return {"socket": args.socket, "pid": int(word.split()[1])}
    os.close(r)
    code = 0
    try:
        os.setsid()
        # What the caller held open (a lock, a pipe it reads to the end) is not ours to keep.
        os.closerange(3, w)
        os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
        try:
            log = open(HOOK_LOG, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as we do)
        except OSError:
            log = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115

        def say(line: str) -> None:
            log.write(f"{label}[{os.getpid()}]: {line}\n")
            log.flush()

        try:
            server = make(args.socket, say=say)
        except OSError as e:
            os.write(w, f"cannot listen on {args.socket}: {e.strerror}".encode())
            raise
        if args.pidfile:
            Path(args.pidfile).write_text(f"{os.getpid()}\n")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.write(w, f"ok {os.getpid()}".encode())
        os.close(w)
        say(f"listening on {args.socket}")
        server.serve(stop=lambda: bool(stopping))
        say("stopped (its code changed on disk)" if server.stale else "stopped")
    except BaseException:
        code = 1
    finally:
        os._exit(code)


@arguments("reconcile")
def _reconcile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="domains to reconcile")
    p.add_argument("--all", action="store_true", help="every domain with nvmgr metadata")
    p.add_argument("--watch", action="store_true",
                   help="keep running (nvmgr-watch.service): reconcile each nvmgr domain "
                        "when it is defined or stops (virt-manager, virsh edit, virt-clone), "
                        "record the image of one undefined elsewhere as orphaned; one line "
                        "per action; reconnects when libvirtd restarts; SIGTERM stops it")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    _orphan_args(p)


def _render_reconcile(r: Result) -> str:
    return "\n".join(f"{x['domain']}: {x['status']}"
                     + (f" (added {', '.join(x['added'])})" if x["added"] else "")
                     + "".join(f"; {n} placed in member image {w} (max-image-size)"
                               for n, w in (x.get("in_members") or {}).items())
                     + ("; adopted the orphaned image's state" if x.get("adopted") else "")
                     + (f"; the orphaned image that was there is kept as {x['moved_aside']}"
                        if x.get("moved_aside") else "")
                     for x in r["domains"]) or "no nvmgr domains"


@command("reconcile", "bring domains changed elsewhere (virsh edit, virt-manager) back in line "
         "with their images: new sections, QEMU arguments, stateless loader",
         "nvmgr reconcile --all --watch", render=_render_reconcile)
def cmd_reconcile(args: argparse.Namespace) -> Result:
    from nvmgr.virt.define import nvmgr_domains, reconcile

    if bool(args.domains) == args.all:
        raise UsageError("name DOMAINs or give --all")
    if args.watch:
        if args.orphan:
            raise UsageError("--adopt and --fresh are choices for one domain, not for --watch")
        return _watch(args)
    if args.orphan and (args.all or len(args.domains) != 1):
        raise UsageError("--adopt and --fresh are choices for one domain: name it")
    names = args.domains or nvmgr_domains(args.connect)
    return {"domains": [reconcile(n, uri=args.connect, orphan=args.orphan).to_json()
                        for n in names]}


def _watch(args: argparse.Namespace) -> Result:
    """Run the watcher (nvmgr.virt.watch) until SIGTERM, SIGINT or SIGHUP; exit 0 then."""
    import signal

    from nvmgr.virt import watch

    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)  # the watcher stops between two actions, never in one

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def say(line: str) -> None:
        print(line, flush=True)

    def note(line: str) -> None:
        sys.stderr.write(f"nvmgr: {line}\n")
        sys.stderr.flush()

    watch.run(args.connect, only=None if args.all else set(args.domains), say=say, note=note,
              stop=lambda: bool(stopping))
    note(f"stopped on {signal.Signals(stopping[0]).name}" if stopping else "stopped")
    return {"_silent": True}


def _affect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    g = p.add_argument_group("what changes (virsh attach-device's flags; none: --live)")
    g.add_argument("--live", action="store_true", help="the running VM")
    g.add_argument("--config", action="store_true", help="the persistent definition (next boot)")
    g.add_argument("--current", action="store_true",
                   help="the running VM if it runs, else the persistent definition")
    g.add_argument("--persistent", action="store_true",
                   help="the persistent definition, and the running VM if it runs")


@arguments("attach")
def _attach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("device", metavar="DEVICE.xml",
                   help="a <nvmgr:section> (name, size or kind, binding, driver...) or a libvirt "
                        "device element carrying <nvmgr:section> children; - reads stdin")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]FILE",
                   help="the bytes a new section starts with, in the image before the device "
                        "reaches the guest (NAME= when the device brings several sections)")
    _affect_args(p)


def _data(pairs: list[str], device_xml: str) -> dict[str, bytes]:
    from nvmgr.domain.device import parse_device

    out: dict[str, bytes] = {}
    declared = [s.name for s in parse_device(device_xml).sections]
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or "/" in name or not os.path.exists(path):
            if len(declared) != 1:
                raise UsageError(f"--data {pair!r}: the device declares "
                                 f"{len(declared)} sections; say which: --data NAME=FILE")
            name, path = declared[0], pair
        if name in out:
            raise UsageError(f"--data for section {name} is given twice")
        try:
            with open(path, "rb") as f:
                out[name] = f.read((1 << 30) + 1)
        except FileNotFoundError as e:
            raise NotFoundError(f"no such file: {path}") from e
    return out


def _render_attach(r: Result) -> str:
    where = " and ".join(w for w, on in (("live", r["live"]), ("config", r["config"])) if on)
    text = f"attached {r['device']} to {r['domain']} ({where})"
    text += f"; sections: {', '.join(r['sections']) or 'none'}"
    if r["added"]:
        text += f"; image grew by {', '.join(r['added'])}"
        if r.get("image_size_before") is not None:
            text += f" ({r['image_size_before']:,} -> {r['image_size']:,} bytes)"
    if r["kept"]:
        text += f"; reused (kept in the image): {', '.join(r['kept'])}"
    if r["deferred"]:
        text += "; the image grows at the next start (the running QEMU holds it)"
    if r["plugged"]:
        text += f"; into the running QEMU: {', '.join(r['plugged'])}"
    return text


@command("attach", "attach a device and its sections to a domain, live (hot-plug) and/or for "
         "the next boot; the image grows, nothing in it moves",
         "nvmgr attach vm1 state0.xml --live --config --data state0.img",
         render=_render_attach)
def cmd_attach(args: argparse.Namespace) -> Result:
    from nvmgr.virt.attach import attach

    xml = _read_xml(args.device)
    res = attach(args.domain, xml, uri=args.connect, live=args.live, config=args.config,
                 current=args.current, persistent=args.persistent,
                 contents=_data(args.data, xml))
    return res.to_json()


@arguments("detach")
def _detach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("device", metavar="DEVICE.xml", nargs="?",
                   help="the device as given to nvmgr attach (or --section NAME)")
    p.add_argument("--section", "-s", metavar="NAME", help="detach this section's device")
    p.add_argument("--remove-section", action="store_true",
                   help="also remove the section from the image (crash-safe; its space is "
                        "reused); by default its bytes are kept for a later attach")
    _affect_args(p)


def _render_detach(r: Result) -> str:
    where = " and ".join(w for w, on in (("live", r["live"]), ("config", r["config"])) if on)
    text = f"detached {r['device']} from {r['domain']} ({where})"
    if r["unplugged"]:
        text += f"; out of the running QEMU: {', '.join(r['unplugged'])}"
    if r["removed"]:
        text += f"; removed from the image: {', '.join(r['removed'])}"
    if r["kept"]:
        text += f"; kept in the image: {', '.join(r['kept'])}"
    return text


@command("detach", "detach a device or section from a domain (virsh detach-device's flags); "
         "the section's bytes stay in the image unless --remove-section",
         "nvmgr detach vm1 --section state0 --live --config --remove-section",
         render=_render_detach)
def cmd_detach(args: argparse.Namespace) -> Result:
    from nvmgr.virt.attach import detach

    res = detach(args.domain, _read_xml(args.device) if args.device else None,
                 section=args.section, uri=args.connect, live=args.live, config=args.config,
                 current=args.current, persistent=args.persistent,
                 remove_section=args.remove_section)
    return res.to_json()
