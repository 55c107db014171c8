"""Commands for moving a VM between hosts: migrate-image."""

from __future__ import annotations

import argparse

from nvmgr.cli.common import Result, _add_image, arguments, command, resolve_image


@arguments("migrate-image")
def _migrate_image_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("target", metavar="OUTPUT",
                   help="the copy to create, where the destination host reads it "
                        "(never overwritten)")


def _render(r: Result) -> str:
    runner = r["runner"]
    return (f"copied {r['image']} to {r['output']} ({r['format']}); "
            + (f"the VM runs on host {runner['host']}: " if runner else "")
            + "migrate it now (virsh migrate --live ...); the migration stream brings "
            "the live state to the copy, and this host's image is stale afterwards")


@command("migrate-image", "copy a VM's image for a live migration without shared storage: "
         "run it before virsh migrate; the copy is the destination's own image",
         "nvmgr migrate-image --domain vm1 /mnt/dst-host/nvmgr/vm1.nvram", render=_render)
def cmd_migrate_image(args: argparse.Namespace) -> Result:
    from nvmgr.image.handoff import copy_for_migration

    return copy_for_migration(resolve_image(args), args.target)
