"""Image tier: builds our mkosi images once per session (cached by inputs) and hands them out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hatchery_lab.images import build_images
from hatchery_lab.liveroot import unpack_root
from tests.conftest import missing


@pytest.fixture(scope="session")
def images() -> Path:
    """build/images with both images built from this checkout (``make images``)."""
    if os.geteuid() != 0:
        missing("image builds need root (mkosi)")
    for tool in ("mkosi", "qemu-system-x86_64", "zstd", "lz4", "cpio"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")
    return build_images()


@pytest.fixture(scope="session")
def hypervisor_root(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hypervisor image's root file system, unpacked from its initrd (either layout)."""
    return unpack_root(
        images / "hypervisor" / "hypervisor.cpio.zst", tmp_path_factory.mktemp("hvroot") / "root"
    )
