"""The demo's and the upgrade tests' hypervisor image versions, built and signed.

``vN`` is the hypervisor image built with ``--version vN`` and the overlay
images/demo-overlays/vN (a beacon unit naming the version; v4's agent cannot start), into
build/demo/vN/ — cached by their inputs like every image build, so a rerun is quick. v3 runs
the kernel from backports (6.12 against the release's 6.1): a reboot upgrade to it, and the
boot guard's fall-back from v4 to it, change the host's kernel for real.
"""

from __future__ import annotations

from pathlib import Path

from hatchery.images.signing import KeyPair, generate_key, sign_build_dir
from hatchery_lab import REPO
from hatchery_lab.images import build_images

OVERLAYS = REPO / "images" / "demo-overlays"
DEMO_BUILDS = REPO / "build" / "demo"
#: Every demo version, one overlay folder each: the demo uses v1 and v2, the in-node upgrade
#: test all four, and ``make test`` builds them all ahead (hatchery_lab.prebuild).
VERSIONS = ("v1", "v2", "v3", "v4")
#: The versions whose kernel is not the release's (``imagebuild --kernel``).
KERNELS = {"v3": "backports"}


def build_version(version: str) -> Path:
    """Build (or reuse) hypervisor image ``version``; return its build folder."""
    out = DEMO_BUILDS / version
    build_images("hypervisor", "--version", version, "--extra-tree", str(OVERLAYS / version),
                 "--kernel", KERNELS.get(version, "stable"), output_dir=out)  # fmt: skip
    return out / "hypervisor"


def signing_key(folder: Path) -> KeyPair:
    return generate_key(folder, "demo-images")


def signed(build: Path, key: KeyPair) -> Path:
    """Sign the build's manifest with ``key`` (a signed manifest beside the artefacts)."""
    sign_build_dir(build, key.private)
    return build
