"""Commands about a VM's state as a whole: backup, restore."""

from __future__ import annotations

import argparse

from nvmgr.cli.common import Result, _add_key_args, arguments, command, domain_key


@arguments("backup")
def _backup_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(image=None)  # a domain's command: never an IMAGE
    p.add_argument("--domain", metavar="NAME", required=True, help="the libvirt domain")
    p.add_argument("out", metavar="OUT", help="the backup image to create (never overwritten)")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"),
                   help="container of the backup (default: the image's own)")
    _add_key_args(p)


def _render_backup(r: Result) -> str:
    how = (f"running; guest paused {r['paused_ms']:.1f} ms" if r["paused_ms"] is not None
           else "running, paused already" if r["running"] else "stopped")
    return (f"backed up {r['domain']} ({how}) to {r['backup']}: "
            f"{len(r['sections'])} live section(s) read at one instant"
            + (f", tpm state from {', '.join(r['tpm_files'])}" if r["tpm_files"] else ""))


@command("backup", "a consistent copy of every section of a VM, running or not, as an "
         "nvmgr image (the guest is paused only while its live state is read)",
         "nvmgr backup --domain vm1 /srv/backup/vm1-$(date +%F).nvram", render=_render_backup)
def cmd_backup(args: argparse.Namespace) -> Result:
    from nvmgr.virt.backup import backup

    kek = domain_key(args, args.domain)
    return backup(args.domain, args.out, uri=args.connect, kek=kek,
                  fmt=args.format).to_json()


@arguments("restore")
def _restore_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(image=None)  # a domain's command: never an IMAGE
    p.add_argument("--domain", metavar="NAME", required=True, help="the libvirt domain (stopped)")
    p.add_argument("backup", metavar="BACKUP", help="an image made by nvmgr backup")
    p.add_argument("--section", "-s", action="append", metavar="NAME",
                   help="restore only this section (repeatable; default: all)")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (qemu:///system)")
    _add_key_args(p)


@command("restore", "put a backup's sections back into a stopped VM's image, each crash-safely",
         "nvmgr restore --domain vm1 /srv/backup/vm1-2026-12-01.nvram",
         render=lambda r: (f"restored {', '.join(r['restored']) or 'nothing'} into {r['image']}"
                           + (f"; not in the domain's image: {', '.join(r['skipped'])}"
                              if r["skipped"] else "")))
def cmd_restore(args: argparse.Namespace) -> Result:
    from nvmgr.virt.backup import restore

    kek = domain_key(args, args.domain)
    return restore(args.domain, args.backup, uri=args.connect, kek=kek,
                   sections=args.section).to_json()
