"""The bundle a container VM downloads, once: one uncompressed tar the VM's busybox reads.

Members, in this order:

- ``config.json``: the OCI runtime configuration (``runtime.runtime_config``);
- ``layers``: one line per layer, ``<index> <gzip|none> <sha256>``, in the order they apply;
- ``layer-<index>``: each layer blob as it is in the archive (the VM checks it against the
  line above with ``sha256sum`` before unpacking: bytes changed on the way are caught too).

Layer blobs are read from the archive and checked against their digests again as they are
sent; a mismatch ends the stream early, which the VM sees as a short read and refuses.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

from hatchery.containers.oci import Archive, Image

BLOCK = 512
MTIME = 0


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = MTIME
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def layers_text(image: Image) -> bytes:
    return "".join(f"{i:02d} {layer.compression} {layer.sha256}\n"
                   for i, layer in enumerate(image.layers)).encode()  # fmt: skip


def bundle_size(image: Image, config: dict[str, Any]) -> int:
    """The exact length of ``bundle_chunks`` (sent as Content-Length)."""
    files = [len(_config_bytes(config)), len(layers_text(image))]
    files += [layer.size for layer in image.layers]
    return sum(BLOCK + size + (-size % BLOCK) for size in files) + 2 * BLOCK


def _config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config, indent=1, sort_keys=True).encode() + b"\n"


def bundle_chunks(archive: Archive, image: Image, config: dict[str, Any]) -> Iterator[bytes]:
    for name, data in (("config.json", _config_bytes(config)), ("layers", layers_text(image))):
        yield _header(name, len(data)) + data + _padding(len(data))
    for i, layer in enumerate(image.layers):
        yield _header(f"layer-{i:02d}", layer.size)
        yield from archive.blob(layer, f"layer {i}")
        yield _padding(layer.size)
    yield b"\0" * (2 * BLOCK)
