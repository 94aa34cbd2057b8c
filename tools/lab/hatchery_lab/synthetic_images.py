"""Small synthetic image builds, shaped like ``make images`` output (hatchery_lab.imagebuild):
for tests and for benchmarks that need an image without building one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def make_build(
    root: Path,
    version: str,
    *,
    image: str = "hypervisor",
    kernel_size: int = 64 * 1024,
    initrd_size: int = 256 * 1024,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
) -> Path:
    """A build directory with a kernel, an initrd and the build's manifest.json (random
    content unless given)."""
    out = root / f"{image}-{version}"
    out.mkdir(parents=True)
    contents = {
        f"{image}.vmlinuz": kernel if kernel is not None else os.urandom(kernel_size),
        f"{image}.cpio.zst": initrd if initrd is not None else os.urandom(initrd_size),
    }
    for name, data in contents.items():
        (out / name).write_bytes(data)
    manifest = {
        "image": image,
        "version": version,
        "inputs_sha256": hashlib.sha256(version.encode()).hexdigest(),
        "inputs": {"files": {"mkosi.conf": "0" * 64}, "mkosi": "25.3"},
        "mkosi_version": "25.3",
        "packages": {"qemu-system-x86": "1:7.2+dfsg-7", "systemd": "252.36-1"},
        "python_wheels": ["hatchery-0.1.0-py3-none-any.whl"],
        "artefacts": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in sorted(contents.items())
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out
