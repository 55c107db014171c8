"""Where nvmgr reads and writes on a host: every fixed path in one table.

The defaults follow a Debian host's libvirt (system daemon, ``qemu:///system``);
functions take these as default arguments so tests and other layouts can pass
their own.
"""

from __future__ import annotations

#: Where ``nvmgr define`` puts a domain's image unless told otherwise.
IMAGE_DIR = "/var/lib/libvirt/nvmgr"
#: Per-domain runtime files for QEMU (fw_cfg blobs, key files): tmpfs.
RUNTIME_ROOT = "/run/nvmgr"
#: libvirt's per-domain swtpm state directories, where the hook stages TPM state.
SWTPM_STATE_ROOT = "/var/lib/libvirt/swtpm"
#: libvirt's QEMU driver configuration (the user and group QEMU runs as).
QEMU_CONF = "/etc/libvirt/qemu.conf"
#: libvirt's persistent secret values (read by the hook, which must not call libvirt).
SECRETS_DIR = "/etc/libvirt/secrets"
#: The pid file of the daemon that runs libvirt's secret driver (libvirtd, or
#: virtsecretd with modular daemons): ephemeral secrets live in its memory only.
LIBVIRT_SECRETS_PIDFILE = "/run/libvirt/secrets/driver.pid"
#: Under :data:`RUNTIME_ROOT`: one record per vTPM secret nvmgr gave libvirt
#: (which daemon holds it, a fingerprint of its value), read by the prepare hook.
VTPM_RECORDS = "vtpm-secrets"
#: libvirt's directory of qemu hooks (libvirt >= 6.5), where nvmgr's hook goes.
HOOK_DIR = "/etc/libvirt/hooks/qemu.d"
#: The hook's name in :data:`HOOK_DIR`.
HOOK_NAME = "nvmgr"
#: The hook server's socket (``nvmgr hook-server``), root only.
HOOK_SOCKET = "/run/nvmgr/hook.sock"
#: The CLI server's socket (``nvmgr cli-server``), root only.
CLI_SOCKET = "/run/nvmgr/cli.sock"
#: One line per hook action or refusal.
HOOK_LOG = "/var/log/nvmgr/hook.log"
#: ``SOURCE-PREFIX DEST-PREFIX`` lines: image paths rewritten on incoming migration.
MIGRATE_MAP = "/etc/nvmgr/migrate.map"
#: Where ``nvmgr install-hook --service`` puts the watcher's systemd unit.
UNIT_DIR = "/etc/systemd/system"
#: The watcher's unit (``nvmgr reconcile --all --watch``), shipped in nvmgr/data.
WATCH_UNIT = "nvmgr-watch.service"
#: The hook server's unit (``nvmgr hook-server``), shipped in nvmgr/data.
HOOK_UNIT = "nvmgr-hook.service"
#: The CLI server's unit (``nvmgr cli-server``), shipped in nvmgr/data.
CLI_UNIT = "nvmgr-cli.service"
