"""What every cross-version test needs: the host's QEMU 7.2, bookworm-backports' QEMU 10
unpacked by ``make qemu-next``, the guest kernel, and root with ping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from hatchery_lab.guest import GuestKernel, find_guest_kernel
from hatchery_lab.qemu_versions import runnable_next_qemu, version
from tests.conftest import missing


@dataclass(frozen=True, slots=True)
class TwoQemus:
    old: str  # QEMU 7.2, the host's
    new: str  # QEMU 10, from .cache/qemu-next
    kernel: GuestKernel


@pytest.fixture
def two_qemus(require_root: None, require_tool: Callable[[str], str]) -> Iterator[TwoQemus]:
    require_tool("ping")
    old = require_tool("qemu-system-x86_64")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    with runnable_next_qemu() as new:
        if new is None:
            missing("no second QEMU in .cache (make qemu-next)")
        assert new is not None
        assert version(old).startswith("7.2"), version(old)
        assert version(new).startswith("10."), version(new)
        yield TwoQemus(old, new, kernel)
