"""``nvmgr reconcile --watch``: the long-running piece (``nvmgr-watch.service``).

It follows libvirt's lifecycle events and, for domains with nvmgr metadata:

- *defined* (virsh define, virsh edit, virt-manager, virt-clone): reconcile
  it (:func:`nvmgr.virt.define.reconcile`): new sections, the QEMU
  arguments, a clone's own image;
- *stopped*: reconcile what was edited while it ran;
- *defined* or *device added* while it runs (``virsh attach-device
  --persistent``, virt-manager's Add Hardware): a device whose profile needs
  a section (a ``<tpm>``, a NIC under ``<nvmgr:per-device kind='nic-eeprom'>``)
  gets it now: the image grows beside the running QEMU and the persistent
  definition gets its QEMU arguments (:func:`nvmgr.virt.define.grow_running`);
  the next start uses it;
- changed without any event: libvirt 9.0 sends none for ``virsh
  attach-device --config`` (measured), so every :data:`POLL` seconds the
  persistent definition of each nvmgr domain is compared with the one last
  reconciled, and reconciled when it differs (a definition that failed is
  retried only once it changes again);
- *undefined* behind nvmgr's back (virsh undefine, virt-manager's Delete):
  record its image as orphaned, in the image, with the time
  (:func:`nvmgr.provision.orphans.mark_orphaned`); ``nvmgr images --orphans``
  lists it and ``nvmgr define`` offers ``--adopt`` or ``--fresh``.

One line per action on stdout (``NAME: what was done``); the watcher's own
life (connected, lost libvirtd, reconnected, stopped) on stderr.  When
libvirtd goes away (restart, upgrade) the watcher reconnects, then catches up
on what happened meanwhile: every nvmgr domain is reconciled again and those
that disappeared are recorded as orphans; the vTPM secrets of domains with a
key are given to libvirt again (ephemeral: a restarted libvirtd has none),
and a domain undefined behind nvmgr's back loses its own.  :func:`run` returns when *stop()*
says so (the CLI's SIGTERM handler), between two actions, never in one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from nvmgr.domain.elements import parse_domain
from nvmgr.errors import NotFoundError, NvmgrError
from nvmgr.provision import orphans
from nvmgr.virt import conn as virt
from nvmgr.virt import secrets
from nvmgr.virt.define import ReconcileResult, nvmgr_domains, reconcile, restore_vtpm_secret

Say = Callable[[str], None]

#: The event tuple's kind for libvirt's device-added event (lifecycle events are >= 0).
DEVICE_ADDED = -1
#: Seconds between two looks at the nvmgr domains' persistent definitions.
POLL = 2.0
#: How often the event loop wakes to look at *stop()* (seconds).
TICK = 0.25
#: libvirt keepalive: a probe every INTERVAL s, the connection dropped after COUNT unanswered.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 2, 3


@dataclasses.dataclass
class Known:
    """An nvmgr domain the watcher has seen defined: what its orphan record needs."""

    name: str
    uuid: str
    image: str


@dataclasses.dataclass
class Watcher:
    """State of one watcher: the URI, which domains, where lines go, when to stop.

    :param only: domain names to follow (``None``: every nvmgr domain).
    :param say: one line per action (stdout).
    :param note: the watcher's own life (stderr).
    """

    uri: str | None
    only: set[str] | None
    say: Say
    note: Say
    stop: Callable[[], bool]
    retry: float = 1.0
    known: dict[str, Known] = dataclasses.field(default_factory=dict)
    seen: dict[str, str] = dataclasses.field(default_factory=dict)
    connects: int = 0
    said_unreachable: bool = False
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    # ------------------------------------------------------------ actions

    def remember(self, name: str) -> Known | None:
        """Record *name*'s UUID and image (None: not an nvmgr domain, or gone)."""
        try:
            dom = parse_domain(virt.domain_xml(name, self.uri))
        except NvmgrError:
            return None
        meta = dom.nvmgr
        if meta is None or not meta.image or dom.uuid is None:
            return None
        k = Known(name, str(dom.uuid), meta.image)
        self.known[k.uuid] = k
        return k

    def reconciled(self, name: str, *, quiet_if_unchanged: bool = False) -> None:
        """Reconcile *name* and say what was done (errors are said too, never raised)."""
        try:
            xml = virt.domain_xml(name, self.uri)
            if self.seen.get(name) == xml:
                return  # our own define's event: nothing new
            r = reconcile(name, uri=self.uri)
            self.seen[name] = virt.domain_xml(name, self.uri)
            self.remember(name)
        except NotFoundError:
            return  # undefined meanwhile: the undefine event follows
        except NvmgrError as e:
            self.say(f"{name}: error: {e}")
            return
        if r.status == "not-nvmgr" or (quiet_if_unchanged and r.status == "unchanged"):
            return
        self.say(render(r))

    def gone(self, dom_uuid: str, name: str) -> None:
        """A domain was undefined: record its image as orphaned once it is gone for good."""
        k = self.known.get(dom_uuid)
        if k is None:
            return
        if virt.uuid_exists(dom_uuid, self.uri):
            return  # undefined while running: transient until it stops (the stop event)
        del self.known[dom_uuid]
        self.seen.pop(name, None)
        try:
            if secrets.remove_vtpm_secret(dom_uuid, self.uri):
                self.say(f"{k.name}: undefined; removed its vTPM secret")
        except NvmgrError as e:
            self.say(f"{k.name}: undefined; could not remove its vTPM secret: {e}")
        try:
            done = orphans.mark_orphaned(k.image, dom_uuid, k.name)
        except NvmgrError as e:
            self.say(f"{k.name}: undefined; could not record {k.image} as orphaned: {e}")
            return
        if done:
            self.say(f"{k.name}: undefined; its image {k.image} recorded as orphaned "
                     "(nvmgr images --orphans; nvmgr define --adopt or --fresh)")

    def poll(self, lv: Any, c: Any) -> None:
        """Reconcile the nvmgr domains whose persistent definition changed with
        no event (``virsh attach-device --config``); read over the watcher's
        own connection *c* (one libvirt round trip per domain)."""
        for k in list(self.known.values()):
            if not self.wanted(k.name):
                continue
            try:
                xml = c.lookupByUUIDString(k.uuid).XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
            except lv.libvirtError:
                continue  # gone: the undefine event says so
            if xml in (self.seen.get(k.name), self.failed.get(k.name)):
                continue
            self.reconciled(k.name)
            if self.seen.get(k.name) != xml:
                self.failed[k.name] = xml

    def vtpm_secret(self, name: str) -> None:
        """Give libvirt the domain's vTPM secret again: ephemeral, it is gone
        after a libvirtd restart, and the next start needs it."""
        try:
            su = restore_vtpm_secret(name, self.uri)
        except NotFoundError:
            return
        except NvmgrError as e:
            self.say(f"{name}: error: could not give libvirt its vTPM secret: {e}")
            return
        if su is not None:
            self.say(f"{name}: vTPM secret {su} given to libvirt")

    def catch_up(self, first: bool) -> None:
        """Every nvmgr domain once (at start and after a reconnect)."""
        names = nvmgr_domains(self.uri)
        for name in names:
            if self.wanted(name):
                self.reconciled(name, quiet_if_unchanged=not first)
                self.vtpm_secret(name)
            else:
                self.remember(name)
        if not first:  # undefined while we were away
            for dom_uuid, k in list(self.known.items()):
                if k.name not in names:
                    self.gone(dom_uuid, k.name)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        lv = virt._libvirt()
        virt.event_loop(TICK)
        while not self.stop():
            try:
                c = lv.openReadOnly(self.uri or virt.DEFAULT_URI)
            except lv.libvirtError as e:
                if not self.said_unreachable:  # once per outage, not once a second
                    self.note(f"cannot reach libvirt at {self.uri or virt.DEFAULT_URI} "
                              f"({e.get_error_message()}); retrying every {self.retry:g} s")
                    self.said_unreachable = True
                _sleep(self.retry, self.stop, lv)
                continue
            self.said_unreachable = False
            self._serve(lv, c)

    def _serve(self, lv: Any, c: Any) -> None:
        closed: list[int] = []
        pending: list[tuple[int, str, str]] = []
        wanted = {lv.VIR_DOMAIN_EVENT_DEFINED, lv.VIR_DOMAIN_EVENT_STOPPED,
                  lv.VIR_DOMAIN_EVENT_UNDEFINED}

        def on_event(_c: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
            if event in wanted:
                pending.append((event, dom.name(), dom.UUIDString()))

        def on_device_added(_c: Any, dom: Any, _alias: str, _opaque: Any) -> None:
            pending.append((DEVICE_ADDED, dom.name(), dom.UUIDString()))

        def on_close(_c: Any, reason: int, _opaque: Any) -> None:
            closed.append(reason)

        handle = added = None
        try:
            c.registerCloseCallback(on_close, None)
            c.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            handle = c.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                              on_event, None)
            added = c.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                                             on_device_added, None)
            first = self.connects == 0
            self.connects += 1
            self.note(("watching" if first else "reconnected to")
                      + f" libvirt at {self.uri or virt.DEFAULT_URI}")
            self.catch_up(first)
            polled = time.monotonic()
            while not self.stop() and not closed:
                lv.virEventRunDefaultImpl()
                if not pending and time.monotonic() - polled >= POLL:
                    self.poll(lv, c)
                    polled = time.monotonic()
                while pending and not self.stop():
                    event, name, dom_uuid = pending.pop(0)
                    if any(p[1] == name for p in pending):
                        continue  # a later event about it follows: handle that one
                    if event == lv.VIR_DOMAIN_EVENT_UNDEFINED or (
                            event == lv.VIR_DOMAIN_EVENT_STOPPED
                            and not virt.uuid_exists(dom_uuid, self.uri)):
                        self.gone(dom_uuid, name)
                    elif self.wanted(name):
                        self.reconciled(name)
                    else:
                        self.remember(name)
        except lv.libvirtError as e:
            if not closed:
                closed.append(-1)
                self.note(f"libvirt error: {e.get_error_message()}")
        except NvmgrError as e:  # a call of ours found libvirtd gone
            if not closed:
                closed.append(-1)
                self.note(f"libvirt error: {e}")
        finally:
            for undo in (lambda: c.domainEventDeregisterAny(handle) if handle is not None
                         else None,
                         lambda: c.domainEventDeregisterAny(added) if added is not None
                         else None,
                         c.unregisterCloseCallback, c.close):
                try:
                    undo()
                except Exception:  # noqa: BLE001, S110 - the connection may be dead already
                    pass
        if closed and not self.stop():
            self.note("lost the connection to libvirtd; reconnecting")


def _sleep(seconds: float, stop: Callable[[], bool], lv: Any) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        lv.virEventRunDefaultImpl()  # the tick timer wakes it every TICK s


def render(r: ReconcileResult) -> str:
    return (f"{r.domain}: {r.status}" + (f" (added {', '.join(r.added)})" if r.added else "")
            + "".join(f"; {n} placed in member image {w} (max-image-size)"
                      for n, w in r.in_members.items()))


def run(uri: str | None, *, only: set[str] | None, say: Say, note: Say,
        stop: Callable[[], bool]) -> None:
    """Watch until *stop()*: see the module's description."""
    Watcher(uri, only, say, note, stop).run()
