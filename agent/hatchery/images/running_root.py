"""The root image this node booted from, so its store can take that image without an upload.

A node booted from a live initrd (docs/images.md, "The live root") keeps that initrd's whole
root, ``root.squashfs``, in RAM behind the loop device mounted at ``/run/hatchery/root``.
Every node needs its running image in its store (it births others from it; a live patch
compares against it), and publishing it sent those 95 MB over the network only for the node
to hash bytes it already held: 14 s of a 2-vCPU emulated node, bound by receiving.

So the client may send the initrd with the root image's byte range left out (``PUT
/v1/objects/<sha256>?running_root_at=OFFSET&running_root_size=SIZE``) and the node puts its
own image in its place. The store takes the result only if it hashes to the object's name, as
any upload: a client that lies about the range, or a node running another image, gets the
upload refused and sends it whole. What is read is the image's read-only lower layer, never
the node's writes (the overlay's tmpfs), and the image holds no secret (no identity is baked
in, docs/images.md).

The next version costs little more: its initrd may come as a zstd patch against the running
root image (``PUT /v1/objects/<sha256>?patched_on_running_root=SIZE``, the body made by
``zstd --patch-from=<that root image>``): v2's 96 MB initrd against v1's root image is a
1.5 MB patch. The node decodes it with its own image as the dictionary (``write_patched``)
and, again, stores the result only if it hashes to the name.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import zstandard

from hatchery.errors import HatcheryError
from hatchery.images.store import ObjectWriter

ROOT_MOUNT = "/run/hatchery/root"
MOUNTINFO = Path("/proc/self/mountinfo")
CHUNK = 1 << 20
#: What a client may send itself with the running root image: around it, a live initrd's
#: other members (its /init, busybox, a few modules) and cpio framing; as a patch on it, the
#: next version's changes. A few MB either way; more is worth no special path.
MAX_SENT = 64 << 20
#: The largest zstd window a patch may ask for: ``--patch-from`` sizes it to reach from the
#: result back into the base (92 MiB for a live root); what a patch can make the node
#: allocate for its window is bounded by this.
MAX_PATCH_WINDOW = 1 << 28
_PATCHING = threading.Lock()


class NotRunningRoot(HatcheryError):
    """An upload around the running root image that this node cannot complete: it has none,
    another size, or another content (409: the client sends the object whole)."""


def running_root_device(mountinfo: Path = MOUNTINFO, mount_point: str = ROOT_MOUNT) -> Path | None:
    """The loop device holding the squashfs image mounted at ``mount_point``; None where the
    node did not boot a live root (the cpio layout, a development host)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5 or fields[4] != mount_point or "-" not in fields:
            continue
        after = fields[fields.index("-") + 1 :]
        if len(after) >= 2 and after[0] == "squashfs" and after[1].startswith("/dev/loop"):
            return Path(after[1])
    return None


def size_of(device: Path) -> int:
    """The byte size of a block device (or file): where its end is."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_with_root(writer: ObjectWriter, rest: bytes, offset: int, root: Path, size: int) -> None:
    """Write ``rest[:offset]``, the ``size`` bytes of ``root``, then ``rest[offset:]`` into
    ``writer``. The root is written as it is read, 1 MiB at a time, with no copy of its own
    (a node copies memory at under 200 MB/s under TCG); the first piece is the head and the
    first MiB together, as an upload's first piece starts, since the store decides from it
    whether the content is worth compressing.

    :raise OSError: ``root`` holds fewer than ``size`` bytes, or cannot be read.
    """
    head = rest[:offset]
    with root.open("rb", buffering=0) as f:
        left = size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{root} ended {left} bytes short of the {size} expected")
            left -= len(chunk)
            if head:
                chunk, head = head + chunk, b""
            writer.write(chunk)
    tail = head + rest[offset:]
    if tail:
        writer.write(tail)


def _read_exactly(root: Path, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    with root.open("rb", buffering=0) as f:
        done = 0
        while done < size:
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{root} ended {size - done} bytes short of the {size} expected")
            done += got
    return data


def write_patched(writer: ObjectWriter, patch: bytes, root: Path, size: int) -> None:
    """Decode ``patch``, one zstd frame made with the ``size`` bytes of ``root`` as its
    dictionary (``zstd --patch-from``), into ``writer``, 1 MiB at a time. The root image is
    read whole first (a dictionary is one piece of memory): for a moment the agent holds it
    twice (it and libzstd's copy), ~200 MB for a live root.

    :raise NotRunningRoot: ``patch`` is no zstd frame, or does not decode against ``root``
        (made against another image, or asking for a window over ``MAX_PATCH_WINDOW``).
    :raise OSError: ``root`` holds fewer than ``size`` bytes, or cannot be read.
    """
    with _PATCHING:  # one at a time: what each holds, it holds in RAM
        _decode_patch(writer, patch, root, size)


def _decode_patch(writer: ObjectWriter, patch: bytes, root: Path, size: int) -> None:
    base = zstandard.ZstdCompressionDict(
        _read_exactly(root, size), dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    decoder = zstandard.ZstdDecompressor(dict_data=base, max_window_size=MAX_PATCH_WINDOW)
    try:
        with decoder.stream_reader(patch) as reader:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
    except zstandard.ZstdError as exc:
        raise NotRunningRoot(f"the patch does not decode against this node's running root "
                             f"image: {exc}", hint="upload the object whole") from None  # fmt: skip
