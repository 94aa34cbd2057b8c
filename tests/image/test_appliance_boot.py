"""The appliance VM: direct kernel boot (uncompressed vmlinux, PVH), a DHCP lease from dnsmasq
on a private bridge, its one service answering, and a clean power-off on the ACPI button.

Network: a namespace of the test's own with a bridge, a tap for the guest and dnsmasq; QEMU
runs inside it. All of it is removed afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab.guest import run_guest
from hatchery_lab.images import (
    LEASE_MARKER,
    ApplianceLan,
    appliance_argv,
    appliance_lan,
    qmp_command,
)

TIMEOUT = 180


@pytest.fixture
def lan(
    require_tool: Callable[[str], str], require_root: None, images: Path, tmp_path: Path
) -> Iterator[ApplianceLan]:
    require_tool("qemu-system-x86_64")
    require_tool("curl")
    with appliance_lan(require_tool("dnsmasq"), tmp_path) as network:
        yield network


def test_appliance_boots_gets_a_lease_serves_and_powers_off(
    lan: ApplianceLan, images: Path, tmp_path: Path
) -> None:
    qmp = tmp_path / "qmp.sock"
    argv = appliance_argv(images, lan, qmp=qmp)
    assert argv[argv.index("-kernel") + 1].endswith("appliance-vm.vmlinux")
    with run_guest(argv) as guest:
        lease_after = guest.wait_for(LEASE_MARKER, TIMEOUT)
        guest.wait_for(b"HATCHERY-APPLIANCE: ready", TIMEOUT)
        console = guest.output.decode(errors="replace")
        lease = re.search(r"HATCHERY-APPLIANCE: lease (\S+) iface=(\S+) ", console)
        assert lease is not None, console
        address = lease.group(1)
        assert address.startswith(lan.prefix), (address, lan.prefix)
        assert "HATCHERY-APPLIANCE: metadata unavailable" in console  # no metadata service here
        assert "HATCHERY-APPLIANCE: service httpd port=80" in console

        page = lan.run("curl", "-sS", "--max-time", "20", f"http://{address}/")
        assert page.returncode == 0, page.stderr
        assert "appliance" in page.stdout

        reply = qmp_command(qmp, "system_powerdown")
        assert "return" in reply, reply
        guest.wait_for(b"HATCHERY-APPLIANCE: power button", TIMEOUT)
        guest.wait_for(b"HATCHERY-APPLIANCE: stopped", TIMEOUT)
        assert guest.process.wait(timeout=TIMEOUT) == 0
    print(f"appliance lease {address} {lease_after:.2f} s after QEMU start")


def test_appliance_cmdline_selects_no_service(lan: ApplianceLan, images: Path) -> None:
    argv = appliance_argv(images, lan, cmdline="hatchery.service=none")
    with run_guest(argv) as guest:
        guest.wait_for(b"HATCHERY-APPLIANCE: ready", TIMEOUT)
        assert b"HATCHERY-APPLIANCE: service none" in guest.output
        assert b"version=" in guest.output
