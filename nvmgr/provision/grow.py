"""Growth: the one way an image gains sections.

Everything that adds sections to an existing image goes through :func:`grow`:
``nvmgr define`` and the prepare hook (a plan that needs more than the image
has, :func:`nvmgr.provision.prepare.prepare_image`), ``nvmgr attach`` (offline
and live), the watcher's reconcile of a device added by another tool, and
``nvmgr grow``.  So a policy about growth (a maximum image size that puts new
sections into a member image instead, say) has one place to live.

The promise, whoever calls it, the VM running or not:

- nothing that exists moves: new slots go first-fit into space the directory
  gives to nobody (freed by ``remove``, a moved section, an old scratch
  area), then at the end (:func:`nvmgr.format.layout.extend`); no byte of a
  section, of a live slice QEMU reads in place or of the current header copy
  is written;
- one directory commit adds the sections, after their first bytes (if
  given) are written and flushed: a crash leaves the image as it was or with
  the new sections holding exactly those bytes (``tests/test_crash.py``,
  scenarios ``grow-live*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Section
from nvmgr.image.image import Buffer, Image


def grow(img: Image, specs: Sequence[SectionSpec],
         contents: Mapping[str, Buffer] | None = None) -> list[Section]:
    """Add *specs* to *img* (opened writable), with optional first *contents*.

    :param contents: section name -> the bytes a new section starts with
        (a device-state disk's image, an EEPROM blob): in the image before
        the section is; encrypted like any put when the section is.
    :return: the new sections as placed.
    :raise NoSpaceError: the directory or the image is full, or contents do
        not fit their section.
    :raise UsageError: a name is taken, or contents name no new section.
    """
    if not specs:
        return []
    return img.add_sections(list(specs), contents)
