"""A real agent births over IPv6 only: ``boot.ipv6`` on a bridge with no IPv4 address; the
agent's DHCPv6 gives a machine (ISC dhclient in a namespace of its own) an address from the
IPv6 births range, and its boot HTTP service, listening on the bridge's IPv6 address, hands
that address, and only that address, the MAC's script with a single-use seed token; the
seed comes back sealed to the machine's key, once. The host on the bridge, without a lease,
gets neither. (The firmware half of the chain, OVMF's IPv6 HTTP Boot into iPXE, is in
test_ipv6_boot_qemu.py.)"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from hatchery.sealing import SeedKey
from hatchery_lab.agent import AgentProcess, Pki, free_port
from hatchery_lab.net import bridge, unique_name

MAC = "52:54:00:b1:66:01"


def test_agent_births_a_machine_over_ipv6_only(
    tmp_path: Path, require_root: None, require_tool: Callable[[str], str]
) -> None:
    curl, dhclient = require_tool("curl"), require_tool("dhclient")
    prefix = f"fd42:{random.randrange(1, 0xFFFF):x}:0:1::"
    server = f"{prefix}1"
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / f"{MAC}.tar").write_bytes(b"the machine's seed: its private key and config")
    port = free_port()
    ns, veth = unique_name("hv6"), unique_name("hp6")
    script = tmp_path / "dhclient-script"
    script.write_text(  # adds the bound address, nothing else
        '#!/bin/sh\ncase "$reason" in BOUND6)\n'
        '  ip -6 addr add "$new_ip6_address/64" dev "$interface" nodad;;\nesac\n'
    )
    script.chmod(0o755)
    pidfile = tmp_path / "dh.pid"
    with bridge(None) as br:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{br}.accept_dad=0"], check=True)
        subprocess.run(["ip", "addr", "add", f"{server}/64", "dev", br, "nodad"], check=True)
        agent = AgentProcess.configure(
            tmp_path, Pki.make(tmp_path / "pki"),
            [{"name": br, "metadata": False,
              "boot": {"http_port": port, "seeds": str(seeds),
                       "ipv6": {"births": {"start": f"{prefix}100", "end": f"{prefix}1ff"}}}}],
        )  # fmt: skip
        try:
            agent.start(timeout=60)
            log = agent.log_path.read_text()
            assert "dhcp6: serving on" in log and "managed (DHCPv6)" in log, log
            assert "dhcp: serving" not in log  # no DHCPv4 on an IPv6-only bridge
            base = f"http://[{server}]:{port}"

            def fetch(url: str, *extra: str, netns: str | None = None) -> tuple[str, str]:
                argv = [curl, "-sg", "-m", "20", "-w", "\n%{http_code}", *extra, url]
                if netns:
                    argv = ["ip", "netns", "exec", netns, *argv]
                out = subprocess.run(argv, capture_output=True, text=True).stdout
                body, _, code = out.rpartition("\n")
                return code, body

            assert fetch(f"{base}/boot/ipxe?mac={MAC}")[0] == "404"  # the host: no lease
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                            "netns", ns], check=True)  # fmt: skip
            subprocess.run(["ip", "link", "set", veth, "master", br, "up"], check=True)
            for argv in (["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"],
                         ["ip", "link", "set", "eth0", "address", MAC],
                         ["ip", "link", "set", "eth0", "up"]):  # fmt: skip
                subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)
            subprocess.run(["ip", "netns", "exec", ns, dhclient, "-6", "-1", "-sf", str(script),
                            "-lf", str(tmp_path / "dh.leases"), "-pf", str(pidfile), "eth0"],
                           check=True, timeout=60)  # fmt: skip
            code, text = fetch(f"{base}/boot/ipxe?mac={MAC}", netns=ns)
            assert code == "200", text
            token_url = re.search(rf"hatchery\.seed=({re.escape(base)}/seed/[A-Za-z0-9_-]{{43}})",
                                  text)  # fmt: skip
            assert token_url is not None, text
            assert f"boot script for {MAC}: profile hypervisor" in agent.log_path.read_text()
            # another MAC's script is not this machine's to have
            assert fetch(f"{base}/boot/ipxe?mac=52:54:00:b1:66:02", netns=ns)[0] == "404"
            key = SeedKey()
            key_file = tmp_path / "key.bin"
            key_file.write_bytes(key.public)
            sealed = subprocess.run(
                ["ip", "netns", "exec", ns, curl, "-sgf", "-m", "20", "--data-binary",
                 f"@{key_file}", token_url[1]], capture_output=True, check=True,
            ).stdout  # fmt: skip
            assert key.open(sealed) == (seeds / f"{MAC}.tar").read_bytes()
            again = fetch(token_url[1], "--data-binary", f"@{key_file}", netns=ns)
            assert again[0] == "404"  # single use
        finally:
            if pidfile.exists():  # the dhclient we started went to the background
                subprocess.run(["kill", pidfile.read_text().strip()], check=False)
            agent.kill()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
