"""Images in Ceph RBD, through QEMU's own ``rbd`` driver (librbd).

A location is spelled the way ``qemu-img`` spells it::

    rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER][:keyring=FILE]

The image holds nvmgr's layout directly (raw).  :class:`RbdContainer` reads and
writes it like a qcow2 container: a private ``qemu-storage-daemon`` opens an
``rbd`` node (with a ``raw`` node on top) and exports it as one regular file
through FUSE; nvmgr uses that file with the raw-file code.  nvmgr never talks
to Ceph itself.

The cephx key: with ``keyring=FILE`` the key is read from that keyring and
handed to the daemon as a ``secret`` object through a pipe (never in argv,
the environment or a file); without it, librbd finds the key the way every
Ceph client does (the ``keyring`` setting of the conf file).

Locking: nvmgr writers on one host exclude each other with ``flock`` on a
lock file per image under :func:`lock_dir` (an RBD image has no local file to
lock).  Across hosts, a running VM's QEMU holds RBD's exclusive lock; nvmgr's
own in-use mark (set by the prepare hook) refuses writes to its live sections.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nvmgr import paths
from nvmgr.errors import BusyError, ExternalError, NotFoundError, UsageError
from nvmgr.storage import qemu
from nvmgr.storage.fuse import FuseExport
from nvmgr.storage.network import LocationContainer, lock_location
from nvmgr.storage.qcow2 import _check_size, check_snapshot_name

log = logging.getLogger(__name__)

PREFIX = "rbd:"

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}"
_LOCATION = re.compile(rf"rbd:(?P<pool>{_NAME})/(?P<image>{_NAME})(?:@(?P<snap>{_NAME}))?"
                       r"(?P<opts>(?::[a-z_]+=(?:[^:\\\0]|\\[:\\])+)*)")
#: Options of a location: qemu-img's own, and nvmgr's key sources (never handed to QEMU).
_OPTIONS = ("conf", "id", "keyring", "mon_host", "secret", "secret_usage")
_KEY_SOURCES = ("keyring", "secret", "secret_usage")
_HOST = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                   r"(?::(?P<port>[0-9]{1,5}))?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_USAGE = re.compile(r"[^\0\n:\\]{1,256}")
USAGE_HINT = ("rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER][:mon_host=HOST\\:PORT]"
              "[:keyring=FILE|:secret=UUID|:secret_usage=NAME]")


def is_rbd(location: str) -> bool:
    return isinstance(location, str) and location.startswith(PREFIX)


def _split_options(text: str) -> list[str]:
    """``:a=1:b=x\\:y`` -> ``["a=1", "b=x:y"]`` (qemu-img's ``\\:`` escape)."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += text[i + 1]
            i += 2
            continue
        if c == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return [p for p in parts if p]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def parse_hosts(text: str, *, what: str) -> tuple[tuple[str, int | None], ...]:
    """``HOST[:PORT]`` items separated by ``;`` or ``,``: the monitors to ask.

    :raise UsageError: a bad host or port (*what* names the location).
    """
    hosts: list[tuple[str, int | None]] = []
    for item in re.split(r"[;,]", text):
        m = _HOST.fullmatch(item.strip())
        port = int(m["port"]) if m and m["port"] else None
        if m is None or (port is not None and not 0 < port < 65536):
            raise UsageError(f"bad RBD location {what!r}: monitor {item!r} is not "
                             "HOST or HOST:PORT")
        hosts.append((m["host"], port))
    if not hosts:
        raise UsageError(f"bad RBD location {what!r}: mon_host names no monitor")
    return tuple(hosts)


@dataclass(frozen=True)
class RbdLocation:
    """A parsed ``rbd:`` location.

    The cephx key comes from at most one of: ``keyring`` (a Ceph keyring file),
    ``secret`` (the UUID of a libvirt secret of usage type ceph) or
    ``secret_usage`` (such a secret's usage name); without any, librbd finds it
    the way every Ceph client does.  ``hosts`` are the monitors (``mon_host``);
    without them, the conf file names them.
    """

    pool: str
    image: str
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    keyring: str | None = None
    hosts: tuple[tuple[str, int | None], ...] = ()
    secret: str | None = None
    secret_usage: str | None = None

    @classmethod
    def parse(cls, location: str) -> RbdLocation:
        """:raise UsageError: not ``rbd:POOL/IMAGE[@SNAP][:OPTION=VALUE]...``, an
        unknown or repeated option, a relative path, a bad monitor, secret UUID or
        usage name, or more than one key source."""
        m = _LOCATION.fullmatch(location)
        if m is None:
            raise UsageError(f"bad RBD location {location!r}: expected {USAGE_HINT}")
        opts: dict[str, str] = {}
        for part in _split_options(m["opts"]):
            key, _, value = part.partition("=")
            if key not in _OPTIONS or key in opts:
                raise UsageError(f"bad RBD location {location!r}: option {key!r} "
                                 f"(known once each: {', '.join(_OPTIONS)})")
            if key in ("conf", "keyring") and not os.path.isabs(value):
                raise UsageError(f"bad RBD location {location!r}: {key} must be an absolute path")
            if key == "secret" and not _UUID.fullmatch(value):
                raise UsageError(f"bad RBD location {location!r}: secret={value!r} is not "
                                 "the UUID of a libvirt secret")
            if key == "secret_usage" and not _USAGE.fullmatch(value):
                raise UsageError(f"bad RBD location {location!r}: secret_usage={value!r} is "
                                 "not a libvirt secret's usage name")
            opts[key] = value
        sources = [k for k in _KEY_SOURCES if k in opts]
        if len(sources) > 1:
            raise UsageError(f"bad RBD location {location!r}: the key comes from one of "
                             f"{', '.join(_KEY_SOURCES)}, not {' and '.join(sources)}")
        hosts = parse_hosts(opts["mon_host"], what=location) if "mon_host" in opts else ()
        return cls(m["pool"], m["image"], m["snap"], opts.get("conf"), opts.get("id"),
                   opts.get("keyring"), hosts, opts.get("secret"), opts.get("secret_usage"))

    def spec(self) -> str:
        """The location as nvmgr spells it (parses back to the same)."""
        s = f"rbd:{self.pool}/{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")
        for key, value in (("conf", self.conf), ("id", self.user),
                           ("mon_host", self._mon_host()), ("keyring", self.keyring),
                           ("secret", self.secret), ("secret_usage", self.secret_usage)):
            if value:
                s += f":{key}={_escape(value)}"
        return s

    def _mon_host(self) -> str | None:
        if not self.hosts:
            return None
        return ";".join(h if p is None else f"{h}:{p}" for h, p in self.hosts)

    def qemu_filename(self) -> str:
        """The legacy filename ``qemu-img`` takes (key material never in it; a key
        from a libvirt secret goes to QEMU as a secret object, see :func:`key`)."""
        s = f"rbd:{self.pool}/{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")
        for key, value in (("conf", self.conf), ("id", self.user),
                           ("mon_host", self._mon_host()), ("keyring", self.keyring)):
            if value:
                s += f":{key}={_escape(value)}"
        return s

    @property
    def has_key_source(self) -> bool:
        """nvmgr hands QEMU the key (from a keyring or a libvirt secret)."""
        return bool(self.keyring or self.secret or self.secret_usage)

    def key(self, secrets_dir: str | None = None) -> str | None:
        """The base64 cephx key from the location's key source (``None``: librbd's own).

        :raise NotFoundError: no such keyring, secret or key in it.
        :raise UsageError: the secret is not of usage type ceph, or unreadable.
        """
        if self.keyring:
            return read_keyring_key(self.keyring, self.user)
        if self.secret or self.secret_usage:
            return libvirt_ceph_key(uuid=self.secret, usage=self.secret_usage,
                                    secrets_dir=secrets_dir)
        return None

    def node(self) -> dict[str, object]:
        """The ``rbd`` blockdev node (without a key)."""
        n: dict[str, object] = {"driver": "rbd", "pool": self.pool, "image": self.image}
        if self.snapshot:
            n["snapshot"] = self.snapshot
        if self.conf:
            n["conf"] = self.conf
        if self.user:
            n["user"] = self.user
        if self.hosts:
            n["server"] = [{"host": h.strip("[]"), "port": str(p or 6789)}
                           for h, p in self.hosts]
        return n


