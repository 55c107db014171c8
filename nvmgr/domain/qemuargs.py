"""QEMU arguments for a plan, and the domain rewrite that carries them.

A libvirt hook cannot change QEMU's arguments, so they go into the domain at
define time as ``<qemu:commandline>`` (namespace
``http://libvirt.org/schemas/domain/qemu/1.0``).  For a plan with live
sections::

    -blockdev {"driver":"file","filename":IMAGE,"node-name":"nvmgr-file",...}
    -blockdev {"driver":"qcow2","file":"nvmgr-file","node-name":"nvmgr-image"}   (qcow2 only)
    -object secret,id=nvmgr-key,format=raw,file=/run/nvmgr/DOMAIN-UUID/image.key  (a key)
    -blockdev {"driver":"raw","file":BASE,"offset":O,"size":S,"node-name":"nvmgr-uefi-vars"}
    -blockdev {"driver":"luks","file":"nvmgr-uefi-vars","key-secret":"nvmgr-key",
               "node-name":"nvmgr-luks-CRC"}                               (a key)
    -machine pflash1=nvmgr-uefi-vars       (nvmgr-luks-CRC with a key)
    -device {"driver":D,"drive":"nvmgr-NAME","id":...,"share-rw":true}    (block + driver)
    -fw_cfg name=opt/...,file=/run/nvmgr/DOMAIN-UUID/NAME                 (fwcfg)

When the domain names a key, each live section's slot holds a LUKS volume
(its header counted in the section's capacity, the slice's size); QEMU's
``luks`` driver on the raw slice decrypts it, and the device sees exactly
the payload.  The passphrase (derived from the image's data key) reaches
QEMU through the ``secret`` object, read from a runtime file that the
``prepare`` hook writes and the ``started`` hook removes: never on the
command line, in the XML or in the environment.

The ``prepare`` hook stages fw_cfg files and the key under
:func:`runtime_dir` before QEMU starts and hands the image to the QEMU user
(libvirt does not chown files named only in ``qemu:commandline``).

:func:`apply_plan` puts these arguments into a parsed domain, turns its
loader into ``<loader readonly='yes' type='pflash' stateless='yes'>`` with no
``<nvram>`` (libvirt 9.0 accepts this and still knows the VM is UEFI), and
records the image in the nvmgr metadata.  It is idempotent and keeps the
user's own ``qemu:arg`` values; :func:`strip` undoes it.
:func:`rewrite_domain` and :func:`strip_nvmgr` do the same on XML text.

This module owns the arguments' format: :func:`user_args` tells nvmgr's
pairs from the user's, and :func:`slice_offsets` reads back the offsets
:func:`qemu_args` wrote, so nothing else parses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
import zlib
from collections.abc import Callable, Mapping

from nvmgr.domain import profiles
from nvmgr.domain.elements import TPM, Domain, parse_domain
from nvmgr.domain.metadata import LibvirtNvram, NvmgrMetadata
from nvmgr.domain.plan import Plan, PlannedSection
from nvmgr.errors import InvalidInputError, UsageError
from nvmgr.format.model import Binding
from nvmgr.paths import RUNTIME_ROOT
from nvmgr.storage.nbd import NbdLocation, is_nbd
from nvmgr.storage.rbd import RbdLocation, is_rbd

#: Where the prepare hook stages what QEMU reads as files (tmpfs), one
#: directory per domain UUID.  The one definition: the arguments below name
#: these files, and :mod:`nvmgr.provision.staging` writes them.

FILE_NODE = "nvmgr-file"
FORMAT_NODE = "nvmgr-image"
KEY_SECRET_ID = "nvmgr-key"
RBD_SECRET_ID = "nvmgr-rbd-key"
#: Every node, device and object id nvmgr adds starts with this.
PREFIX = "nvmgr-"
#: QEMU node names: a letter, then letters, digits, ``-._``; at most 31 characters.
_NODE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")

#: QEMU block devices that have ``share-rw`` (several writers on one image file).
SHARE_RW_DRIVERS = frozenset(
    {"virtio-blk-pci", "virtio-blk-device", "virtio-blk-ccw", "scsi-hd", "ide-hd", "usb-storage"}
)


#: The namespace of the UUIDs of the vTPM secrets nvmgr defines (uuid5 of a domain's UUID).
VTPM_SECRET_NAMESPACE = uuid.UUID("cc6bc8c6-f077-4d7c-807e-878fc815e774")


def vtpm_secret_uuid(domain_uuid: uuid.UUID | str) -> uuid.UUID:
    """The UUID of the libvirt secret (usage ``vtpm``) whose value swtpm
    encrypts a keyed domain's TPM state with: one per domain, derived from its
    UUID, so every host and every nvmgr command names the same secret.

    :raise InvalidInputError: *domain_uuid* is not a UUID.
    """
    try:
        u = uuid.UUID(str(domain_uuid))
    except ValueError as e:
        raise InvalidInputError(f"{domain_uuid!r} is not a domain UUID") from e
    return uuid.uuid5(VTPM_SECRET_NAMESPACE, str(u))


def vtpm_usage(domain_uuid: uuid.UUID | str) -> str:
    """The usage name of a domain's vTPM secret (libvirt wants it unique per usage type)."""
    return f"nvmgr-vtpm-{uuid.UUID(str(domain_uuid))}"


