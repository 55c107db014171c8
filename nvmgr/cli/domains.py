"""Commands about libvirt domains: plan, define, undefine, install-hook."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nvmgr.cli.common import Result, arguments, command, load_key
from nvmgr.errors import NotFoundError, UsageError
from nvmgr.paths import HOOK_DIR, HOOK_NAME


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
    g = p.add_argument_group("encryption (the key source is recorded in the domain, never the key)")
    g.add_argument("--key-file", metavar="FILE", help="a 0600 key file the hooks will read")
    g.add_argument("--key-secret", metavar="UUID", help="a libvirt secret holding the key")


@command("define", "plan, create or grow the image, rewrite and define the domain in libvirt",
         "nvmgr define examples/uefi-tpm.xml --format qcow2 --key-file /etc/nvmgr/vm1.key",
         render=lambda r: (f"defined {r['domain']} with {r['image']}"
                           f" ({'created' if r['created'] else 'existing'} image; "
                           f"added: {', '.join(r['added']) or 'nothing'}; "
                           f"imported: {', '.join(f'{k} from {v}' for k, v in r['imported'].items()) or 'nothing'})"
                           + (f"\n{r['xml']}" if r.get("xml") else "")))
def cmd_define(args: argparse.Namespace) -> Result:
    from nvmgr.virt.define import define

    kek = load_key(args)
    res = define(_read_xml(args.xml), uri=args.connect, fmt=args.format, image=args.image,
                 kek=kek, key_file=args.key_file, key_secret=args.key_secret)
    r: Result = res.to_json()
    if args.print_xml:
        r["xml"] = res.xml
    return r


@arguments("undefine")
def _undefine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-nvram", action="store_true", help="keep the nvmgr image")
    g.add_argument("--remove-nvram", action="store_true", help="delete the nvmgr image too")


@command("undefine", "undefine a domain, keeping or removing its image (virsh's semantics)",
         "nvmgr undefine vm1 --remove-nvram",
         render=lambda r: (f"undefined {r['domain']}" + (
             "" if not r["image"] else
             f"; removed its image {r['image']}" if r["image_removed"] else
             f"; kept its image {r['image']}")))
def cmd_undefine(args: argparse.Namespace) -> Result:
    from nvmgr.virt.define import undefine

    return undefine(args.domain, uri=args.connect, keep_nvram=args.keep_nvram,
                    remove_nvram=args.remove_nvram)


@arguments("install-hook")
def _install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hook-dir", default=HOOK_DIR, metavar="DIR",
                   help=f"libvirt's qemu hook directory (default {HOOK_DIR})")
    p.add_argument("--uninstall", action="store_true", help="remove the hook instead")


@command("install-hook", "install (or --uninstall) the libvirt qemu hook; restart libvirtd after",
         "nvmgr install-hook && systemctl restart libvirtd")
def cmd_install_hook(args: argparse.Namespace) -> Result:
    target = Path(args.hook_dir) / HOOK_NAME
    tmp = target.with_name(f".{HOOK_NAME}.tmp")
    if args.uninstall:
        existed = target.is_symlink() or target.exists()
        target.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        return {"hook": str(target), "removed": existed}
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
    r: Result = {"hook": str(target), "python": values["PYTHON"], "nvmgr": nvmgr_file}
    if was_empty:
        r["note"] = ("libvirtd looks for hooks when it starts: restart it once "
                     f"({target.parent} was empty)")
    return r


@arguments("reconcile")
def _reconcile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="domains to reconcile")
    p.add_argument("--all", action="store_true", help="every domain with nvmgr metadata")
    p.add_argument("--watch", action="store_true",
                   help="keep running: reconcile each nvmgr domain when it is defined "
                        "or stops (virt-manager, virsh edit); one line per action")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")


def _render_reconcile(r: Result) -> str:
    return "\n".join(f"{x['domain']}: {x['status']}"
                     + (f" (added {', '.join(x['added'])})" if x["added"] else "")
                     for x in r["domains"]) or "no nvmgr domains"


@command("reconcile", "bring domains changed elsewhere (virsh edit, virt-manager) back in line "
         "with their images: new sections, QEMU arguments, stateless loader",
         "nvmgr reconcile --all --watch", render=_render_reconcile)
def cmd_reconcile(args: argparse.Namespace) -> Result:
    from nvmgr.errors import NvmgrError
    from nvmgr.virt import conn as virt
    from nvmgr.virt.define import nvmgr_domains, reconcile

    if bool(args.domains) == args.all:
        raise UsageError("name DOMAINs or give --all")
    names = args.domains or nvmgr_domains(args.connect)
    results = [reconcile(n, uri=args.connect).to_json() for n in names]
    if not args.watch:
        return {"domains": results}
    print(_render_reconcile({"domains": results}), flush=True)
    # Our own define raises a DEFINED event too: remember the XML each
    # reconcile left, and skip events that bring nothing new.
    seen: dict[str, str] = {}

    def on_change(name: str) -> None:
        try:
            xml = virt.domain_xml(name, args.connect)
            if seen.get(name) == xml or (not args.all and name not in args.domains):
                return
            r = reconcile(name, uri=args.connect)
            seen[name] = virt.domain_xml(name, args.connect)
            if r.status != "not-nvmgr":
                print(_render_reconcile({"domains": [r.to_json()]}), flush=True)
        except NvmgrError as e:
            print(f"{name}: error: {e}", flush=True)

    virt.watch_domains(args.connect, on_change)
    return {"domains": results}