def read_keyring_key(path: str, user: str | None) -> str:
    """The base64 key of ``client.USER`` (or the only entry) in a Ceph keyring file.

    :raise NotFoundError: no such file, or no key for that user in it.
    """
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - small file
    except FileNotFoundError as e:
        raise NotFoundError(f"no such keyring: {path}") from e
    except OSError as e:
        raise UsageError(f"cannot read keyring {path}: {e.strerror or e}") from e
    want = f"client.{user}" if user else None
    section = None
    keys: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section and line.partition("=")[0].strip() == "key":
            keys[section] = line.partition("=")[2].strip()
    if want in keys:
        return keys[want]
    if want is None and len(keys) == 1:
        return next(iter(keys.values()))
    raise NotFoundError(f"keyring {path} has no key for {want or 'a single user'}")


#: Bytes read at most from a file of libvirt's secret store.
_MAX_SECRET_FILE = 64 << 10


def _read_small(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_MAX_SECRET_FILE)


def _secret_usage(path: str) -> tuple[str | None, str | None, str | None]:
    """(uuid, usage type, usage name) of a libvirt secret definition file."""
    # libvirtd writes these files (root's, 0600): no entities, small; read with
    # the standard library's parser (no DTDs are loaded by it).
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(_read_small(path))
    except ElementTree.ParseError as e:
        raise UsageError(f"libvirt secret file {path} is not XML ({e})") from e
    usage = root.find("usage")
    return (root.findtext("uuid"), usage.get("type") if usage is not None else None,
            usage.findtext("name") if usage is not None else None)


