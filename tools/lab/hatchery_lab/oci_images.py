"""Small OCI image archives made here, byte for byte the same on every run, for tests and the
bench: a busybox HTTP server (the HyperVM demo workload) and malformed ones to be refused.

No registry is reachable from this machine, so the images are assembled from files we have
(Debian's busybox-static) into an OCI image layout packed as a tar, the form ``skopeo copy
... oci-archive:`` writes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MTIME = 1_700_000_000
KINDS = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
         "chardev": tarfile.CHRTYPE}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Entry:
    """One layer entry: a file (``data``), a folder, a symlink or hard link (``link``)."""

    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | chardev
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def layer_tar(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime = MTIME
            info.mode = e.mode
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
                continue
            info.type = KINDS[e.kind]
            info.linkname = e.link
            tar.addfile(info)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_archive(
    out: Path,
    layers: Sequence[Sequence[Entry]],
    *,
    tag: str = "latest",
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = (),
    env: Sequence[str] = ("PATH=/bin",),
    corrupt_layer: int | None = None,
) -> Path:
    """An OCI archive of one image made of ``layers`` (gzip); ``corrupt_layer``: that
    layer's blob has one byte changed after its digest was taken."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    layer_descs = []
    diff_ids = []
    for i, entries in enumerate(layers):
        raw = layer_tar(entries)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        packed = _gzip(raw)
        digest = add(packed)
        if corrupt_layer == i:
            blobs[digest] = packed[:-9] + bytes([packed[-9] ^ 0xFF]) + packed[-8:]
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": f"sha256:{digest}", "size": len(packed)})  # fmt: skip
    config = _json({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "Cmd": list(cmd), "Env": list(env),
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })  # fmt: skip
    config_digest = add(config)
    manifest = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": layer_descs,
    })  # fmt: skip
    manifest_digest = add(manifest)
    index = _json({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": f"sha256:{manifest_digest}", "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]})  # fmt: skip
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    files.update({f"blobs/sha256/{d}": data for d, data in sorted(blobs.items())})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return out


def busybox_layer(busybox: bytes) -> list[Entry]:
    """A root with busybox-static as /bin/busybox and /bin/sh."""
    return [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", data=busybox, mode=0o755),
        Entry("bin/sh", "symlink", link="busybox", mode=0o777),
    ]


# The demo workload: serves /www over HTTP on port 80 and logs a line first. It also says
# whether it can reach the metadata service (it must not: the VM blocks that address
# before the container starts).
HTTPD_SCRIPT = b"""#!/bin/sh
echo "web container up: $(cat /www/index.html)"
if echo | nc -w 2 169.254.169.254 80 >/dev/null 2>&1; then
  echo "metadata reachable from the container"
else
  echo "metadata unreachable from the container"
fi
echo "env GREETING=${GREETING:-unset}"
exec busybox httpd -f -v -p 80 -h /www
"""


def web_image(out: Path, busybox: bytes, *, tag: str = "1") -> Path:
    """The busybox HTTP server image: two layers (busybox; the site and its start script),
    plus a third that whites out a file of the second, so unpacking exercises whiteouts."""
    site = [
        Entry("www", "dir", mode=0o755),
        Entry("www/index.html", data=b"hello from a container in an appliance VM\n"),
        Entry("www/old.html", data=b"removed by the next layer\n"),
        Entry("start", data=HTTPD_SCRIPT, mode=0o755),
    ]
    removal = [Entry("www/.wh.old.html")]
    return write_archive(out, [busybox_layer(busybox), site, removal], tag=tag,
                         entrypoint=["/start"])  # fmt: skip


def bad_images(folder: Path, busybox: bytes) -> dict[str, Path]:
    """Archives that must be refused, by what is wrong with them."""
    base = busybox_layer(busybox)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "digest": write_archive(folder / "bad-digest.tar", [base], entrypoint=["/bin/sh"],
                                corrupt_layer=0),
        "traversal": write_archive(folder / "traversal.tar",
                                   [base, [Entry("../../etc/evil", data=b"x")]],
                                   entrypoint=["/bin/sh"]),
        "symlink": write_archive(folder / "symlink.tar",
                                 [base, [Entry("escape", "symlink", link="../../../../etc")]],
                                 entrypoint=["/bin/sh"]),
    }  # fmt: skip
