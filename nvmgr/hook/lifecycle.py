"""The libvirt qemu hook: ``hooks/qemu`` (installed as ``/etc/libvirt/hooks/qemu.d/nvmgr``).

libvirtd runs it as ``nvmgr NAME OP SUBOP EXTRA`` with the domain XML on
stdin.  Domains without nvmgr metadata are ignored.  It never calls back
into libvirt (libvirtd waits for the hook while holding the domain: a call
back deadlocks); everything it needs is in the XML, the image and files.

==============  ============================================================
prepare begin   create or grow the image to the XML's plan; verify every
                crc32 and MAC, refusing the start (exit != 0, message on
                stderr, which ``virsh start`` shows) on corruption, a missing
                or a wrong key, or (a key and a TPM) libvirt lacking the
                domain's vTPM secret; re-encrypt TPM state swtpm would find
                in plaintext; stage tpm sections into swtpm's state
                directory and fwcfg sections under /run/nvmgr; flag live
                sections in use; hand the image to the QEMU user;
                record this start as the image's runner (or, after
                ``migrate``, as the incoming one: :mod:`nvmgr.hook.ownership`)
started begin   remove runtime key files
release end     collect swtpm's state back into the image (encrypted where
                configured) and wipe the staged files; reseal the crc32 of
                live sections and clear in-use and the runner; remove
                /run/nvmgr/<uuid>.  A run that no longer owns the image (a
                migration's source) or never did (a failed migration's
                destination) hands over or withdraws and only wipes its own
                staged files
reconnect begin flag live sections in use (libvirtd restarted, VM running), if
                this host's run still owns the image
migrate begin   note the incoming migration for prepare; rewrite image paths
                through /etc/nvmgr/migrate.map and print the XML (the only
                output on stdout)
==============  ============================================================

One log line per action goes to ``/var/log/nvmgr/hook.log``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from nvmgr import paths
from nvmgr.crypto import keys
from nvmgr.crypto.cipher import Kek, unlock
from nvmgr.domain.elements import Domain
from nvmgr.domain.metadata import NvmgrMetadata
from nvmgr.domain.plan import Plan, plan_for
from nvmgr.domain.qemuargs import (
    node_name,
    slice_files,
    swtpm_tpms,
    vtpm_secret_uuid,
    wiring_problems,
)
from nvmgr.errors import (
    CorruptError,
    KeyRequiredError,
    NotFoundError,
    NotWiredError,
    NvmgrError,
    WrongKeyError,
)
from nvmgr.format.model import Binding, Section
from nvmgr.hook import ownership
from nvmgr.hook.ownership import Role
from nvmgr.image.image import Image
from nvmgr.paths import RUNTIME_ROOT
from nvmgr.provision import staging, vtpm
from nvmgr.provision.prepare import (
    check_live_encryption,
    fill_empty,
    prepare_image,
    refuse_luks,
)
from nvmgr.storage import image_exists, is_location
from nvmgr.storage.nbd import NbdLocation, is_nbd
from nvmgr.storage.rbd import RbdLocation, is_rbd

MIGRATE_MAP = paths.MIGRATE_MAP
#: The runtime file QEMU reads the LUKS passphrase from (``qemuargs.key_path``).
KEY_FILE = "image.key"
#: Seconds a hook call waits for an nvmgr command holding the image.
LOCK_WAIT = 30.0

log = logging.getLogger("nvmgr.hook.lifecycle")


@dataclasses.dataclass
class HookContext:
    """One hook call on an nvmgr domain: the call, the domain parsed once, its metadata.

    :param xml: the domain XML as libvirtd gave it (``migrate`` edits the text).
    :param image: the image the metadata names (a hook runs only for those).
    """

    name: str
    op: str
    sub: str
    xml: str
    dom: Domain
    meta: NvmgrMetadata
    image: str
    users: staging.Users
    swtpm_root: str = paths.SWTPM_STATE_ROOT
    runtime_root: str = RUNTIME_ROOT
    #: the secret driver's pid file: which libvirtd holds the ephemeral vTPM secrets
    secrets_pidfile: str = paths.LIBVIRT_SECRETS_PIDFILE

    @classmethod
    def of(cls, name: str, op: str, sub: str, xml: str, dom: Domain,
           users: staging.Users) -> HookContext | None:
        """The context for *dom*, or ``None`` when nvmgr has no image for it."""
        meta = dom.nvmgr
        if meta is None or not meta.image:
            return None
        return cls(name, op, sub, xml, dom, meta, meta.image, users)

    @property
    def uuid(self) -> str:
        return str(self.dom.uuid)

    def kek(self) -> Kek | None:
        """The image's key-encryption key from the metadata's key source.

        :raise KeyRequiredError: the key file or secret the metadata names is
            missing (the message says which, and that the key is missing).
        :raise UsageError: the key file is not 0600 or holds no key.
        """
        meta = self.meta
        try:
            if meta.key_file:
                return keys.load_key_file(meta.key_file)
            if meta.key_secret:
                # Read libvirt's own secret store: calling libvirt from a hook deadlocks.
                return keys.load_libvirt_secret_file(str(meta.key_secret))
        except NotFoundError as e:
            source = (f"key file {meta.key_file}" if meta.key_file
                      else f"libvirt secret {meta.key_secret}")
            raise KeyRequiredError(
                f"the image's key is missing: {source} named in the domain's nvmgr "
                f"metadata cannot be read ({e.message})", image=self.image) from e
        return None

    def plan(self, encrypted: bool) -> Plan:
        return plan_for(self.dom, encrypted=encrypted)


def _verify_key(img: Image, kek: Kek | None, ctx: HookContext) -> None:
    """Refuse an encrypted image without its key, or with another key.

    Checked up front, not only through the sections that hold data: an image
    whose TPM is not manufactured yet must not start with a key that could
    never write the state back at release.
    """
    if not img.directory.encrypted:
        return
    if kek is None:
        raise KeyRequiredError(
            "the image is encrypted but the domain's nvmgr metadata names no key "
            "(key-file or key-secret)", image=img.path)
    try:
        unlock(img.directory.key_slots or [], kek, image=img.path)
        img.authenticate()  # a directory QEMU forged while the VM ran: refused here
    except WrongKeyError as e:
        source = ctx.meta.key_file or f"libvirt secret {ctx.meta.key_secret}"
        raise WrongKeyError(
            f"wrong key: the key in {source} is not one of this image's keys; "
            "refusing to start", image=img.path) from e


def not_wired(name: str, problems: list[str]) -> NotWiredError:
    """The refusal of a start that would leave the domain's state to libvirt's nvram."""
    return NotWiredError(
        f"refusing to start: the domain asks for nvmgr (<nvmgr:nvram> in its metadata) "
        f"but is not wired for it: {'; '.join(problems)}. Run 'nvmgr reconcile {name}' "
        "(or keep 'nvmgr reconcile --all --watch' running) to wire it", domain=name)


def prepare(ctx: HookContext) -> str:
    refuse_luks(ctx.meta)
    kek = ctx.kek()
    plan = ctx.plan(kek is not None)
    problems = wiring_problems(ctx.dom, plan)
    if problems:  # checked before anything is created, grown or staged
        raise not_wired(ctx.name, problems)
    if kek is not None or is_rbd(ctx.image):  # a key file for QEMU ahead: tmpfs only
        staging.require_volatile(ctx.runtime_root)
    if is_nbd(ctx.image) and (sock := NbdLocation.parse(ctx.image).socket) is not None:
        # QEMU connects to the export itself, as its own user: told now, not by QEMU
        # after the TPM state was staged.
        staging.require_qemu_reaches_socket(sock, ctx.users, "the NBD server's socket")
    runtime = staging.runtime_dir(ctx.uuid, ctx.runtime_root)
    incoming_note = ownership.take_incoming_note(runtime)
    # A CLI writer holding the image for a moment must not fail the start.
    img, _created, _added = prepare_image(plan, kek=kek, fmt=ctx.meta.format or "raw",
                                          path=ctx.image, wait=LOCK_WAIT,
                                          max_image_size=ctx.meta.max_image_size)
    with img:
        _verify_key(img, kek, ctx)
        sections = img.sections()  # members opened and checked (MemberError: refused)
        _check_slices(ctx, img, sections)
        check_live_encryption(img, plan)
        phrase = _check_vtpm_secret(ctx, img) if plan.encrypted else None
        report = img.check()
        if not report.ok:
            hint = report.repair_hint()
            raise CorruptError("refusing to start: " + "; ".join(report.errors)
                               + (f". {hint[0].upper()}{hint[1:]}" if hint else ""),
                               image=img.path,
                               section=report.repairable[0] if report.repairable else None)
        # A live migration's destination: the source runs the image and
        # writes it until its release hands it over; write nothing into it.
        incoming = incoming_note and ownership.is_running_elsewhere(img.directory)
        if not incoming:  # first start: templates, state made before nvmgr, LUKS volumes
            fill_empty(img, ctx.dom, plan)
        files = _tpm_files(ctx, img)
        # release wipes the staged files once they are in the image, so files
        # still there are the TPM's newest state (a host crash, a killed
        # libvirtd, a release without its key): staging the image's older
        # copy over them would lose its last changes.
        if incoming:  # files left here are older than the source's running TPM
            staging.wipe_files(files)
            recovered = []
        else:
            recovered = _collect_tpm(img, staging.read_files(files, _capacities(img)))
        blobs = {s.name: img.get(s.name)
                 for s in staging.tpm_sections(img.sections()) if s.length and s.name in files}
        converted = []
        if phrase is not None and blobs and not incoming:
            converted = _encrypt_tpm_state(ctx, img, files, blobs, phrase)
        staged = staging.stage_files(files, blobs, ctx.users) if blobs else []
        fw = {s.name: img.get(s.name) for s in img.directory.sections
              if s.binding is Binding.FWCFG}
        if fw:
            staging.stage_runtime(ctx.uuid, fw, ctx.users, ctx.runtime_root)
        luks = [s.name for s in img.sections() if s.luks]
        if luks:
            # QEMU's secret object reads the LUKS passphrase from here; started removes it.
            staging.stage_runtime(ctx.uuid, {KEY_FILE: img.luks_passphrase()}, ctx.users,
                                  ctx.runtime_root, secret=True)
        if not incoming:
            img.set_in_use([s.name for s in img.directory.sections if s.live], True)
        owner = ownership.claim(img, runtime, incoming=incoming)
        if is_rbd(img.path):
            _stage_rbd_key(ctx)
        elif not is_location(img.path):  # an NBD export: its server's, QEMU connects
            staging.hand_to_qemu(img.path, ctx.users)
        for _m, mi in img.members():  # QEMU opens a member holding a live section too
            if not is_location(mi.path):
                staging.hand_to_qemu(mi.path, ctx.users)
        n = len(img.directory.sections)
        members = (f" and {len(img.directory.members)} member image(s)"
                   if img.directory.members else "")
        return (f"verified {n} section(s) of {img.path}{members}; "
                + (f"recovered {recovered} left staged by an earlier run; " if recovered else "")
                + (f"re-encrypted {converted} with swtpm (plaintext state made before); "
                   if converted else "")
                + f"staged tpm {staged or 'none'}, fw_cfg {sorted(fw) or 'none'}"
                + (f", the LUKS key of {luks}" if luks else "") + f"; {owner}")


def _check_slices(ctx: HookContext, img: Image, sections: list[Section]) -> None:
    """QEMU's arguments were written for where each live section is: its
    file (the image, or the member image that holds it) and offset there.

    :raise CorruptError: a live section moved (split, merged) or the
        arguments were edited: the message names the section and the fix.
    """
    expected = slice_files(ctx.dom.qemu_args)
    for s in sections:
        got = expected.get(node_name(s.name))
        if not s.live or got is None:
            continue
        want_file = img.image_path_of(s.name)
        offset, path = got
        if path is not None and not is_location(want_file) and path != want_file:
            raise CorruptError(
                f"section {s.name} is stored in {want_file}, the domain's QEMU arguments "
                f"point at {path} (split or merged since it was defined?): run "
                f"'nvmgr reconcile {ctx.name}'", image=img.path, section=s.name)
        if offset != s.offset:
            raise CorruptError(f"section {s.name} is at offset {s.offset}, the domain's "
                               f"QEMU arguments say {offset}; run 'nvmgr reconcile "
                               f"{ctx.name}'", image=img.path, section=s.name)


def _tpm_files(ctx: HookContext, img: Image) -> dict[str, Path]:
    """swtpm's state file of each of the image's tpm sections (by its own TPM's version)."""
    return staging.tpm_state_files(
        ctx.dom, [s.name for s in staging.tpm_sections(img.directory.sections)], ctx.swtpm_root)


def _collect_tpm(img: Image, found: dict[str, bytes]) -> list[str]:
    """Store staged swtpm files (by section name) in their sections where they differ."""
    collected = []
    for s in staging.tpm_sections(img.sections()):
        data = found.get(s.name)
        if data is not None and (not s.length or img.get(s.name) != data):
            img.put(s.name, data)
            collected.append(s.name)
    return collected


def _check_vtpm_secret(ctx: HookContext, img: Image) -> bytes | None:
    """The vTPM passphrase of a domain with a key and a swtpm TPM (None without
    a TPM), once libvirt is known to hold it as the secret the TPM names.

    :raise KeyRequiredError: libvirt does not have the secret (an ephemeral
        secret is gone after libvirtd restarts): the message names the fix.
    """
    if not swtpm_tpms(ctx.dom) or not img.directory.encrypted:
        return None
    phrase = img.vtpm_passphrase()
    su = str(vtpm_secret_uuid(ctx.uuid))
    problem = vtpm.secret_problem(su, phrase, runtime_root=ctx.runtime_root,
                                  pidfile=ctx.secrets_pidfile)
    if problem is not None:
        raise KeyRequiredError(
            f"refusing to start: swtpm encrypts this domain's TPM state with the libvirt "
            f"secret {su} (usage vtpm), and {problem}. Run 'nvmgr vtpm-secret --domain "
            f"{ctx.name}' (or 'nvmgr reconcile {ctx.name}') to give libvirt the secret "
            "again; keep 'nvmgr reconcile --all --watch' running (nvmgr-watch.service) to "
            "have it done after every libvirtd restart",
            image=img.path, domain=ctx.name)
    return phrase


def _encrypt_tpm_state(ctx: HookContext, img: Image, files: dict[str, Path],
                       blobs: dict[str, bytes], phrase: bytes) -> list[str]:
    """TPM state stored in plaintext (swtpm's own plaintext format, made before
    the domain had a key) re-encrypted by swtpm under the vTPM passphrase, put
    into the image (*blobs* updated), and the plaintext files staged by an
    earlier run wiped: swtpm with a key refuses plaintext state, and must not
    find it on disk either.  Each put is atomic: a crash leaves a section in
    its old or its new form, and the next prepare converts what is left."""
    plain = {n: b for n, b in blobs.items() if vtpm.blob_kind(b) == "plain"}
    if not plain:
        return []
    by_file = {files[n].name: b for n, b in plain.items()}
    version = "2.0" if all(p.name.startswith("tpm2-") for p in files.values()) else "1.2"
    done = vtpm.encrypt_state(by_file, phrase, version,
                              str(staging.runtime_dir(ctx.uuid, ctx.runtime_root)))
    for name in plain:
        data = done[files[name].name]
        img.put(name, data)
        blobs[name] = data
    staging.wipe_files({n: files[n] for n in plain})
    return sorted(plain)


def _capacities(img: Image) -> dict[str, int]:
    """The most bytes each section can take: what a staged file may hold."""
    return {s.name: s.capacity for s in img.sections()}


def _stage_rbd_key(ctx: HookContext) -> None:
    """The cephx key of an image on RBD, for QEMU's rbd driver: a runtime file (tmpfs,
    0600, the QEMU user's) that ``started`` removes; from the keyring or the libvirt
    secret (of usage type ceph, read from libvirt's store) the location names."""
    key = RbdLocation.parse(ctx.image).key()
    if key is not None:
        staging.stage_runtime(ctx.uuid, {"rbd.key": key.encode("ascii")}, ctx.users,
                              ctx.runtime_root, secret=True)


def started(ctx: HookContext) -> str:
    removed = []
    for name in (KEY_FILE, "rbd.key"):
        key = Path(staging.runtime_dir(ctx.uuid, ctx.runtime_root)) / name
        if key.exists():
            key.unlink()
            removed.append(name)
    return f"removed the runtime key file(s) {', '.join(removed)}" if removed else "nothing to do"


def release(ctx: HookContext) -> str:
    """Collect what the VM left behind; touch nothing when it never ran.

    libvirtd also runs ``release`` after a start that failed, prepare's own
    refusal included: then nothing was staged and no live section is in use,
    and the image (a corrupted one, say) must stay byte for byte as it was,
    its crc never resealed over damage QEMU did not cause.
    """
    if not image_exists(ctx.image):
        staging.remove_runtime(ctx.uuid, ctx.runtime_root)
        return f"no image at {ctx.image}; nothing to collect"
    with Image.open(ctx.image, writable=True, wait=LOCK_WAIT) as img:
        files = _tpm_files(ctx, img)
        who = ownership.role(img.directory, ownership.my_run(
            staging.runtime_dir(ctx.uuid, ctx.runtime_root)))
        if who is not Role.OWNER or img.directory.incoming is not None:
            # Another run writes the image now (a migration's destination), or
            # still (this was a migration's destination that never took over):
            # its live sections and TPM are not this run's to seal or collect.
            what = ownership.let_go(img, who)
            staging.wipe_files(files)
            staging.remove_runtime(ctx.uuid, ctx.runtime_root)
            return f"{what}; wiped this host's staged tpm state"
        found = staging.read_files(files, _capacities(img))
        in_use = [s.name for s in img.sections() if s.live and s.dirty]
        changed = img.reseal(in_use) if in_use else []
        if found:
            # Only writing state back needs the key.  Without it the staged
            # files stay where they are and the next prepare recovers them.
            img.use_key(ctx.kek())
        collected = _collect_tpm(img, found)
        staging.wipe_files(files)
        img.set_runner(None, None)
    staging.remove_runtime(ctx.uuid, ctx.runtime_root)
    return (f"collected {collected or 'nothing'}; resealed {in_use or 'nothing'}; "
            f"live sections changed: {changed or 'none'}")


def reconnect(ctx: HookContext) -> str:
    """Flag live sections in use again; never fail (libvirtd would kill the running VM)."""
    try:
        with Image.open(ctx.image, writable=True, wait=LOCK_WAIT) as img:
            d = img.directory
            mine = ownership.my_run(staging.runtime_dir(ctx.uuid, ctx.runtime_root))
            if ownership.role(d, mine) is not Role.OWNER:
                return (f"the image belongs to {ownership.short(d.runner)}; "
                        "its in-use marks are that run's")
            live = [s.name for s in d.sections if s.live]
            img.set_in_use(live, True)
    except NvmgrError as e:
        return f"could not mark live sections in use ({e}); the VM keeps running"
    return f"live sections {live or 'none'} marked in use"


def load_path_map(path: str = MIGRATE_MAP) -> list[tuple[str, str]]:
    """``SOURCE-PREFIX DEST-PREFIX`` per line; ``#`` comments."""
    pairs = []
    try:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                src, _, dst = line.partition(" ")
                pairs.append((src.strip(), dst.strip()))
    except FileNotFoundError:
        pass
    return pairs


def migrate(ctx: HookContext, out: TextIO) -> str:
    """An incoming live migration (libvirt runs this on the destination only):
    note it for the ``prepare`` that follows, rewrite the image's path."""
    ownership.note_incoming(staging.runtime_dir(ctx.uuid, ctx.runtime_root))
    pairs = load_path_map()
    image = ctx.image
    for src, dst in pairs:
        if image.startswith(src):
            new = dst + image[len(src):]
            xml = ctx.xml.replace(image, new)
            out.write(xml)
            return f"image path {image} -> {new}"
    return "no path map entry; XML unchanged"


ACTIONS: dict[tuple[str, str], Callable[[HookContext], str]] = {
    ("prepare", "begin"): prepare,
    ("started", "begin"): started,
    ("release", "end"): release,
    ("reconnect", "begin"): reconnect,
}