def libvirt_ceph_key(*, uuid: str | None = None, usage: str | None = None,
                     secrets_dir: str | None = None) -> str:
    """The cephx key in a libvirt secret of usage type ceph, read from libvirt's
    own secret store (a hook must never call libvirt).

    libvirt keeps a defined, non-ephemeral secret's value base64-encoded in
    ``DIR/UUID.base64`` and its definition in ``DIR/UUID.xml``.  A ceph secret's
    value is the key's bytes (``virsh secret-set-value UUID KEY`` decodes the
    base64 key), so the file holds the key as Ceph spells it.

    :param uuid: the secret's UUID; or
    :param usage: its usage name (``<usage type='ceph'><name>``).
    :param secrets_dir: libvirt's store (:data:`nvmgr.paths.SECRETS_DIR`, read
        when called, so a test or another layout may change it).
    :raise NotFoundError: no such secret, or it has no value (ephemeral).
    :raise UsageError: the secret is not of usage type ceph, or its value is not base64.
    """
    secrets_dir = secrets_dir or paths.SECRETS_DIR
    uuid = uuid.lower() if uuid else None
    what = f"libvirt secret {uuid or usage!r}"
    try:
        if uuid is None:
            found = None
            for name in sorted(os.listdir(secrets_dir)):
                if name.endswith(".xml"):
                    u, kind, uname = _secret_usage(os.path.join(secrets_dir, name))
                    if kind == "ceph" and uname == usage:
                        found = u or name[:-4]
                        break
            if found is None:
                raise NotFoundError(f"no libvirt secret of usage type ceph named {usage!r} "
                                    f"in {secrets_dir}")
            uuid = found
        what = f"libvirt secret {uuid}" + (f" ({usage!r})" if usage else "")
        try:
            _u, kind, _n = _secret_usage(os.path.join(secrets_dir, f"{uuid}.xml"))
        except FileNotFoundError as e:
            raise NotFoundError(f"{what} is not defined (no {secrets_dir}/{uuid}.xml)") from e
        if kind != "ceph":
            raise UsageError(f"{what} is of usage type {kind or 'none'}, not ceph")
        try:
            data = _read_small(os.path.join(secrets_dir, f"{uuid}.base64")).strip()
        except FileNotFoundError as e:
            raise NotFoundError(f"{what} has no value (ephemeral, or never set: "
                                f"virsh secret-set-value {uuid} KEY)") from e
    except OSError as e:
        if isinstance(e, FileNotFoundError) and uuid is None:
            raise NotFoundError(f"no libvirt secret store at {secrets_dir}") from e
        raise UsageError(f"cannot read libvirt's secret store {secrets_dir}: "
                         f"{e.strerror or e}") from e
    try:
        key = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"the value of {what} is not base64") from e
    if len(key) < 16:
        raise UsageError(f"the value of {what} is {len(key)} bytes, too short for a cephx key")
    return data.decode("ascii")