def swtpm_tpms(dom: Domain) -> list[TPM]:
    """The domain's TPMs whose state libvirt keeps (``<backend type='emulator'>``: swtpm)."""
    return [t for t in dom.tpms if t.backend_type == "emulator"]


def runtime_dir(domain_uuid: uuid.UUID | str) -> str:
    """``/run/nvmgr/<domain uuid>``: staged fw_cfg files and the image key."""
    return os.path.join(RUNTIME_ROOT, str(uuid.UUID(str(domain_uuid))))


def staged_path(domain_uuid: uuid.UUID | str, section: str) -> str:
    """Where the prepare hook stages a ``fwcfg`` section for QEMU to read."""
    return os.path.join(runtime_dir(domain_uuid), section)


def key_path(domain_uuid: uuid.UUID | str) -> str:
    """Where the prepare hook writes the LUKS passphrase of the image's
    encrypted live sections (0600, the QEMU user's, tmpfs)."""
    return os.path.join(runtime_dir(domain_uuid), "image.key")


def rbd_key_path(domain_uuid: uuid.UUID | str) -> str:
    """Where the prepare hook writes the cephx key of an image on RBD (0600, tmpfs)."""
    return os.path.join(runtime_dir(domain_uuid), "rbd.key")


def node_name(section: str) -> str:
    """The QEMU node name of a section's raw slice: ``nvmgr-<name>``.

    Names that QEMU would refuse (too long, starting with a digit after the
    prefix is fine, ``+``) get a short crc32 suffix so they stay unique.
    """
    name = PREFIX + section
    if _NODE_RE.fullmatch(name):
        return name
    tag = f"{zlib.crc32(section.encode()):08x}"
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", section)[: 31 - len(PREFIX) - 9]
    return f"{PREFIX}{clean}-{tag}"


def luks_node_name(section: str) -> str:
    """The QEMU node name of the ``luks`` node on a section's raw slice:
    ``nvmgr-luks-<crc32 of the name>`` (short and unique whatever the name)."""
    return f"{PREFIX}luks-{zlib.crc32(section.encode()):08x}"


