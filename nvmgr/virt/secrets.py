"""libvirt secrets as key-encryption keys, through the libvirt API.

The only key source that calls libvirt; it lives beside the other libvirt
calls so that nothing below this package (the hook above all) can reach
libvirt by accident.  The hook reads libvirt's on-disk store instead
(:func:`nvmgr.crypto.keys.load_libvirt_secret_file`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvmgr.crypto.cipher import Kek
from nvmgr.crypto.keys import _check_uuid, _parse_material, load_key_file
from nvmgr.errors import ExternalError, NotFoundError

if TYPE_CHECKING:  # the metadata module loads lxml: not for every command that takes a key
    from nvmgr.domain.metadata import NvmgrMetadata


def load_libvirt_secret(secret_uuid: str, uri: str | None = None) -> Kek:
    """Load a key-encryption key from a libvirt secret through the libvirt API.

    The secret's value must be 32 raw bytes or 64 hex digits.  Reading a
    value needs a read-write connection (``virsh secret-get-value`` rules),
    so this calls ``libvirt.open``; secrets defined ``private='yes'`` cannot
    be read this way at all.

    :param secret_uuid: the secret's UUID.
    :param uri: the libvirt connection URI; None for libvirt's default.
    :return: the key, labelled ``"libvirt-secret:<uuid>"``.
    :raise UsageError: *secret_uuid* is not a UUID, or the value does not hold
        a key in either form.
    :raise NotFoundError: no such secret, or it has no value.
    :raise ExternalError: libvirt-python is missing, the connection failed,
        or libvirt refused (e.g. a private secret).
    """
    u = _check_uuid(secret_uuid)
    what = f"libvirt secret {u}"
    try:
        import libvirt
    except ImportError as e:
        raise ExternalError(f"cannot read {what}: the libvirt Python module is missing") from e

    where = f" at {uri}" if uri else ""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise ExternalError(f"cannot connect to libvirt{where}", detail=str(e)) from e
    try:
        try:
            secret = conn.secretLookupByUUIDString(u)
            value = secret.value()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                raise NotFoundError(
                    f"{what} does not exist or has no value{where} ({e.get_error_message()})"
                ) from e
            raise ExternalError(f"cannot read {what}{where}", detail=str(e)) from e
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
    if not isinstance(value, bytes | bytearray):
        raise ExternalError(f"cannot read {what}{where}: libvirt returned no bytes")
    return Kek(_parse_material(bytes(value), what), label=f"libvirt-secret:{u}")


def domain_kek(meta: NvmgrMetadata | None, uri: str | None = None) -> Kek | None:
    """The key a domain's nvmgr metadata names (a key file, or a libvirt secret
    read through libvirt: outside a hook, libvirt may be asked); None without one."""
    if meta is None:
        return None
    if meta.key_file:
        return load_key_file(meta.key_file)
    if meta.key_secret:
        return load_libvirt_secret(str(meta.key_secret), uri)
    return None


# ---------------------------------------------------------------- vTPM secrets

_VTPM_SECRET_XML = """<secret ephemeral='yes' private='yes'>
  <uuid>{uuid}</uuid>
  <description>nvmgr: swtpm state encryption of domain {domain}</description>
  <usage type='vtpm'><name>{usage}</name></usage>
</secret>
"""


def _daemon_run_dir(uri: str | None) -> tuple[str | None, str] | None:
    """Where the daemon behind *uri* keeps its runtime files, as (nvmgr's runtime
    root there, None: this host's; the secret driver's pid file): the prepare
    hook run by that daemon reads the record there.  None for a daemon on
    another host (a host name in the URI)."""
    from urllib.parse import parse_qs, urlsplit

    from nvmgr.paths import LIBVIRT_SECRETS_PIDFILE

    if uri is None:
        return None, LIBVIRT_SECRETS_PIDFILE
    u = urlsplit(uri)
    if u.netloc:
        return None
    sock = parse_qs(u.query).get("socket", [""])[0]
    if sock.endswith("/libvirt/libvirt-sock"):  # a daemon with a /run of its own
        run = sock[: -len("/libvirt/libvirt-sock")] or ""
        return f"{run}/nvmgr", f"{run}/libvirt/secrets/driver.pid"
    return None, LIBVIRT_SECRETS_PIDFILE


def set_vtpm_secret(domain_uuid: str, passphrase: bytes, uri: str | None = None, *,
                    runtime_root: str | None = None) -> str:
    """Give libvirt the vTPM secret of a domain with a key (defined if missing),
    its value *passphrase*; record it for the prepare hook
    (:func:`nvmgr.provision.vtpm.record_secret`).  Ephemeral and private: the
    value lives only in libvirtd's memory (never in ``/etc/libvirt/secrets``)
    and no client can read it back.  Setting it again is harmless.  The record
    goes to the runtime directory of the daemon *uri* names (this host's
    ``/run``, or the one its ``socket=`` lives in); none for a remote daemon
    (its prepare hook then refuses the start: run nvmgr on that host).

    :return: the secret's UUID.
    :raise ExternalError: libvirt refused.
    """
    from nvmgr.domain.qemuargs import vtpm_secret_uuid, vtpm_usage
    from nvmgr.provision import vtpm
    from nvmgr.virt import conn as virt

    lv = virt._libvirt()
    su = str(vtpm_secret_uuid(domain_uuid))
    with virt.connect(uri) as c:
        try:
            try:
                sec = c.secretLookupByUUIDString(su)
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_SECRET:
                    raise
                sec = c.secretDefineXML(_VTPM_SECRET_XML.format(
                    uuid=su, domain=domain_uuid, usage=vtpm_usage(domain_uuid)))
            sec.setValue(passphrase)
        except lv.libvirtError as e:
            raise ExternalError(f"cannot give libvirt the vTPM secret {su} of domain "
                                f"{domain_uuid}", detail=e.get_error_message()) from e
    where = _daemon_run_dir(uri)
    if where is not None:  # another host's daemon: its prepare hook cannot be told
        vtpm.record_secret(su, passphrase, runtime_root=runtime_root or where[0],
                           pidfile=where[1])
    return su


def remove_vtpm_secret(domain_uuid: str, uri: str | None = None, *,
                       runtime_root: str | None = None) -> bool:
    """Take a domain's vTPM secret out of libvirt (undefine); whether there was one."""
    from nvmgr.domain.qemuargs import vtpm_secret_uuid
    from nvmgr.provision import vtpm
    from nvmgr.virt import conn as virt

    lv = virt._libvirt()
    su = str(vtpm_secret_uuid(domain_uuid))
    removed = False
    with virt.connect(uri) as c:
        try:
            c.secretLookupByUUIDString(su).undefine()
            removed = True
        except lv.libvirtError as e:
            if e.get_error_code() != lv.VIR_ERR_NO_SECRET:
                raise ExternalError(f"cannot remove the vTPM secret {su} of domain "
                                    f"{domain_uuid}", detail=e.get_error_message()) from e
    where = _daemon_run_dir(uri)
    if where is not None:
        vtpm.forget_secret(su, runtime_root or where[0])
    return removed
