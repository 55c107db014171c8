"""Which start of a VM owns its image: the one writer, through a live migration.

An image has one writer at any moment.  While a VM runs, the directory's
``runner`` names the start that owns it (a random run id made by ``prepare``
and the host's name); the host keeps its own run id in its runtime directory
(``/run/nvmgr/<uuid>/run``), so every later hook call on that host can tell
whether the image is still its own.

A live migration gives the image to the destination without either side
calling the other.  libvirt runs, on the destination, ``migrate`` ->
``prepare`` -> ``start`` -> ``started`` before any memory moves, and on the
source ``stopped`` -> ``release`` only after the destination resumed the
guest (about 1.8 s later here); a failed or cancelled migration gives the
destination ``stopped`` -> ``release`` and the source nothing.  So:

- ``migrate`` (destination only) leaves a note that a migration is coming
  (``/run/nvmgr/<uuid>/incoming``); the ``prepare`` that follows it finds the
  image run by the source and records itself as ``incoming``, not as the
  runner: it writes no section, collects nothing, recovers nothing;
- the source's ``release`` finds an ``incoming`` start and hands the image
  over (``runner`` := the destination); it reseals nothing (the destination's
  QEMU now writes the live sections) and collects no TPM state (the
  destination's swtpm has the newer one, from the migration stream); it only
  wipes what it staged itself;
- the destination's ``release`` while it is still only ``incoming`` means
  the migration never completed: it withdraws (``incoming`` := none), wipes
  its staged state and leaves the image -- run and written by the source --
  as it was;
- a release by the runner itself is the ordinary one: collect, reseal, and
  clear ``runner``.

Limits (libvirt tells neither side whether a migration completed; only the
order of the hooks does):

- a destination that dies mid-migration without its ``release`` (host crash,
  libvirtd killed) leaves ``incoming`` behind; the source's next ``release``
  (the VM stopped much later) then hands the image to that dead run and
  wipes its staged TPM state instead of collecting it.  The next start takes
  the image over from the dead run with the TPM state of the source's start.
  ``nvmgr info`` shows it ("migrating to host ...") while no migration
  runs; another migration of the VM replaces it;
- a destination destroyed in the second between resuming the guest and the
  source's ``release`` (before ``virsh migrate`` returns) withdraws as if the
  migration had failed: its TPM changes of that second are not collected.

A non-shared migration copies the image first (``nvmgr migrate-image``):
that copy is nobody's running image, so the destination's start takes it as
an ordinary start and the source's release stays with the source's copy.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import time
from pathlib import Path

from nvmgr.format.model import Directory, Runner
from nvmgr.image.image import Image

#: How long the ``migrate`` hook's note stays good for the ``prepare`` that
#: follows it (the two run within one migration's prepare phase).
INCOMING_NOTE_TTL = 300.0
RUN_FILE = "run"
INCOMING_FILE = "incoming"


class Role(enum.Enum):
    """What this host's run is to the image."""

    OWNER = "owner"  # runs it; its release collects and reseals
    INCOMING = "incoming"  # a migration's destination the source has not let go to yet
    NONE = "none"  # another run owns the image


def host_name() -> str:
    return (socket.gethostname() or "localhost")[:255]


def short(r: Runner | None) -> str:
    return f"run {r.run.hex()[:8]} on host {r.host}" if r else "nobody"


# ---------------------------------------------------------------- this host's notes

def note_incoming(runtime_dir: Path) -> None:
    """The ``migrate`` hook's note: an incoming migration's ``prepare`` follows."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    _write(runtime_dir / INCOMING_FILE, json.dumps({"time": time.time()}))


def take_incoming_note(runtime_dir: Path) -> bool:
    """Whether a fresh ``migrate`` note is there (it is used up either way)."""
    p = runtime_dir / INCOMING_FILE
    try:
        when = float(json.loads(p.read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    finally:
        with contextlib.suppress(OSError):
            p.unlink()
    return 0 <= time.time() - when < INCOMING_NOTE_TTL


def remember(runtime_dir: Path, me: Runner) -> None:
    """Keep this host's run id where its later hook calls find it."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    _write(runtime_dir / RUN_FILE, json.dumps({"run": me.run.hex(), "host": me.host}))


def my_run(runtime_dir: Path) -> bytes | None:
    """This host's run id for the domain, or None (an nvmgr before ownership ran it)."""
    try:
        return bytes.fromhex(json.loads((runtime_dir / RUN_FILE).read_text())["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")  # the name the hook's front end uses too
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- decisions

def is_running_elsewhere(d: Directory) -> bool:
    """Whether the directory says a VM runs on the image (a runner, or live sections
    in use, as an nvmgr before ownership marked them)."""
    return d.runner is not None or any(s.live and s.dirty for s in d.sections)


def role(d: Directory, mine: bytes | None) -> Role:
    """This host's run (*mine*, None for a run an older nvmgr prepared) to the image."""
    if d.runner is not None and d.runner.run == mine:
        return Role.OWNER
    if mine is not None and d.incoming is not None and d.incoming.run == mine:
        return Role.INCOMING
    if d.runner is None:
        return Role.OWNER  # nothing says another run has it: the run before ownership
    return Role.NONE


def claim(img: Image, runtime_dir: Path, *, incoming: bool) -> str:
    """Record a new start in the image (``prepare``): the runner, or the incoming one.

    :return: what was recorded, for the hook log.
    """
    me = Runner(os.urandom(16), host_name())
    d = img.directory
    if incoming:
        img.set_runner(d.runner, me)
        remember(runtime_dir, me)
        return f"incoming migration: {short(me)}, the image stays with {short(d.runner)}"
    took = (f" (took over from {short(d.runner)}, which never released it)"
            if d.runner is not None else "")
    img.set_runner(me, None)
    remember(runtime_dir, me)
    return f"owner {short(me)}{took}"


def let_go(img: Image, who: Role) -> str:
    """Release by a run that must not collect or reseal: hand over or withdraw.

    :return: what was done, for the hook log.
    """
    d = img.directory
    if who is Role.OWNER and d.incoming is not None:
        img.set_runner(d.incoming, None)
        return (f"live migration done: handed the image to {short(d.incoming)}; "
                "collected nothing, resealed nothing")
    if who is Role.INCOMING:
        img.set_runner(d.runner, None)
        return (f"incoming migration did not complete: the image stays with "
                f"{short(d.runner)}; collected nothing, resealed nothing")
    return f"the image belongs to {short(d.runner)}; collected nothing, resealed nothing"
