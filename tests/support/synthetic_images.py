"""Small synthetic image builds, shaped like ``make images`` output (hatchery_lab.imagebuild)."""

from __future__ import annotations

from pathlib import Path

from hatchery.images.signing import KeyPair, generate_key, sign_build_dir
from hatchery_lab.synthetic_images import make_build

__all__ = ["keypair", "make_build", "signed_build"]


def signed_build(
    root: Path,
    version: str,
    key: KeyPair,
    *,
    initrd_size: int = 256 * 1024,
    initrd: bytes | None = None,
) -> tuple[Path, bytes]:
    """A signed build directory and its signed manifest bytes (``initrd``: its content,
    else random bytes)."""
    build = make_build(root, version, initrd_size=initrd_size, initrd=initrd)
    path, _ = sign_build_dir(build, key.private)
    return build, path.read_bytes()


def keypair(root: Path, name: str = "image-signing") -> KeyPair:
    return generate_key(root / "keys", name)
