"""Hatchery's lab: what the demo, the tests and the benchmarks share to build and run the real
thing on one machine — image builds (``imagebuild``), QEMU guests and hypervisor nodes, lab
networks in namespaces and bridges, the PKI, and the whole story ``make demo`` tells.

It is installed into the development venv with the project (``pip install -e .``) and imported
normally by tools/, tests/ and bench/; it is never part of the image's wheel (the image build
copies only agent/ and tools/rollout/).
"""

from __future__ import annotations

from pathlib import Path

# The checkout this lab runs from: tools/lab/hatchery_lab/__init__.py -> the repository root.
REPO = Path(__file__).resolve().parents[3]
