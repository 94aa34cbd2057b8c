"""Fixtures for the network-boot tests: a private bridge in a namespace of our own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab.netenv import NetEnv, boot_network


@pytest.fixture
def netenv(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[NetEnv]:
    require_tool("ip")
    with boot_network(tmp_path) as env:
        yield env
