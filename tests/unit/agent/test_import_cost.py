"""What the agent's processes import, in a fresh interpreter each: the boot pays for every
module, twenty times over on an emulated node (docs/images.md, "The boot path, trimmed")."""

from __future__ import annotations

import json
import subprocess
import sys

_REPORT = """
import json, sys
{statement}
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(statement: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _REPORT.format(statement=statement)],
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_netlink_leaves_pyroute2s_other_families_unimported_until_asked() -> None:
    """IPRoute works (a real dump of this host's links); NDB, IPDB and the rest are imported
    only when a name only pyroute2's ``__init__`` defines is asked for, and then it works."""
    loaded = _modules_after(
        "from hatchery.netlink import IPRoute\n"
        "with IPRoute() as ip:\n"
        "    assert any(link.get('ifname') == 'lo' for link in ip.get_links())\n"
        "assert not any(m.startswith(('pyroute2.ndb', 'pyroute2.ipdb')) for m in sys.modules)\n"
        "from pyroute2 import NDB, IPRoute as Whole\n"
        "assert Whole is IPRoute and NDB.__name__ == 'NDB'"
    )
    assert "pyroute2.ndb.main" in loaded and "pyroute2.ipdb" in loaded


def test_the_agent_does_not_run_pyroute2s_init() -> None:
    loaded = _modules_after("import hatchery.agent")
    assert "hatchery.netdev" in loaded and "pyroute2.iproute.linux" in loaded
    assert not any(
        m.startswith(("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.plan9")) for m in loaded
    )


def test_network_boot_is_imported_only_by_a_node_that_births_others() -> None:
    """The agent's start imports DHCP (its VMs' leases) but not what births machines: boot
    HTTP, TFTP, DHCPv6, the profiles; ``_network_services`` imports them for a bridge with
    ``boot``, and then they import cleanly."""
    loaded = _modules_after("import hatchery.agent")
    assert "hatchery.dhcp.server" in loaded
    births = ("hatchery.netboot", "hatchery.boothttp", "hatchery.tftp", "hatchery.dhcp6.server")
    assert not any(m.startswith(births) for m in loaded)
    loaded = _modules_after(
        "import hatchery.agent\n"
        "from hatchery.dhcp6.server import wait_for_ipv6\n"
        "from hatchery.netboot import Netboot"
    )
    assert {"hatchery.netboot", "hatchery.tftp.server", "hatchery.boothttp.app"} <= loaded
