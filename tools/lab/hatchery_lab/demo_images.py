"""The demo's and the upgrade tests' hypervisor image versions, built and signed.

``vN`` is the hypervisor image built with ``--version vN`` and the overlay
images/demo-overlays/vN (a beacon unit naming the version; v4's agent cannot start), into
build/demo/vN/ — cached by their inputs like every image build, so a rerun is quick.
"""

from __future__ import annotations

from pathlib import Path

from hatchery.images.signing import KeyPair, generate_key, sign_build_dir
from hatchery_lab import REPO
from hatchery_lab.images import build_images

OVERLAYS = REPO / "images" / "demo-overlays"
DEMO_BUILDS = REPO / "build" / "demo"


def build_version(version: str) -> Path:
    """Build (or reuse) hypervisor image ``version``; return its build folder."""
    out = DEMO_BUILDS / version
    build_images("hypervisor", "--version", version, "--extra-tree", str(OVERLAYS / version),
                 output_dir=out)  # fmt: skip
    return out / "hypervisor"


def signing_key(folder: Path) -> KeyPair:
    return generate_key(folder, "demo-images")


def signed(build: Path, key: KeyPair) -> Path:
    """Sign the build's manifest with ``key`` (a signed manifest beside the artefacts)."""
    sign_build_dir(build, key.private)
    return build
