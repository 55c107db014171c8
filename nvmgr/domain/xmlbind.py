"""Descriptors that map XML to typed attributes, in the style of virt-manager's ``XMLProperty``.

``persistent_state = YesNo("./backend/@persistent_state")`` reads and writes
the live tree, so a class body (:mod:`nvmgr.domain.elements`) is a
declaration of the XML it covers.  Paths are ``./a/b`` for an element's text
and ``./a/@attr`` for an attribute; ``nvmgr:`` and ``qemu:`` prefixes are
those of :data:`nvmgr.domain.namespaces.NSMAP`.

A value that does not parse raises :class:`~nvmgr.errors.InvalidInputError`
naming the element, its line and the text.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from lxml import etree

from nvmgr.domain.namespaces import clark
from nvmgr.errors import InvalidInputError

T = TypeVar("T")
X = TypeVar("X", bound="XMLObject")


class XMLObject:
    """One element of a document, read and written through descriptors.

    Subclasses declare their XML as class attributes (:class:`XMLProperty`
    made by :func:`Text`, :func:`YesNo`, :func:`OnOff`, :func:`UUIDProp`;
    :class:`Child`, :class:`Children`); each reads the live tree on access
    and writes it on assignment.
    """

    def __init__(self, node: etree._Element) -> None:
        self._node = node

    def _where(self) -> str:
        tag = etree.QName(self._node).localname
        line = self._node.sourceline
        return f"<{tag}> (line {line})" if line else f"<{tag}>"


def _find(node: etree._Element, steps: list[str]) -> etree._Element | None:
    """The first element along *steps* below *node*, or ``None``."""
    for step in steps:
        child = node.find(clark(step))
        if child is None:
            return None
        node = child
    return node


def _make(node: etree._Element, steps: list[str]) -> etree._Element:
    """The element along *steps* below *node*, created (with its parents) where missing."""
    for step in steps:
        child = node.find(clark(step))
        node = etree.SubElement(node, clark(step)) if child is None else child
    return node


def _split(path: str) -> tuple[list[str], str | None]:
    """``./backend/@version`` -> (["backend"], "version"); ``./name`` -> (["name"], None)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if parts and parts[-1].startswith("@"):
        return parts[:-1], parts[-1][1:]
    return parts, None


def _prune(node: etree._Element, stop: etree._Element) -> None:
    """Remove *node* and empty ancestors up to (not including) *stop*."""
    while node is not stop and not len(node) and not node.attrib and not (node.text or "").strip():
        parent = node.getparent()
        if parent is None:
            return
        parent.remove(node)
        node = parent


def remove_element(node: etree._Element) -> None:
    """Take *node* out of its parent (a root stays where it is)."""
    parent = node.getparent()
    if parent is not None:
        parent.remove(node)


class XMLProperty(Generic[T]):
    """A typed value at ``path`` (``./a/b`` for text, ``./a/@attr`` for an attribute).

    :param parse: turns the XML text into the value; ``ValueError`` becomes
        an :class:`InvalidInputError` naming the element and the text.
    :param unparse: turns a value back into XML text.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[str], T],
        unparse: Callable[[T], str],
        what: str,
    ) -> None:
        self.path = path
        self.steps, self.attr = _split(path)
        self.parse = parse
        self.unparse = unparse
        self.what = what

    def raw(self, obj: XMLObject) -> str | None:
        node = _find(obj._node, self.steps)
        if node is None:
            return None
        if self.attr is not None:
            return node.get(clark(self.attr))
        return node.text

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> XMLProperty[T]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> T | None: ...

    def __get__(
        self, obj: XMLObject | None, objtype: type[Any] | None = None
    ) -> T | None | XMLProperty[T]:
        if obj is None:
            return self
        text = self.raw(obj)
        if text is None:
            return None
        try:
            return self.parse(text)
        except ValueError as e:
            raise InvalidInputError(
                f"{obj._where()}: {self.path} = {text[:80]!r} is not {self.what} ({e})"
            ) from e

    def __set__(self, obj: XMLObject, value: T | None) -> None:
        if value is None:
            node = _find(obj._node, self.steps)
            if node is None:
                return
            if self.attr is not None:
                if clark(self.attr) in node.attrib:
                    del node.attrib[clark(self.attr)]
            else:
                node.text = None
            _prune(node, obj._node)
            return
        node = _make(obj._node, self.steps)
        text = self.unparse(value)
        if self.attr is not None:
            node.set(clark(self.attr), text)
        else:
            node.text = text


def parse_yesno(text: str) -> bool:
    """libvirt's ``yes``/``no`` (and ``on``/``off``) as a bool.

    :raise ValueError: anything else.
    """
    v = text.strip()
    if v in ("yes", "on"):
        return True
    if v in ("no", "off"):
        return False
    raise ValueError("expected 'yes' or 'no'")


def _uuid(text: str) -> uuid.UUID:
    return uuid.UUID(text.strip())


def Text(path: str) -> XMLProperty[str]:  # noqa: N802 - reads as a declaration
    """A string value: ``name = Text("./name")``."""
    return XMLProperty(path, str, str, "text")


def YesNo(path: str) -> XMLProperty[bool]:  # noqa: N802
    """A libvirt ``yes``/``no`` value."""
    return XMLProperty(path, parse_yesno, lambda b: "yes" if b else "no", "'yes' or 'no'")


def OnOff(path: str) -> XMLProperty[bool]:  # noqa: N802
    """A libvirt ``on``/``off`` value (``<smm state='on'/>``)."""
    return XMLProperty(path, parse_yesno, lambda b: "on" if b else "off", "'on' or 'off'")


def UUIDProp(path: str) -> XMLProperty[uuid.UUID]:  # noqa: N802
    """A UUID, written in libvirt's lower-case dashed form."""
    return XMLProperty(path, _uuid, str, "a UUID")


class Child(Generic[X]):
    """The first element at ``path`` wrapped in ``cls``, or ``None``."""

    def __init__(self, cls: type[X], path: str) -> None:
        self.cls = cls
        self.steps, _ = _split(path)

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Child[X]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> X | None: ...

    def __get__(self, obj: XMLObject | None, objtype: type[Any] | None = None) -> X | None | Child[X]:
        if obj is None:
            return self
        node = _find(obj._node, self.steps)
        return None if node is None else self.cls(node)

    def create(self, obj: XMLObject) -> X:
        """The child, created (with any missing parents) when absent."""
        return self.cls(_make(obj._node, self.steps))

    def remove(self, obj: XMLObject) -> None:
        node = _find(obj._node, self.steps)
        if node is not None:
            remove_element(node)


class Children(Generic[X]):
    """Every element at ``path`` (the last step repeats), each wrapped in ``cls``."""

    def __init__(self, cls: type[X], path: str) -> None:
        self.cls = cls
        steps, _ = _split(path)
        self.parents, self.tag = steps[:-1], steps[-1]

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Children[X]: ...

    @overload
    def __get__(self, obj: XMLObject, objtype: type[Any] | None = None) -> list[X]: ...

    def __get__(
        self, obj: XMLObject | None, objtype: type[Any] | None = None
    ) -> list[X] | Children[X]:
        if obj is None:
            return self
        parent = _find(obj._node, self.parents)
        if parent is None:
            return []
        return [self.cls(n) for n in parent.findall(clark(self.tag))]