KEY_ID = "nvmgr-rbd-key"


def _opts_value(value: str) -> str:
    """A value in QEMU's ``key=value,...`` options: commas doubled."""
    return value.replace(",", ",,")


def image_opts(loc: RbdLocation, key_id: str | None) -> str:
    """``--image-opts`` for the raw image on *loc* (the key as secret *key_id*)."""
    pairs: list[tuple[str, str]] = [("driver", "rbd"), ("pool", loc.pool), ("image", loc.image)]
    for name, value in (("snapshot", loc.snapshot), ("conf", loc.conf), ("user", loc.user),
                        ("key-secret", key_id)):
        if value:
            pairs.append((name, value))
    for i, (host, port) in enumerate(loc.hosts):
        pairs += [(f"server.{i}.host", host.strip("[]")), (f"server.{i}.port", str(port or 6789))]
    return ",".join(["driver=raw", *(f"file.{k}={_opts_value(v)}" for k, v in pairs)])


@contextlib.contextmanager
def key_pipe(loc: RbdLocation) -> Iterator[int | None]:
    """A pipe's read end holding the location's key (``None``: librbd finds it).

    The key never touches argv, the environment or a file: QEMU reads it as
    ``secret,format=base64,file=/dev/fd/N``.
    """
    key = loc.key()
    if key is None:
        yield None
        return
    r, w = os.pipe()
    try:
        os.write(w, key.encode("ascii"))
        os.close(w)
        w = -1
        os.set_inheritable(r, True)
        yield r
    finally:
        for fd in (r, w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _secret_object(fd: int) -> list[str]:
    return ["--object", f"secret,id={KEY_ID},format=base64,file=/dev/fd/{fd}"]


def _img(loc: RbdLocation, args: list[str], what: str, location: str, *,
         check: bool = True, raw: bool = True) -> qemu.Result:
    """``qemu-img ARGS... IMAGE``: the image as ``--image-opts`` with the key as a
    secret object when nvmgr has it from a libvirt secret; else the legacy
    filename (librbd reads a keyring itself), ``-f raw`` where *raw* (``qemu-img
    snapshot`` has no ``-f``: it probes the image as raw)."""
    with key_pipe(loc) if (loc.secret or loc.secret_usage) else contextlib.nullcontext() as fd:
        if fd is None:
            argv = [*args, *(["-f", "raw"] if raw else []), loc.qemu_filename()]
        else:
            argv = [args[0], *_secret_object(fd), *args[1:], "--image-opts",
                    image_opts(loc, KEY_ID)]
        res = qemu.run(qemu.QEMU_IMG, argv, image=location, pass_fds=() if fd is None else (fd,))
    return qemu.check(res, what, image=location) if check else res


def copy_out(location: str, dst: str, dst_fmt: str, *, force_share: bool = False) -> None:
    """``qemu-img convert`` the RBD image (raw) into the new file *dst* (mode 0600) in
    *dst_fmt*; with a key from a libvirt secret, the image as ``--image-opts`` and
    the key as a secret object read from a pipe.  A partial *dst* is removed.

    :param force_share: ``-U``: read while a running VM has the image open.
    :raise ExternalError: qemu-img failed (the cluster, the key, the image).
    """
    loc = RbdLocation.parse(location)
    if not (loc.secret or loc.secret_usage):
        qemu.img_convert(loc.qemu_filename(), "raw", dst, dst_fmt, force_share=force_share)
        return
    with key_pipe(loc) as fd:
        if fd is None:  # a libvirt secret always gives a key
            raise NotFoundError(f"no cephx key for {location}", image=location)
        old = os.umask(0o077)
        try:
            res = qemu.run(qemu.QEMU_IMG, [
                "convert", "-q", *_secret_object(fd), *(["-U"] if force_share else []),
                "--image-opts", image_opts(loc, KEY_ID), "-O", dst_fmt, os.path.abspath(dst)],
                image=location, pass_fds=(fd,))
        finally:
            os.umask(old)
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
    qemu.check(res, "qemu-img convert", image=location)


def rbd_exists(location: str) -> bool:
    """Whether the RBD image exists (``qemu-img info`` through librbd).

    :raise ExternalError: the cluster cannot be asked.
    """
    loc = RbdLocation.parse(location)
    res = _img(loc, ["info", "-U"], "qemu-img info", location, check=False)
    if res.returncode != 0 and "No such file or directory" in res.stderr:
        return False
    qemu.check(res, "qemu-img info", image=location)
    return True


def _info(loc: RbdLocation, location: str) -> dict[str, Any]:
    import json

    out = _img(loc, ["info", "--output=json", "-U"], "qemu-img info", location).stdout
    try:
        info = json.loads(out)
    except ValueError as e:
        raise ExternalError("qemu-img info printed bad JSON", detail=str(e),
                            image=location) from e
    return info if isinstance(info, dict) else {}


# ---------------------------------------------------------------- who holds the image

#: Seconds the ``rbd`` tool may spend reaching the cluster (Ceph's default is 300).
CLI_TIMEOUT = 20


def _cli_args(loc: RbdLocation, key_fd: int | None) -> list[str]:
    """The ``rbd`` tool's options for the cluster and user of *loc* (the key, when
    nvmgr has it, as ``--keyfile`` of a memory file: never argv or a file on disk)."""
    args = [f"--client_mount_timeout={CLI_TIMEOUT}", f"--rados_mon_op_timeout={CLI_TIMEOUT}",
            f"--rados_osd_op_timeout={CLI_TIMEOUT}"]
    if loc.conf:
        args += ["--conf", loc.conf]
    if loc.user:
        args += ["--id", loc.user]
    if loc.hosts:
        args += ["--mon_host", loc._mon_host() or ""]
    if key_fd is not None:
        args += ["--keyfile", f"/dev/fd/{key_fd}"]
    return args


def _cli_json(loc: RbdLocation, key_fd: int | None, args: list[str], location: str) -> Any:
    import json

    spec = f"{loc.pool}/{loc.image}"
    res = qemu.run(qemu.RBD, [*_cli_args(loc, key_fd), *args, spec, "--format", "json"],
                   image=location, pass_fds=() if key_fd is None else (key_fd,))
    if res.returncode != 0 and "No such file or directory" in res.stderr:
        return None
    qemu.check(res, f"rbd {' '.join(args)}", image=location)
    try:
        return json.loads(res.stdout)
    except ValueError as e:
        raise ExternalError(f"rbd {' '.join(args)} printed bad JSON", detail=str(e),
                            image=location) from e


def lock_holders(location: str, *, opened_by_us: bool = False) -> list[str]:
    """The live Ceph clients that hold the RBD image's exclusive lock: a running
    QEMU (librbd takes the lock at its first write and keeps it while the image is
    open), or another client that wrote it and still has it open.

    A lock counts when its owner still watches the image (``rbd status``): a client
    killed without closing leaves a lock behind until its watch times out, and
    librbd breaks such a lock at the next acquisition.

    The lock is cooperative: librbd hands it to any other writer that asks, and
    takes it back at its next write.  So once nvmgr's own export has written the
    image (*opened_by_us*), the lock may be nvmgr's own: then any other client
    that has the image open counts (a watcher besides nvmgr's).

    :return: one description per holder (``client.N at ADDRESS``); empty when none
        (or the image does not exist).
    :raise ExternalError: the ``rbd`` tool (ceph-common) is missing or failed.
    """
    loc = RbdLocation.parse(location)
    key = loc.key()
    fd = qemu.memfd("rbd-key", key.encode("ascii")) if key is not None else None
    try:
        lockers = _cli_json(loc, fd, ["lock", "ls"], location) or []
        auto = [x for x in lockers if isinstance(x, dict)
                and str(x.get("id", "")).startswith("auto ")]
        if not auto:
            return []
        status = _cli_json(loc, fd, ["status"], location) or {}
    finally:
        if fd is not None:
            os.close(fd)
    watchers = [w for w in status.get("watchers", []) if isinstance(w, dict)]
    if opened_by_us:
        if len(watchers) <= 1:  # nvmgr's own export only
            return []
        return [f"client.{w.get('client')} at {w.get('address')} (has it open)"
                for w in watchers]
    seen = {str(w.get("address")) for w in watchers}
    return [f"{x.get('locker')} at {x.get('address')}" for x in auto
            if str(x.get("address")) in seen]


def rename(location: str, image: str) -> str:
    """Rename the RBD image of *location* to *image* in the same pool (``rbd rename``:
    Ceph renames it in place, its snapshots with it); never over an existing image.

    :return: the new location (the same options).
    :raise UsageError: a bad name, or *image* exists.
    :raise ExternalError: the ``rbd`` tool is missing or failed.
    """
    loc = RbdLocation.parse(location)
    new = dataclasses.replace(loc, image=image, snapshot=None)
    spec = new.spec()
    RbdLocation.parse(spec)  # a bad name: UsageError
    key = loc.key()
    fd = qemu.memfd("rbd-key", key.encode("ascii")) if key is not None else None
    try:
        res = qemu.run(qemu.RBD, [*_cli_args(loc, fd), "rename", f"{loc.pool}/{loc.image}",
                                  f"{loc.pool}/{image}"],
                       image=location, pass_fds=() if fd is None else (fd,))
    finally:
        if fd is not None:
            os.close(fd)
    if res.returncode != 0 and "exists" in res.stderr.lower():
        raise UsageError(f"RBD image {image} exists in pool {loc.pool}", image=location)
    qemu.check(res, "rbd rename", image=location)
    return spec


def _watchers(loc: RbdLocation, key_fd: int | None, location: str) -> list[str]:
    """The clients that have the image open (``rbd status``).

    :raise NotFoundError: no such image.
    """
    status = _cli_json(loc, key_fd, ["status"], location)
    if status is None:
        raise NotFoundError(f"no RBD image {loc.image} in pool {loc.pool}", image=location)
    return [f"client.{w.get('client')} at {w.get('address')}"
            for w in status.get("watchers", []) if isinstance(w, dict)]


def require_unopened(location: str) -> None:
    """Refuse an RBD image that a client has open (a running VM, an nvmgr on
    another host): what :func:`remove` checks first, for a caller that must know
    before it changes anything else.

    :raise NotFoundError: no such image.
    :raise BusyError: a client has it open.
    :raise ExternalError: the ``rbd`` tool is missing or failed.
    """
    loc = RbdLocation.parse(location)
    key = loc.key()
    fd = qemu.memfd("rbd-key", key.encode("ascii")) if key is not None else None
    try:
        who = _watchers(loc, fd, location)
    finally:
        if fd is not None:
            os.close(fd)
    if who:
        raise BusyError(f"the RBD image is open: {', '.join(who)}; stop the VM (or the "
                        "other host's nvmgr) first", image=location)


def remove(location: str, *, wait: float = 0) -> None:
    """Remove the RBD image of *location* with its RBD snapshots (``rbd snap purge``,
    then ``rbd rm``), holding nvmgr's own lock on it: what ``rm`` is to an image file.

    Refused while any client has the image open (a running VM, an nvmgr on another
    host): Ceph lists it as a watcher (``rbd status``), and nothing is removed.

    :raise UsageError: a bad location, or one naming a snapshot.
    :raise NotFoundError: no such image (or pool).
    :raise BusyError: another nvmgr on this host holds it, or a client has it open.
    :raise ExternalError: the ``rbd`` tool is missing or failed.
    """
    loc = RbdLocation.parse(location)
    if loc.snapshot:
        raise UsageError(f"{location} names a snapshot: remove the image, not @{loc.snapshot}",
                         image=location)
    lock = _lock(loc, writable=True, wait=wait, location=location)
    key = loc.key()
    fd = qemu.memfd("rbd-key", key.encode("ascii")) if key is not None else None
    try:
        who = _watchers(loc, fd, location)
        if who:
            raise BusyError(f"the RBD image is open: {', '.join(who)}; stop the VM (or the "
                            "other host's nvmgr) first", image=location)
        spec = f"{loc.pool}/{loc.image}"
        for args, what in ((["snap", "purge", spec], "rbd snap purge"),
                           (["rm", "--no-progress", spec], "rbd rm")):
            res = qemu.run(qemu.RBD, [*_cli_args(loc, fd), *args], image=location,
                           pass_fds=() if fd is None else (fd,))
            if res.returncode != 0 and "watchers" in res.stderr:
                raise BusyError(f"the RBD image is open ({what}: {res.stderr.strip()})",
                                image=location)
            qemu.check(res, what, image=location)
    finally:
        if fd is not None:
            os.close(fd)
        os.close(lock)


def lock_dir() -> str:
    """Where nvmgr's per-image lock files for RBD images live on this host."""
    return f"/run/lock/nvmgr-rbd-{os.getuid()}"


def _lock(loc: RbdLocation, *, writable: bool, wait: float, location: str) -> int:
    return lock_location(lock_dir(), f"{loc.pool}%{loc.image}", writable=writable, wait=wait,
                         location=location)


def _create(loc: RbdLocation, size: int, path: str) -> qemu.Result:
    """``qemu-img create`` of the raw RBD image (the key as a secret object when
    nvmgr has it from a libvirt secret: ``-o password-secret``)."""
    with key_pipe(loc) if (loc.secret or loc.secret_usage) else contextlib.nullcontext() as fd:
        extra = [] if fd is None else [*_secret_object(fd), "-o", f"password-secret={KEY_ID}"]
        return qemu.run(qemu.QEMU_IMG, ["create", "-q", "-f", "raw", *extra,
                                        loc.qemu_filename(), str(size)], image=path,
                        pass_fds=() if fd is None else (fd,))


#: Bytes of a large first write that go out (and are flushed) alone, taking librbd's
#: cache out of its writethrough start (:meth:`RbdContainer.write`).
WRITEBACK_SPLIT = 64 << 10
#: Writes larger than this are split: more than one FUSE request (1 MiB, libfuse's
#: largest), which would otherwise wait for the OSDs one after the other.  A smaller
#: write is one request either way: splitting it would only add a flush.
WRITEBACK_FROM = 1 << 20


class RbdContainer(LocationContainer):
    """An nvmgr image in an RBD image, through a private ``qemu-storage-daemon``.

    :param path: the ``rbd:`` location.
    :raise UsageError: a bad location.
    :raise NotFoundError: no such RBD image (or pool, or keyring).
    :raise BusyError: another nvmgr on this host holds it.
    :raise ExternalError: librbd (through the daemon) failed: the cluster is
        unreachable, the user has no rights, ...
    """

    fmt = "rbd"
    location: RbdLocation

    @staticmethod
    def _parse(path: str) -> RbdLocation:
        return RbdLocation.parse(path)

    @classmethod
    def _lock(cls, path: str, *, writable: bool, wait: float) -> int:
        return _lock(RbdLocation.parse(path), writable=writable, wait=wait, location=path)

    #: Whether this container's export has written the image (its own lock, then).
    _wrote = False
    #: Whether a flush followed a write: librbd's cache has left its writethrough start.
    _writeback = False
    #: :meth:`running_holder`'s answer, asked once per container.
    _holder: str | None = None
    _asked = False

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write *data* at *offset* (as :meth:`Qcow2Container.write`).

        librbd's cache writes through until the image's first flush
        (``rbd_cache_writethrough_until_flush``): until then every FUSE request
        (1 MiB at most) waits for the OSDs, one after the other.  So a write of
        more than :data:`WRITEBACK_FROM` bytes before any flush is split: its
        first :data:`WRITEBACK_SPLIT` bytes are written and flushed (QEMU skips a
        flush that follows no write: the write comes first), then the rest goes
        through the cache with many requests in flight, durable at the caller's
        own flush as before.  Both parts are ordinary writes and the flush an
        ordinary flush (the fault hook sees each); a crash between them leaves
        the inactive copy half written, as a crash inside one write would.
        """
        self._wrote = True
        view = memoryview(data).cast("B")
        if self._writeback or view.nbytes <= WRITEBACK_FROM:
            super().write(offset, view)
            return
        super().write(offset, view[:WRITEBACK_SPLIT])
        self.flush()
        super().write(offset + WRITEBACK_SPLIT, view[WRITEBACK_SPLIT:])

    def flush(self) -> None:
        super().flush()
        if self._wrote:
            self._writeback = True

    def resize(self, size: int) -> None:
        self._wrote = True
        super().resize(size)

    def running_holder(self) -> str | None:
        """Who holds the RBD image for a running VM: RBD's exclusive lock, held by a
        live client other than nvmgr (:func:`lock_holders`); asked once.  Without
        the ``rbd`` tool (ceph-common) nvmgr cannot ask: it says so in its log and
        the in-use mark alone refuses the writes (as on a file QEMU does not lock).
        """
        if not self._asked:
            try:
                who = lock_holders(self.path, opened_by_us=self._wrote)
            except ExternalError as e:
                if shutil.which(qemu.RBD) is not None:
                    raise
                log.warning("%s: cannot tell whether a running VM holds the image: %s",
                            self.path, e)
                who = []
            self._holder = ("RBD's exclusive lock: " + ", ".join(who)) if who else None
            self._asked = True
        return self._holder

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> RbdContainer:
        """Create a new RBD image of *size* bytes and open it writable.

        :raise UsageError: the image exists, or a bad size.
        """
        loc = RbdLocation.parse(path)
        _check_size(size, path)
        fd = _lock(loc, writable=True, wait=wait, location=path)
        try:
            res = _create(loc, size, path)
            if res.returncode != 0 and "exists" in res.stderr.lower():
                raise UsageError(f"RBD image {loc.image} exists in pool {loc.pool} (nvmgr "
                                 "never overwrites an image)", image=path)
            qemu.check(res, "qemu-img create", image=path)
        finally:
            os.close(fd)
        return cls(path, writable=True, wait=wait)

    def _open_locked(self) -> None:
        loc = self.location
        node = loc.node()
        objects: list[str] = []
        fds: list[int] = [self._lock_fd]
        with key_pipe(loc) as r:
            if r is not None:
                # QEMU base64-encodes a secret for Ceph: hand it the key decoded.
                objects.append(f"secret,id={KEY_ID},format=base64,file=/dev/fd/{r}")
                node["key-secret"] = KEY_ID
                fds.append(r)
            try:
                export = FuseExport(self._abs, driver="raw", writable=self.writable,
                                    pass_fds=tuple(fds), image=self.path, protocol=node,
                                    objects=objects, nbd=not self.writable)
            except ExternalError as e:
                if "No such file or directory" in str(e):
                    raise NotFoundError(f"no RBD image {loc.image} in pool {loc.pool}",
                                        image=self.path) from e
                raise
            self._export = export
        self._open_export(export)


# ---------------------------------------------------------------- RBD snapshots

@contextlib.contextmanager
def _held(path: str, exclusive: bool, wait: float) -> Iterator[RbdLocation]:
    """nvmgr's lock on the RBD image while ``qemu-img`` works on it."""
    loc = RbdLocation.parse(path)
    fd = _lock(loc, writable=exclusive, wait=wait, location=path)
    try:
        yield loc
    finally:
        os.close(fd)


def snapshot_list(path: str, *, wait: float = 0) -> list[dict[str, Any]]:
    """The RBD snapshots of the image (QEMU's records: ``id``, ``name``, ...)."""
    with _held(path, False, wait) as loc:
        snaps = _info(loc, path).get("snapshots", [])
    return [s for s in snaps if isinstance(s, dict)] if isinstance(snaps, list) else []


def _names(loc: RbdLocation, path: str) -> set[str]:
    snaps = _info(loc, path).get("snapshots", [])
    return {str(s.get("name")) for s in snaps if isinstance(s, dict)} \
        if isinstance(snaps, list) else set()


def _snapshot(path: str, name: str, op: str, wait: float) -> None:
    check_snapshot_name(name)
    with _held(path, True, wait) as loc:
        known = name in _names(loc, path)
        if op == "-c" and known:
            raise UsageError(f"a snapshot named {name!r} exists", image=path)
        if op != "-c" and not known:
            raise NotFoundError(f"no snapshot named {name!r}", image=path)
        # A raw image named by its location: qemu-img probes it as raw (and says so).
        _img(loc, ["snapshot", "-q", op, name], f"qemu-img snapshot {op} {name!r}", path,
             raw=False)


def snapshot_create(path: str, name: str, *, wait: float = 0) -> None:
    """Take the RBD snapshot *name* (Ceph's own, copy-on-write) of the image."""
    _snapshot(path, name, "-c", wait)


def snapshot_apply(path: str, name: str, *, wait: float = 0) -> None:
    """Roll the image back to its RBD snapshot *name*."""
    _snapshot(path, name, "-a", wait)


def snapshot_delete(path: str, name: str, *, wait: float = 0) -> None:
    """Delete the RBD snapshot *name*."""
    _snapshot(path, name, "-d", wait)
