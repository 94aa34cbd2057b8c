"""Signed images whose root can be live-patched onto a folder standing in for a node's root:
the running kernel's modules folder (so live mode accepts them), an os-release naming the
version, and whatever else a test puts in. Shared by the live-upgrade tests (integration)."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import zstandard

from hatchery.images.signing import sign_build_dir
from hatchery_lab.cpio_writer import Entry, write_newc
from tests.support.synthetic_images import make_build

KERNEL = b"the same kernel for every version"


def root(version: str, extra: Sequence[Entry] = ()) -> bytes:
    """A root cpio of ``version`` with modules for the running kernel, plus ``extra``."""
    release = platform.release()
    return write_newc([
        Entry.directory("usr"), Entry.directory("usr/lib"), Entry.directory("usr/lib/modules"),
        Entry.directory(f"usr/lib/modules/{release}"),
        Entry.file(f"usr/lib/modules/{release}/modules.dep", b""),
        Entry.file("usr/lib/os-release", f'NAME="Hatchery"\nIMAGE_VERSION={version}\n'.encode()),
        Entry.directory("etc"),
        Entry.file("etc/motd", f"Hatchery {version}\n".encode()),
        *extra,
    ])  # fmt: skip


def build(tmp: Path, version: str, key_private: Path, extra: Sequence[Entry] = ()) -> Path:
    """A signed build folder of ``version`` (root: ``root(version, extra)``), under ``tmp``."""
    out = make_build(tmp / "builds", version, kernel=KERNEL)
    compressed = zstandard.ZstdCompressor().compress(root(version, extra))
    (out / "hypervisor.cpio.zst").write_bytes(compressed)
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("hypervisor.cpio.zst", "hypervisor.vmlinuz"):
        data = (out / name).read_bytes()
        manifest["artefacts"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_build_dir(out, key_private)
    return out
