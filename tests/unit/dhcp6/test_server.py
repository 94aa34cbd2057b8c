"""Finding the bridge's IPv6 address for the boot services, from /proc/net/if_inet6's format."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hatchery.dhcp6.server import Dhcp6ServerError, interface_ipv6

PREFIX = ipaddress.IPv6Network("fd42:6b1:0:1::/64")
TABLE = """\
fe80000000000000505400fffe000001 04 40 20 80      br0
fd4206b1000000010000000000000009 04 40 00 c0      br0
fd4206b1000000010000000000000001 04 40 00 80      br0
fd4206b1000000010000000000000002 05 40 00 80     eth1
fd4206b1000000020000000000000001 04 40 00 80      br0
"""


def test_the_lowest_settled_address_in_the_prefix_on_that_interface(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(TABLE)
    assert interface_ipv6("br0", PREFIX, table) == ipaddress.IPv6Address("fd42:6b1:0:1::1")
    assert interface_ipv6("eth1", PREFIX, table) == ipaddress.IPv6Address("fd42:6b1:0:1::2")


def test_none_or_only_tentative_is_a_clear_error(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(TABLE.splitlines()[1] + "\n")  # ::9, flags 0xc0: tentative
    with pytest.raises(Dhcp6ServerError, match=r"br0 has no usable IPv6 address in .*tentative"):
        interface_ipv6("br0", PREFIX, table)
    with pytest.raises(Dhcp6ServerError, match="br1 has no usable IPv6 address in"):
        interface_ipv6("br1", PREFIX, table)
