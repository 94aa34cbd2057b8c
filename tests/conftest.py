"""Test tiers and the rules that keep them honest.

A test's tier is the folder it lives in: ``unit`` (pure and fast), ``integration`` (netns,
real servers and clients, QEMU) and ``image`` (mkosi builds, booted images). ``make test``
runs them all. A test that needs a tool or root it does not have skips on a developer's
machine but fails under CI (``CI=true``), so a missing install step cannot hide.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: Examples per fuzz test (every codec and every permission check that takes hostile input).
#: CI runs 2 000 of each, which keeps the unit tier to minutes on a 2-core machine (10 000
#: took nine minutes of it); a deeper hunt is ``make fuzz`` (50 000 each, the fuzz tests
#: only) or ``FUZZ_EXAMPLES=N`` for any run.
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or (2_000 if IN_CI else 400))
_TIERS = ("integration", "image")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).relative_to(REPO / "tests").parts
        if parts and parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def missing(reason: str) -> None:
    """Skip locally, fail in CI: the tier's prerequisites are part of ``make setup``."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must install it: see tools/setup-host.sh)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """``require_tool("udhcpc")`` returns the tool's path or skips/fails as above."""

    def _require(name: str) -> str:
        path = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()),
            None,
        )
        if path is None:
            missing(f"{name} is not installed")
            raise AssertionError("unreachable")
        return path

    return _require


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (network namespaces, taps, nftables)")
