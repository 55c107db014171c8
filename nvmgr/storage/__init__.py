"""Bytes at offsets: the containers an nvmgr image lives in.

One module, one job::

    base      the Container API, the fault hook, open + flock of an image
              file, QEMU's image-lock probe
    raw       the one I/O path (pread/pwrite/fsync/ftruncate) and raw images
    qcow2     qcow2 images through a FUSE export of QEMU's own qcow2 code;
              internal snapshots
    rbd       images in Ceph RBD (``rbd:POOL/IMAGE...`` locations) through a
              FUSE export of QEMU's rbd driver
    network   what RBD and NBD containers share: the per-host lock file that
              stands in for an image file's flock, the opening of their export
    nbd       images on an NBD server (``nbd://`` and ``nbd+unix://`` URIs)
              through a FUSE export of QEMU's nbd driver
    fuse      a private qemu-storage-daemon FUSE export of an image, its
              mountpoint and the clean-up of those a killed nvmgr left
    qemu      the one seam that runs QEMU's tools, under one error policy
    formats   the registry of formats: probe, open, create

The registry's entry points are re-exported here.
"""

from nvmgr.storage.formats import (
    FORMATS,
    absolute,
    create_container,
    format_named,
    image_exists,
    is_location,
    open_container,
    probe_format,
)

__all__ = ["FORMATS", "absolute", "create_container", "format_named", "image_exists",
           "is_location", "open_container", "probe_format"]
