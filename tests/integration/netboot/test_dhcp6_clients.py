"""Our DHCPv6 server (``serve dhcp6``: DHCPv6 + managed RAs) against real clients no one
here wrote, on a bridge with no IPv4 address, in namespaces of our own.

- ISC ``dhclient -6``: Solicit/Advertise/Request/Reply, then Renew (a 60 s lease: T1 is
  30 s), then Release; the address lands on the client's interface (through a client
  script of ours that only adds it) and the lease on our disk, then leaves it.
- ``dhclient -6`` with ``send dhcp6.rapid-commit;``: Solicit, then Reply at once.
- ``dhcpcd -6``: follows our RA (M=1) into DHCPv6 by itself (this dhcpcd, 9.4.1, cannot
  be told to ask for Rapid Commit). dhcpcd
  writes its lease and DUID under /var/lib/dhcpcd and its hooks rewrite /etc/resolv.conf,
  so it runs in a mount namespace of its own with tmpfs over /var/lib and /run and a
  private resolv.conf, and with no hooks at all (``-c /bin/true``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery_lab.netenv import NetEnv, boot_network, sh

PREFIX = "fd42:6b1:0:2::"
SERVER = f"{PREFIX}1"
RANGE = (f"{PREFIX}100", f"{PREFIX}1ff")


@pytest.fixture
def net6(
    require_root: None, require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[NetEnv]:
    require_tool("ip")
    with boot_network(tmp_path, ipv4=False, ipv6=f"{SERVER}/64") as env:
        dhcp = env.agent(
            "dhcp6", "dhcp6", "--interface", env.bridge, "--birth-range", "-".join(RANGE),
            "--state-dir", str(tmp_path / "state"), "--lease-time", "60",
        )  # fmt: skip
        dhcp.wait_for("dhcp6: serving on")
        dhcp.wait_for("ra: advertising")
        yield env


def leases(env: NetEnv) -> list[tuple[str, str]]:
    path = env.workdir / "state" / "dhcp6-births.json"
    if not path.exists():
        return []
    return [(x["mac"], x["ip"]) for x in json.loads(path.read_text())["leases"]]


def global_addresses(ns: str) -> list[str]:
    out = json.loads(sh("ip", "-n", ns, "-j", "-6", "addr", "show", "dev", "eth0").stdout)
    return [a["local"] for link in out for a in link["addr_info"] if a["scope"] == "global"]


def wait(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_isc_dhclient_gets_renews_and_releases_an_address(
    net6: NetEnv, require_tool: Callable[[str], str]
) -> None:
    dhclient = require_tool("dhclient")
    env, mac = net6, "52:54:00:6d:00:01"
    ns = env.add_client("dh", mac)
    script = env.workdir / "dhclient-script"
    script.write_text(  # adds the bound address, nothing else (never the host's resolv.conf)
        '#!/bin/sh\ncase "$reason" in BOUND6|RENEW6|REBIND6)\n'
        '  ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" dev "$interface";;\nesac\n'
    )
    script.chmod(0o755)
    files = ["-sf", str(script), "-lf", str(env.workdir / "dh.leases"),
             "-pf", str(env.workdir / "dh.pid")]  # fmt: skip
    client = env.start("dhclient", [dhclient, "-6", "-d", "-v", *files, "eth0"], ns=ns)
    client.wait_for("Bound to lease", timeout=30)
    wait(lambda: global_addresses(ns) == [RANGE[0]], "the address on eth0")  # by our script
    assert leases(env) == [(mac, RANGE[0])]
    dhcp = next(s for s in env.services if s.name == "dhcp6")
    assert f"SOLICIT from fe80::5054:ff:fe6d:1 (other) -> ADVERTISE {RANGE[0]}" in dhcp.text()
    assert f"REQUEST from fe80::5054:ff:fe6d:1 (other) -> REPLY {RANGE[0]}" in dhcp.text()
    dhcp.wait_for(f"RENEW from fe80::5054:ff:fe6d:1 (other) -> REPLY {RANGE[0]}", timeout=45)
    client.wait_for("RCV: Reply message", timeout=10)
    release = sh("ip", "netns", "exec", ns, dhclient, "-6", "-r", "-v", *files, "eth0")
    assert "XMT: Release" in release.stderr, release.stderr
    dhcp.wait_for("RELEASE from fe80::5054:ff:fe6d:1 (other) -> REPLY")
    wait(lambda: leases(env) == [], "the released lease to leave the disk")


def test_dhclient_with_rapid_commit_gets_its_reply_at_once(
    net6: NetEnv, require_tool: Callable[[str], str]
) -> None:
    dhclient = require_tool("dhclient")
    env, mac = net6, "52:54:00:6d:00:03"
    ns = env.add_client("rc", mac)
    conf = env.workdir / "rapid.conf"
    conf.write_text("send dhcp6.rapid-commit;\n")
    result = sh("ip", "netns", "exec", ns, dhclient, "-6", "-1", "-v", "-cf", str(conf),
                "-sf", "/bin/true", "-lf", str(env.workdir / "rc.leases"),
                "-pf", str(env.workdir / "rc.pid"), "eth0", check=False)  # fmt: skip
    pid = env.workdir / "rc.pid"
    if pid.exists():  # it went to the background once bound: stop the client we started
        sh("kill", pid.read_text().strip(), check=False)
    assert result.returncode == 0, result.stderr
    dhcp = next(s for s in env.services if s.name == "dhcp6").text()
    assert f"SOLICIT from fe80::5054:ff:fe6d:3 (other) -> REPLY {RANGE[0]}" in dhcp, dhcp
    assert "ADVERTISE" not in dhcp and "REQUEST from" not in dhcp
    assert leases(env) == [(mac, RANGE[0])]


def test_dhcpcd_follows_the_managed_ra_into_dhcpv6(
    net6: NetEnv, require_tool: Callable[[str], str]
) -> None:
    dhcpcd = require_tool("dhcpcd")
    unshare = require_tool("unshare")
    env, mac = net6, "52:54:00:6d:00:02"
    ns = env.add_client("cd", mac)
    private = env.workdir / "dhcpcd-root"
    private.mkdir()
    (private / "resolv.conf").write_text("")
    (private / "dhcpcd.conf").write_text("noipv4\n")
    jail = (
        "set -e; mount -t tmpfs none /var/lib; mount -t tmpfs none /run; "
        f"mount --bind {private}/resolv.conf /etc/resolv.conf; "
        f'exec "$0" -6 -1 -d -B -t 30 -c /bin/true -f {private}/dhcpcd.conf eth0'
    )
    result = sh("ip", "netns", "exec", ns, unshare, "--mount", "--propagation", "private",
                "sh", "-c", jail, dhcpcd, check=False)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Router Advertisement from" in log and "soliciting a DHCPv6 lease" in log, log
    assert f"adding address {RANGE[0]}/128" in log, log
    assert global_addresses(ns) == [RANGE[0]]
    dhcp = next(s for s in env.services if s.name == "dhcp6").text()
    assert f"SOLICIT from fe80::5054:ff:fe6d:2 (other) -> ADVERTISE {RANGE[0]}" in dhcp
    assert f"REQUEST from fe80::5054:ff:fe6d:2 (other) -> REPLY {RANGE[0]}" in dhcp
    assert leases(env) == [(mac, RANGE[0])]
