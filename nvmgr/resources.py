"""The files nvmgr ships inside its package, found with :mod:`importlib.resources`.

``nvmgr/data/`` holds the directory's ASN.1 module, the metadata's RelaxNG
schema and the libvirt hook's sh front end (in a checkout they are symlinks
to ``schemas/`` and ``hooks/``, whose content the build copies into the
wheel), and the man page and bash completion that :mod:`nvmgr.cli.manpage`
generates.  A missing one is a broken installation, reported as
:class:`~nvmgr.errors.InstallationError` (exit 11), never as a mistake of
the user's.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from nvmgr.errors import InstallationError

#: The directory's specification (module NVMGR-Directory-2026).
ASN1_MODULE = "nvmgr.asn1"
#: The RelaxNG schema of ``<nvmgr:nvram>`` domain metadata.
METADATA_SCHEMA = "nvmgr-metadata.rng"
#: The libvirt qemu hook's sh front end, installed by ``nvmgr install-hook``.
HOOK_FRONTEND = "hook-qemu"
#: The watcher's systemd unit, installed by ``nvmgr install-hook --service``.
WATCH_UNIT = "nvmgr-watch.service"
#: The hook server's systemd unit (``nvmgr hook-server``).
HOOK_UNIT = "nvmgr-hook.service"
#: The CLI server's systemd unit (``nvmgr cli-server``).
CLI_UNIT = "nvmgr-cli.service"
#: The manual page nvmgr(1), generated from the argument parser (committed;
#: also installed as share/man/man1/nvmgr.1).
MAN_PAGE = "nvmgr.1"
#: The bash completion, generated from the argument parser (committed; also
#: installed as share/bash-completion/completions/nvmgr.bash).
BASH_COMPLETION = "nvmgr.bash"


def data_path(name: str) -> Path:
    """The file system path of the shipped file *name*.

    :raise InstallationError: the file is not there.
    """
    try:
        ref = resources.files("nvmgr.data") / name
    except ModuleNotFoundError as e:  # nvmgr/data itself is missing
        raise InstallationError(
            f"nvmgr is installed without its data files (nvmgr/data: {e}); reinstall nvmgr"
        ) from e
    path = Path(str(ref))
    if not path.is_file():
        raise InstallationError(
            f"nvmgr is installed without {name} (looked for {path}); reinstall nvmgr")
    return path


def read_text(name: str) -> str:
    """The text of the shipped file *name* (:func:`data_path`'s errors)."""
    path = data_path(name)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise InstallationError(f"cannot read {path}, shipped with nvmgr: {e.strerror}") from e
