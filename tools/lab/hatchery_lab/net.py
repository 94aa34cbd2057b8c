"""Throwaway bridges for tests: unique names, always removed, nothing else touched."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator


def unique_name(prefix: str) -> str:
    """``prefix`` + a random suffix, within the 15-character interface name limit."""
    return f"{prefix}{os.getpid() % 1000:03d}{random.randrange(16**4):04x}"[:15]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def bridge(address: str | None = None, prefix: str = "htb") -> Iterator[str]:
    """A bridge in the root namespace with ``address`` (CIDR) on it; deleted afterwards."""
    name = unique_name(prefix)
    _ip("link", "add", name, "type", "bridge")
    try:
        if address:
            _ip("addr", "add", address, "dev", name)
        _ip("link", "set", name, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