def _json(obj: Mapping[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _keyval_path(path: str) -> str:
    """A path in a QEMU ``key=value,...`` option: commas are doubled."""
    return path.replace(",", ",,")


def qemu_args(
    plan: Plan,
    image_path: str,
    fmt: str,
    *,
    domain_uuid: uuid.UUID | str | None = None,
    ports: Mapping[str, str] | None = None,
) -> list[str]:
    """The extra QEMU arguments the plan's sections need (may be empty).

    :param ports: section name -> the PCI Express root port (its QEMU id) its
        device goes on (:func:`domain_ports`); a device not named here goes
        where QEMU puts it (q35's root bus ``pcie.0``: no hot-unplug).

    :param domain_uuid: names the runtime directory; needed when the plan has
        ``fwcfg`` sections or LUKS live sections (defaults to the plan's
        domain UUID).
    :raise UsageError: a relative image path, an unknown format, or no
        domain UUID where one is needed.
    """
    rbd = RbdLocation.parse(image_path) if is_rbd(image_path) else None
    nbd = NbdLocation.parse(image_path) if is_nbd(image_path) else None
    if fmt not in ("raw", "qcow2") or ((rbd or nbd) is not None and fmt != "raw"):
        raise UsageError(f"image format {fmt!r} is not raw or qcow2 (raw on RBD and NBD)",
                         image=image_path)
    if rbd is None and nbd is None and not os.path.isabs(image_path):
        raise UsageError("the image path must be absolute for QEMU", image=image_path)
    live = plan.live_sections
    luks = any(s.luks for s in live)
    fwcfg = [s for s in plan.sections if s.binding is Binding.FWCFG]
    if not live and not fwcfg:
        return []  # QEMU does not open the image at all
    dom_uuid = domain_uuid or plan.domain_uuid
    if fwcfg or (live and (luks or (rbd is not None and rbd.has_key_source))):
        _staging_uuid(dom_uuid)  # refused before any argument is made
    args: list[str] = []
    if luks:
        key = _keyval_path(key_path(_staging_uuid(dom_uuid)))
        args += ["-object", f"secret,id={KEY_SECRET_ID},format=raw,file={key}"]
    main_live = [s for s in live if s.member_path is None]
    if main_live:
        if rbd is not None:
            # QEMU's rbd driver; the cephx key from a runtime file the hooks stage and remove.
            node: dict[str, object] = {**rbd.node(), "node-name": FILE_NODE}
            if rbd.has_key_source:
                key = _keyval_path(rbd_key_path(_staging_uuid(dom_uuid)))
                args += ["-object", f"secret,id={RBD_SECRET_ID},format=base64,file={key}"]
                node["key-secret"] = RBD_SECRET_ID
            args += ["-blockdev", _json(node)]
        elif nbd is not None:  # QEMU's nbd driver: the export as the image file
            args += ["-blockdev", _json({**nbd.node(), "node-name": FILE_NODE})]
        else:
            args += ["-blockdev", _json(file_node(image_path))]
        base = FILE_NODE
        if fmt == "qcow2":
            args += ["-blockdev", _json({"driver": "qcow2", "file": FILE_NODE,
                                         "node-name": FORMAT_NODE})]
            base = FORMAT_NODE
    bases: dict[str | None, str] = {None: base} if main_live else {}
    for s in live:  # member images, in the order their sections come
        if s.member_path is not None and s.member_path not in bases:
            n = len(bases) + (0 if main_live else 1)
            bases[s.member_path] = _member_nodes(args, s, n)
    pflash = [s for s in live if s.binding is Binding.PFLASH]
    if len(pflash) > 1:
        raise InvalidInputError(
            "only one pflash section (the UEFI vars) can be mapped: "
            + ", ".join(s.name for s in pflash)
        )
    for s in live:
        slice_node = node_name(s.name)
        args += ["-blockdev", _json(slice_props(s, bases[s.member_path]))]
        if s.luks:  # the device sees the LUKS volume's payload, not the slice
            args += ["-blockdev", _json(luks_props(s))]
            slice_node = luks_node_name(s.name)
        if s.binding is Binding.PFLASH:
            args += ["-machine", f"pflash1={slice_node}"]
        elif s.driver:
            args += ["-device", _json(device_props(s, (ports or {}).get(s.name)))]
    for s in fwcfg:
        args += ["-fw_cfg", f"name={_fwcfg_name(s)},"
                 f"file={_keyval_path(staged_path(_staging_uuid(dom_uuid), s.name))}"]
    return args


def file_node(image_path: str, node: str = FILE_NODE) -> dict[str, object]:
    """The ``file`` node over a raw image file (``-blockdev`` or QMP ``blockdev-add``)."""
    return {"driver": "file", "filename": image_path, "node-name": node, "discard": "unmap"}


def extra_file_node(section: str) -> str:
    """The node name of a second ``file`` node a live attach opens over the image
    for *section* (QEMU knows the image's size from its start; a slice beyond it
    needs a node opened after the image grew)."""
    return f"{FILE_NODE}-{zlib.crc32(section.encode()):08x}"


def slice_props(s: PlannedSection, base: str) -> dict[str, object]:
    """A live section's raw offset/size slice over node *base*."""
    return {"driver": "raw", "file": base, "offset": s.offset, "size": s.capacity,
            "node-name": node_name(s.name)}


def luks_props(s: PlannedSection) -> dict[str, object]:
    """The ``luks`` node on a LUKS section's slice (``-blockdev``, QMP
    ``blockdev-add``): the passphrase from the ``nvmgr-key`` secret object."""
    return {"driver": "luks", "file": node_name(s.name), "key-secret": KEY_SECRET_ID,
            "node-name": luks_node_name(s.name)}


def device_props(s: PlannedSection, bus: str | None = None) -> dict[str, object]:
    """The QEMU device a ``block`` section with a ``driver`` feeds (``-device``,
    QMP ``device_add``): on the ``luks`` node of a LUKS section; on *bus* (a
    root port's id) when given."""
    if s.driver is None:
        raise InvalidInputError(f"section {s.name} names no QEMU device (driver=)")
    slice_node = luks_node_name(s.name) if s.luks else node_name(s.name)
    dev: dict[str, object] = {"driver": s.driver, "drive": slice_node,
                              "id": s.device or slice_node}
    if s.driver in SHARE_RW_DRIVERS:
        dev["share-rw"] = True
    if bus is not None:
        dev["bus"] = bus
    return dev


#: The user alias (``ua-``: libvirt passes it to QEMU as the device id) of a
#: PCI Express root port nvmgr adds for a boot-time device, then a crc32 of the
#: section's name.
PORT_PREFIX = "ua-nvmgr-port-"


def port_alias(section: str) -> str:
    """The alias (and QEMU id) of the root port section *section*'s device sits on."""
    return f"{PORT_PREFIX}{zlib.crc32(section.encode()):08x}"


def wants_port(s: PlannedSection) -> bool:
    """Whether *s* feeds a PCI device QEMU would put on q35's root bus at boot."""
    return s.live and s.binding is Binding.BLOCK and bool(s.driver) \
        and str(s.driver).endswith("-pci")


def is_q35(dom: Domain) -> bool:
    """Whether the domain's machine is a q35 one (PCI Express: hot-plug only on root ports)."""
    os_ = dom.os
    return os_ is not None and "q35" in (os_.machine or "")


def domain_ports(dom: Domain, plan: Plan) -> dict[str, str]:
    """Section name -> the root port of nvmgr's in *dom* its device goes on: the
    sections :func:`wants_port` of *plan* whose port the domain has (one of a
    domain wired before nvmgr added ports has none: its device stays on the
    root bus until a ``reconcile`` or ``define`` adds one)."""
    have = dom.root_ports(PORT_PREFIX)
    return {s.name: port_alias(s.name) for s in plan.sections
            if wants_port(s) and port_alias(s.name) in have}


def missing_ports(dom: Domain, plan: Plan) -> list[str]:
    """The root ports (aliases) :func:`apply_plan` would add to *dom*."""
    if not is_q35(dom):
        return []
    have = dom.root_ports(PORT_PREFIX)
    return [port_alias(s.name) for s in plan.sections
            if wants_port(s) and port_alias(s.name) not in have]


def _place_ports(dom: Domain, plan: Plan, add: bool) -> None:
    """Add the root ports the plan's PCI devices need (*add*), remove those of
    nvmgr's no section needs any more."""
    wanted = {port_alias(s.name) for s in plan.sections if wants_port(s)} if is_q35(dom) \
        else set()
    for alias in dom.root_ports(PORT_PREFIX):
        if alias not in wanted:
            dom.remove_root_port(alias)
    if add:
        for alias in missing_ports(dom, plan):
            dom.add_root_port(alias)


def member_nodes(n: int) -> tuple[str, str]:
    """The file and format node names of the *n*-th member file QEMU opens."""
    return f"{PREFIX}m{n}-file", f"{PREFIX}m{n}-image"


def _member_nodes(args: list[str], s: PlannedSection, n: int) -> str:
    """Open member file *n* (where live section *s* is stored); return the node
    its slices sit on."""
    path, fmt = s.member_path or "", s.member_format or "raw"
    file_node, format_node = member_nodes(n)
    if is_rbd(path):
        loc = RbdLocation.parse(path)
        if loc.has_key_source or fmt != "raw":
            raise UsageError(f"section {s.name}: a live section in an RBD member with a "
                             "key source is not supported; merge it back or use a file",
                             image=path, section=s.name)
        args += ["-blockdev", _json({**loc.node(), "node-name": file_node})]
        return file_node
    if is_nbd(path):
        if fmt != "raw":
            raise UsageError(f"section {s.name}: an NBD member holds its layout raw",
                             image=path, section=s.name)
        args += ["-blockdev", _json({**NbdLocation.parse(path).node(), "node-name": file_node})]
        return file_node
    if not os.path.isabs(path):
        raise UsageError("a member image path must be absolute for QEMU", image=path)
    args += ["-blockdev", _json({"driver": "file", "filename": path, "node-name": file_node,
                                 "discard": "unmap"})]
    if fmt == "qcow2":
        args += ["-blockdev", _json({"driver": "qcow2", "file": file_node,
                                     "node-name": format_node})]
        return format_node
    return file_node


def slice_files(args: list[str]) -> dict[str, tuple[int, str | None]]:
    """Each of nvmgr's raw slices (node name) in *args*: its offset and the file
    it lies in (through a qcow2 node to its file node; None: not a file)."""
    nodes: dict[str, dict[str, object]] = {}
    for opt, value in zip(args, args[1:], strict=False):
        if opt != "-blockdev" or not value.startswith("{"):
            continue
        try:
            obj = json.loads(value)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("node-name"), str):
            nodes[obj["node-name"]] = obj
    out: dict[str, tuple[int, str | None]] = {}
    for node, obj in nodes.items():
        offset = obj.get("offset")
        if (obj.get("driver") != "raw" or not node.startswith(PREFIX)
                or not isinstance(offset, int) or isinstance(offset, bool)):
            continue
        below = nodes.get(str(obj.get("file")))
        if below is not None and below.get("driver") == "qcow2":
            below = nodes.get(str(below.get("file")))
        name = below.get("filename") if below is not None and below.get("driver") == "file" \
            else None
        out[node] = (offset, name if isinstance(name, str) else None)
    return out


def _staging_uuid(domain_uuid: uuid.UUID | str | None) -> uuid.UUID | str:
    """The UUID the runtime directory is named after; fw_cfg files and keys need one."""
    if domain_uuid is None:
        raise UsageError("the domain has no <uuid>; fw_cfg files and keys are staged per UUID")
    return domain_uuid


def _fwcfg_name(s: PlannedSection) -> str:
    if s.fwcfg_name is None:  # the planner refuses this; a hand-made plan may not
        raise InvalidInputError(f"section {s.name}: binding fwcfg needs a fwcfg-name")
    return s.fwcfg_name


def slice_offsets(args: list[str]) -> dict[str, int]:
    """Read back the arguments :func:`qemu_args` wrote: node name -> offset of each raw slice.

    Only nvmgr's own ``-blockdev`` pairs count (node names with
    :data:`PREFIX`, driver ``raw``); the prepare hook compares these offsets
    with the image's sections before QEMU opens it.
    """
    out: dict[str, int] = {}
    for opt, value in zip(args, args[1:], strict=False):
        if opt != "-blockdev" or not value.startswith("{"):
            continue
        try:
            obj = json.loads(value)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("driver") != "raw":
            continue
        node, offset = obj.get("node-name"), obj.get("offset")
        if (isinstance(node, str) and node.startswith(PREFIX)
                and isinstance(offset, int) and not isinstance(offset, bool)):
            out[node] = offset
    return out


def _json_field(value: str, field: str) -> str:
    try:
        obj = json.loads(value)
    except ValueError:
        return ""
    got = obj.get(field) if isinstance(obj, dict) else None
    return got if isinstance(got, str) else ""


#: How to recognise an (option, value) pair nvmgr added, per option.
_OURS: dict[str, Callable[[str], bool]] = {
    "-blockdev": lambda v: _json_field(v, "node-name").startswith(PREFIX),
    "-device": lambda v: _json_field(v, "drive").startswith(PREFIX),
    "-machine": lambda v: re.fullmatch(rf"pflash1={re.escape(PREFIX)}[A-Za-z0-9_.-]*", v) is not None,
    "-fw_cfg": lambda v: f",file={RUNTIME_ROOT}/" in v,
    "-object": lambda v: v.startswith(f"secret,id={PREFIX}"),
}


def user_args(args: list[str]) -> list[str]:
    """*args* without the pairs nvmgr added (see :data:`_OURS`)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        test = _OURS.get(args[i])
        if test is not None and i + 1 < len(args) and test(args[i + 1]):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def nvmgr_args(args: list[str]) -> list[tuple[str, str]]:
    """The (option, value) pairs of *args* that nvmgr added (see :data:`_OURS`)."""
    out: list[tuple[str, str]] = []
    for opt, value in zip(args, args[1:], strict=False):
        test = _OURS.get(opt)
        if test is not None and test(value):
            out.append((opt, value))
    return out


_MEMBER_NODE = re.compile(rf'"node-name":"{re.escape(PREFIX)}m[0-9]+-(file|image)"')


def _without_offset(pair: tuple[str, str], split: bool = False) -> tuple[str, str] | None:
    """A raw slice's ``-blockdev`` with its offset left out (checked against the
    image).  *split* (the arguments open member images): the slice's file
    node is left out too, and the file and format nodes themselves (None):
    which file a slice lies in, member or not, only the image knows, and the
    prepare hook checks it (:func:`slice_files`)."""
    opt, value = pair
    if opt == "-blockdev" and value.startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return pair
        if isinstance(obj, dict) and obj.get("driver") == "raw":
            obj.pop("offset", None)
            if split:
                obj.pop("file", None)
            return opt, _json(obj)
        if isinstance(obj, dict) and split:
            return None
    return pair


def wiring_problems(dom: Domain, plan: Plan) -> list[str]:
    """What keeps *dom* from running its devices on nvmgr's image as *plan* says.

    Empty when the domain is wired: its nvmgr metadata names the image, its
    ``<qemu:commandline>`` holds exactly the arguments :func:`qemu_args`
    makes for the plan (slice offsets aside: the prepare hook compares those
    with the image itself), and a UEFI domain has a stateless loader and no
    ``<nvram>``.  Anything else (``virsh define`` of XML written by hand,
    ``virsh edit`` that dropped the arguments or made the loader stateful
    again) would start the VM on libvirt's own nvram.
    """
    meta = dom.nvmgr
    if meta is None:
        return ["it has no <nvmgr:nvram> metadata"]
    if not meta.image:
        return ["its <nvmgr:nvram> metadata names no image yet"]
    problems: list[str] = []
    try:
        made = qemu_args(plan, meta.image, meta.format or "raw",
                         domain_uuid=dom.uuid or plan.domain_uuid,
                         ports=domain_ports(dom, plan))
    except (UsageError, InvalidInputError) as e:
        return [f"its QEMU arguments cannot be made: {e.message}"]
    # qemu_args makes (option, value) pairs, each option one of _OURS
    ours = nvmgr_args(dom.qemu_args)
    split = any(o == "-blockdev" and _MEMBER_NODE.search(v) for o, v in ours)
    want = [q for p in zip(made[::2], made[1::2], strict=True)
            if (q := _without_offset(p, split)) is not None]
    have = [q for p in ours if (q := _without_offset(p, split)) is not None]
    missing = [f"{o} {v}" for o, v in want if (o, v) not in have]
    extra = [f"{o} {v}" for o, v in have if (o, v) not in want]
    if missing:
        problems.append("<qemu:commandline> lacks " + "; ".join(missing))
    if extra:
        problems.append("<qemu:commandline> has arguments for another plan: " + "; ".join(extra))
    if plan.find(profiles.UEFI_SECTION) is not None:
        os_ = dom.os
        loader = os_.loader if os_ is not None else None
        if loader is None or not loader.stateless:
            problems.append("its UEFI <loader> is not stateless='yes'")
        if os_ is not None and os_.nvram is not None:
            problems.append("it has an <nvram> element (libvirt's own vars file)")
    if plan.encrypted and dom.uuid is not None:
        want_secret = vtpm_secret_uuid(dom.uuid)
        for t in swtpm_tpms(dom):
            if t.encryption_secret != want_secret:
                problems.append(
                    f"its <tpm> has no <encryption secret='{want_secret}'/> in its backend "
                    "(the domain names a key: swtpm must write its state encrypted)")
    return problems


def _make_stateless(dom: Domain, record: LibvirtNvram | None) -> LibvirtNvram:
    """Point the loader at code only, drop ``<nvram>``; return what was replaced."""
    os_ = dom.os
    if os_ is None:
        raise InvalidInputError("the plan has UEFI vars but the domain has no <os>")
    if record is None:
        nv = os_.nvram
        record = LibvirtNvram(
            path=nv.path.strip() if nv and nv.path else None,
            template=nv.template if nv else None,
            format=nv.format if nv else None,
            firmware=os_.firmware,
            features=tuple(os_.firmware_features().items()),
        )
    loader = os_.ensure_loader()
    if not loader.path:
        if os_.firmware != "efi":
            raise InvalidInputError("the plan has UEFI vars but the domain has no <loader> path")
        fw = profiles.select_firmware(
            os_.arch or "x86_64", os_.machine or "pc", os_.firmware_features(), smm=dom.smm
        )
        loader.path = fw.loader
        record = dataclasses.replace(record, firmware_template=fw.template)
    # libvirt 9.0 refuses readonly= with firmware autoselection, and
    # <firmware><feature> without it: the loader is now named explicitly.
    os_.firmware = None
    os_.set_firmware_features({})
    loader.readonly, loader.type, loader.stateless = True, "pflash", True
    os_.remove_nvram()
    return record


def apply_plan(
    dom: Domain,
    plan: Plan,
    image_path: str,
    fmt: str,
    image_uuid: uuid.UUID | str,
    *,
    ports: bool = True,
) -> None:
    """Give *dom* nvmgr's QEMU arguments, stateless loader and metadata (in place).

    Applying it again (with the same plan) changes nothing.  The user's own
    ``<qemu:arg>`` values are kept, after nvmgr's.

    On q35, each ``block`` section's PCI device goes on a PCI Express root
    port of its own (``<controller type='pci' model='pcie-root-port'>`` with
    the user alias :func:`port_alias`, at the index after the domain's other
    PCI controllers; libvirt gives it an address), where QEMU can unplug it
    (``nvmgr detach --live``); q35's root bus takes no hot-unplug.  Ports of
    sections that are gone are removed.

    :param ports: add the missing ports (False: leave the devices of sections
        without one on the root bus; ``define`` adds them once libvirt has
        given its own devices their addresses, :func:`missing_ports`).

    :raise InvalidInputError: the domain does not fit the plan (UEFI vars
        planned but no ``<os>``).
    :raise UsageError: see :func:`qemu_args`.
    """
    old = dom.nvmgr
    image_uuid = uuid.UUID(str(image_uuid))
    record = old.libvirt_nvram if old else None
    if plan.find(profiles.UEFI_SECTION) is not None:
        record = _make_stateless(dom, record)
    _place_ports(dom, plan, ports)
    args = qemu_args(plan, image_path, fmt, domain_uuid=dom.uuid or plan.domain_uuid,
                     ports=domain_ports(dom, plan))
    dom.qemu_args = args + user_args(dom.qemu_args)
    if plan.encrypted and dom.uuid is not None:
        # A domain with a key: swtpm keeps the TPM state encrypted with the
        # value of nvmgr's vTPM secret (any other <encryption> is replaced).
        for t in swtpm_tpms(dom):
            t.encryption_secret = vtpm_secret_uuid(dom.uuid)
    dom.set_nvmgr(
        NvmgrMetadata(
            image=image_path,
            format=fmt,
            uuid=image_uuid,
            key_file=old.key_file if old else None,
            key_secret=old.key_secret if old else None,
            luks=bool(old and old.luks),
            sections=old.sections if old else (),
            libvirt_nvram=record,
            per_device=old.per_device if old else (),
            max_image_size=old.max_image_size if old else None,
            # A <nvmgr:source> stays the element it was (an rbd: location still).
            image_element=bool(old and old.image_element and (is_rbd(image_path)
                                                              or is_nbd(image_path))),
        )
    )


def rewrite_domain(
    xml_text: str | bytes,
    plan: Plan,
    image_path: str,
    fmt: str,
    image_uuid: uuid.UUID | str,
) -> str:
    """:func:`apply_plan` on a domain given as text; the result as text.

    Running it again on its own output (with the same plan) gives the same text.

    :raise InvalidInputError: the XML is hostile or malformed, or does not
        fit the plan.
    :raise UsageError: see :func:`qemu_args`.
    """
    dom = parse_domain(xml_text)
    apply_plan(dom, plan, image_path, fmt, image_uuid)
    return dom.to_xml()


def strip(dom: Domain, *, keep_sections: bool = False) -> None:
    """Undo :func:`apply_plan` on *dom* (in place).

    Removes nvmgr's ``qemu:arg`` pairs and its metadata, and gives the
    loader back its ``<nvram>`` (and firmware autoselection) from the
    metadata's record, so libvirt manages UEFI vars again.  The user's own
    arguments stay.

    :param keep_sections: keep the declared ``<nvmgr:section>`` elements
        (without image, uuid or key) so a later ``nvmgr define`` plans the
        same sections.
    """
    meta = dom.nvmgr
    dom.qemu_args = user_args(dom.qemu_args)
    for alias in dom.root_ports(PORT_PREFIX):  # the ports nvmgr's devices sat on
        dom.remove_root_port(alias)
    if dom.uuid is not None:  # nvmgr's vTPM secret goes with nvmgr
        for t in swtpm_tpms(dom):
            if t.encryption_secret == vtpm_secret_uuid(dom.uuid):
                t.remove_encryption()
    rec = meta.libvirt_nvram if meta else None
    os_ = dom.os
    if rec is not None and os_ is not None:
        loader = os_.loader
        if rec.firmware is not None:
            os_.firmware = rec.firmware
            os_.set_firmware_features(dict(rec.features))
        if loader is not None and rec.firmware_template is not None:
            # nvmgr named the loader the autoselection picked: select again
            loader.readonly = loader.type = loader.stateless = loader.path = None
        elif loader is not None:
            loader.stateless = None
        if rec.path or rec.template or rec.format:
            os_.add_nvram(rec.path, rec.template, rec.format)
        if os_.loader is not None and os_.loader.is_empty:
            os_.remove_loader()
    if meta is not None and keep_sections and (meta.sections or meta.per_device):
        dom.set_nvmgr(NvmgrMetadata(sections=meta.sections, per_device=meta.per_device))
    else:
        dom.set_nvmgr(None)


def strip_nvmgr(xml_text: str | bytes, *, keep_sections: bool = False) -> str:
    """The domain as it was before :func:`rewrite_domain` (see :func:`strip`)."""
    dom = parse_domain(xml_text)
    strip(dom, keep_sections=keep_sections)
    return dom.to_xml()
