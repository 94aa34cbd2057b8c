"""Issue 14, tenant isolation: a hostile guest on the bridge, and the legitimate paths beside it.

A namespace of the test's own plays the node: a bridge, the agent's real metadata service
with the bridge's nft tables applied as the agent applies them (``hatchery_lab.isolation
node``), the agent's real boot HTTP and TFTP servers (``hatchery-agent serve http|tftp``) on
the bridge address with their real ports, an API stand-in behind the agent's mutual TLS on
6976, and later the agent's real DHCP server. Four namespaces on veths are plugged in: two
VMs ("rogue", "tenant": VM ports) and two that are not VMs ("victim", a node being birthed
over PXE; "peer", a node or operator on the boot network).

Each attack is shown refused with the rules, and then, with the rules removed, shown to
work: the test can tell a refused attack from one that never happened. Real peers wherever
one runs: dnsmasq as the rogue DHCP server, busybox udhcpc as the victim's client, the
victim's own kernel doing SLAAC and neighbour discovery, ping, curl (HTTP, HTTPS, TFTP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hatchery import pki
from hatchery.config import AgentConfig, BootServiceConfig, BridgeConfig
from hatchery.metadata.plumbing import Names
from hatchery.metadata.ruleset import Port, drops, link_local, table_name
from hatchery.metadata.service import node_services
from hatchery_lab.isolation import API_REPLY, CONTROL, ETHERTYPES, NodeSpec
from hatchery_lab.net import unique_name
from hatchery_lab.netenv import NetEnv, Service, boot_network

pytestmark = pytest.mark.timeout(300)

MD = "169.254.169.254"
OTHER_NODE_ADDRESS = "192.0.2.1"  # an address of the node's that is not on the bridge
ULA = "fd00:1ab::"
ROGUE_RANGE = (200, 209)
BIRTHS = (100, 109)
PXE_CLIENT = "PXEClient:Arch:00000:UNDI:002001"
UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
for v in ip router serverid boot_file; do eval "echo LEASE.$v=\\$$v"; done
"""


# A stand-in for the proxyDHCP port (udp/4011) on the node: prints who sent what.
PXE_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 4011))
print("listening", flush=True)
while True:
    print("from", s.recv(64).decode(), flush=True)
"""
# A stand-in for the node's DHCPv6 server (udp/547 on ff02::1:2, IPv6 births).
DHCP6_LISTENER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
group = socket.inet_pton(socket.AF_INET6, "ff02::1:2")
index = socket.if_nametoindex(sys.argv[1])
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + struct.pack("@I", index))
s.bind(("::", 547))
print("listening", flush=True)
while True:
    print("from", s.recv(64).decode(), flush=True)
"""
DHCP6_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 546))
s.sendto(sys.argv[1].encode(), ("ff02::1:2", 547, 0, socket.if_nametoindex("eth0")))
"""
PXE_SENDER = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[2].encode(), (sys.argv[1], 4011))
"""


@dataclass(frozen=True)
class Guest:
    name: str
    ns: str
    port: str
    mac: str
    ip: str | None

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def ok(self, *argv: str, timeout: float = 30) -> str:
        result = self.run(*argv, timeout=timeout)
        assert result.returncode == 0, f"{self.name}: {argv}: {result.stdout}{result.stderr}"
        return result.stdout

    def link_local(self) -> str:
        """The link-local address the guest's kernel made for itself."""
        out = self.ok("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
        return out.split("inet6 ", 1)[1].split("/", 1)[0]


@dataclass
class Lab:
    env: NetEnv
    tmp: Path
    rogue: Guest
    tenant: Guest
    victim: Guest
    peer: Guest
    tls: dict[str, Path]
    tools: dict[str, str]
    node: Service

    @property
    def server_ip(self) -> str:
        return self.env.server_ip

    def our_tables(self, held: bool = False) -> set[str]:
        """The bridge's two tables as ``tables`` lists them; ``held``: their held copy."""
        return {f"{f} {table_name(self.env.bridge, held)}" for f in ("bridge", "inet")}

    def release_held(self) -> None:
        """Remove the held copy of the rules (``metadata/held.py``): only the node's own
        libnftables session can, so the node ends it when told (SIGUSR1)."""
        self.node.process.send_signal(signal.SIGUSR1)
        _wait(lambda: not self.our_tables(held=True) & self.tables(), 10,
              "the node to release its held tables")  # fmt: skip

    def keeper_monitor(self) -> int:
        """The PID of the node's ``nft monitor`` (its table keeper's ears)."""
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if (int(stat.rsplit(")", 1)[1].split()[1]) == self.node.process.pid
                    and b"monitor" in argv):  # fmt: skip
                return int(entry.name)
        raise AssertionError("the node runs no nft monitor")

    def remove_rules(self) -> None:
        """Remove the held copy and empty the bridge's tables: the "without isolation" half
        of each test. Emptied, not deleted: the agent puts deleted tables back
        (``metadata/keeper.py``)."""
        self.release_held()
        table = table_name(self.env.bridge)
        empty = "".join(f"table {f} {table}\ndelete table {f} {table}\ntable {f} {table}\n"
                        for f in ("bridge", "inet"))  # fmt: skip
        subprocess.run(self.env.in_ns(["nft", "-f", "-"]), input=empty, text=True, check=True,
                       capture_output=True)  # fmt: skip

    def tables(self) -> set[str]:
        """The node namespace's nft tables (``family name``)."""
        listed = self.env.run("nft", "list", "tables").stdout
        return {line.removeprefix("table ").strip() for line in listed.splitlines() if line}

    def udhcpc(self, guest: Guest, *extra: str, tries: int = 3) -> dict[str, str]:
        """busybox udhcpc, ``tries`` DISCOVERs a second apart; the lease it would take."""
        script = self.tmp / "udhcpc.script"
        argv = [self.tools["udhcpc"], "-i", "eth0", "-f", "-q", "-n", "-t", str(tries), "-T",
                "1", "-s", str(script), *extra]  # fmt: skip
        out = guest.run(*argv, timeout=60)
        got = dict(
            line[len("LEASE.") :].split("=", 1)
            for line in out.stdout.splitlines()
            if line.startswith("LEASE.")
        )
        got["output"] = out.stdout + out.stderr
        return got

    def curl(self, guest: Guest, url: str, *extra: str, timeout: float = 2) -> str | None:
        """The body, or None when nothing answered within ``timeout`` seconds."""
        result = guest.run(self.tools["curl"], "-sS", "-m", str(timeout), *extra, url,
                           timeout=timeout + 20)  # fmt: skip
        return result.stdout if result.returncode == 0 else None

    def api(self, guest: Guest, host: str) -> str | None:
        t = self.tls
        return self.curl(guest, f"https://{host}:6976/", "--cacert", str(t["ca"]), "--cert",
                         str(t["cert"]), "--key", str(t["key"]))  # fmt: skip


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def _add_guest(env: NetEnv, name: str, mac: str, ip: str | None, ipv6: str | None) -> Guest:
    ns = env.add_client(name, mac)
    guest = Guest(name, ns, env.port_of(name), mac, ip)
    if ip is not None:
        guest.ok("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        guest.ok("ip", "route", "add", "default", "via", env.server_ip)
    if ipv6 is not None:
        guest.ok("ip", "-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad")
    return guest


@pytest.fixture
def lab(require_root: None, require_tool: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    tools = {t: require_tool(t) for t in ("nft", "curl", "udhcpc", "dnsmasq", "ping")}
    script = tmp_path / "udhcpc.script"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    root = tmp_path / "boot"
    root.mkdir()
    (root / "hello.txt").write_text("boot file\n")
    bridge = unique_name("hib")
    names = Names.for_bridge(bridge)
    try:
        with boot_network(tmp_path, bridge=bridge) as env:
            server_ip = env.server_ip
            ca = pki.init_ca(tmp_path / "ca")
            agent = pki.issue(tmp_path / "ca", "agent", tmp_path / "tls",
                              server_names=(server_ip, MD, OTHER_NODE_ADDRESS))  # fmt: skip
            client = pki.issue(tmp_path / "ca", "tenant", tmp_path / "tls")
            tls = {"ca": ca, "cert": client.cert, "key": client.key}
            s = env.subnet
            rogue = _add_guest(env, "rogue", "52:54:00:66:00:10", f"{s}.10", None)
            tenant = _add_guest(env, "tenant", "52:54:00:66:00:11", f"{s}.11", f"{ULA}11")
            victim = _add_guest(env, "victim", "52:54:00:77:00:01", None, None)
            peer = _add_guest(env, "peer", "52:54:00:77:00:02", f"{s}.2", f"{ULA}2")
            # The agent's own wiring decides what is closed: a node that births peers.
            config = AgentConfig(bridges=(BridgeConfig(bridge, boot=BootServiceConfig()),))
            spec = NodeSpec(
                bridge=bridge,
                subnets=(f"{s}.0/24",),
                ports=(
                    Port(rogue.port, rogue.mac, f"{s}.10"),
                    Port(tenant.port, tenant.mac, f"{s}.11", ipv6=(f"{ULA}11",)),
                ),
                services=node_services(config),
                tls=(str(tls["ca"]), str(agent.cert), str(agent.key)),
                api_port=config.listen_port,
            )
            spec.dump(tmp_path / "node.json")
            node = env.start("node", [sys.executable, "-m", "hatchery_lab.isolation", "node",
                                      str(tmp_path / "node.json")])  # fmt: skip
            node.wait_for("ready", timeout=30)
            http_port = BootServiceConfig().http_port
            boot_http = env.agent("http", "http", "--root", str(root),
                                  "--listen", f"{server_ip}:{http_port}")  # fmt: skip
            boot_http.wait_for("boot http: serving")
            tftp = env.agent("tftp", "tftp", "--root", str(root), "--listen", f"{server_ip}:69")
            tftp.wait_for("TFTP serving")
            guests = (rogue, tenant, victim, peer)
            _wait(lambda: all(not g.ok("ip", "-6", "addr", "show", "tentative") for g in guests),
                  10, "IPv6 duplicate address detection")  # fmt: skip
            yield Lab(env, tmp_path, rogue, tenant, victim, peer, tls, tools, node)
            node.stop()
            assert "Traceback" not in node.text(), node.text()
            listed = env.run("nft", "list", "tables").stdout
            assert table_name(bridge) not in listed, listed
            assert table_name(bridge, held=True) not in listed, listed
    finally:
        # The metadata namespace lives outside ours; it is gone even if the node was killed.
        subprocess.run(["ip", "netns", "del", names.netns], capture_output=True, check=False)
    assert names.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout  # fmt: skip


def _dropped(lab: Lab) -> dict[str, int]:
    """The bridge tables' drop counters by reason, both copies summed, as the agent reads
    them for /metrics (a frame either copy drops, the other never sees)."""
    total: dict[str, int] = {}
    for held in (False, True):
        table = table_name(lab.env.bridge, held)
        out = lab.env.run("nft", "-j", "list", "table", "bridge", table).stdout
        for reason, packets in drops(json.loads(out)).items():
            total[reason] = total.get(reason, 0) + packets
    return total


def _dnsmasq(lab: Lab) -> Service:
    """A rogue DHCP/PXE server in the rogue VM: it offers its own range, itself as router."""
    s, (lo, hi) = lab.env.subnet, ROGUE_RANGE
    argv = [lab.tools["dnsmasq"], "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--interface=eth0", "--bind-interfaces", "--user=root", "--group=root", "--no-ping",
            f"--dhcp-range={s}.{lo},{s}.{hi},255.255.255.0,1h", "--dhcp-authoritative",
            f"--dhcp-option=3,{lab.rogue.ip}", "--dhcp-boot=evil.kpxe",
            f"--dhcp-leasefile={lab.tmp / 'rogue.leases'}",
            f"--pid-file={lab.tmp / 'rogue.pid'}", "--log-dhcp", "--log-facility=-"]  # fmt: skip
    server = lab.env.start("rogue-dnsmasq", argv, ns=lab.rogue.ns)
    server.wait_for("DHCP, IP range")
    return server


def test_rogue_dhcp_server_cannot_answer_a_booting_node(lab: Lab) -> None:
    s = lab.env.subnet
    rogue = _dnsmasq(lab)
    # (a) The booting node asks; the rogue answers; the bridge drops the answer.
    got = lab.udhcpc(lab.victim, "-V", PXE_CLIENT)
    assert "ip" not in got, got
    assert "DHCPOFFER(eth0)" in rogue.text(), rogue.text()  # it did answer
    assert _dropped(lab)["dhcp-server"] >= 1  # and /metrics says why it was not heard
    # The node's own DHCP server births the same machine, with the rogue still answering.
    legit = _node_dhcp(lab)
    got = lab.udhcpc(lab.victim, "-V", PXE_CLIENT, tries=5)
    assert got.get("serverid") == lab.server_ip, got
    assert got.get("ip") == f"{s}.{BIRTHS[0]}", got
    # A VM's own DHCP client traffic (0.0.0.0:68 -> 67) passes: it gets its address.
    got = lab.udhcpc(lab.tenant, tries=5)
    assert (got.get("ip"), got.get("serverid")) == (lab.tenant.ip, lab.server_ip), got
    # Without the rules the rogue wins: this is the attack the rules stop.
    legit.stop()
    lab.remove_rules()
    got = lab.udhcpc(lab.victim, "-V", PXE_CLIENT, tries=5)
    assert got.get("serverid") == lab.rogue.ip, got
    assert got.get("router") == lab.rogue.ip and got.get("boot_file") == "evil.kpxe", got


def _node_dhcp(lab: Lab) -> Service:
    """The agent's real DHCP server on the bridge: the tenant's static lease and a birth range."""
    s = lab.env.subnet
    leases = lab.tmp / "leases.yaml"
    leases.write_text(f'"{lab.tenant.mac}": {{ip: {lab.tenant.ip}, hostname: tenant}}\n')
    server = lab.env.agent("dhcp", "dhcp", "--interface", lab.env.bridge, "--no-ra",
                           "--birth-range", f"{s}.{BIRTHS[0]}-{s}.{BIRTHS[1]}",
                           "--state-dir", str(lab.tmp / "dhcp"), "--leases", str(leases),
                           "--router", lab.server_ip)  # fmt: skip
    server.wait_for("dhcp: serving on")
    return server


def _offers_to(lab: Lab, guest: Guest, chaddr: str) -> list[str]:
    out = guest.ok(sys.executable, "-m", "hatchery_lab.isolation", "discover", "eth0", chaddr)
    return [line.split()[1] for line in out.splitlines() if line.startswith("offer ")]


def test_a_vm_cannot_ask_for_another_machines_lease(lab: Lab) -> None:
    """chaddr is the VM's own MAC: the DHCP server, which never sees the frame's source,
    cannot be asked for (or made to DECLINE) the tenant's address by another VM."""
    server = _node_dhcp(lab)
    assert _offers_to(lab, lab.rogue, lab.tenant.mac) == []
    assert _dropped(lab)["dhcp-chaddr"] == 1
    # The same packet with the sender's own chaddr passes (the rogue has no lease: a VM
    # port's own DISCOVER is not a network-boot client, so no birth offer either).
    got = lab.udhcpc(lab.tenant, tries=5)
    assert (got.get("ip"), got.get("serverid")) == (lab.tenant.ip, lab.server_ip), got
    assert _offers_to(lab, lab.tenant, lab.tenant.mac) == [lab.tenant.ip]
    # Without the rules the forged request is answered with the tenant's address.
    lab.remove_rules()
    assert _offers_to(lab, lab.rogue, lab.tenant.mac) == [lab.tenant.ip]
    server.stop()


def _ra(lab: Lab, prefix: str) -> None:
    lab.rogue.ok(sys.executable, "-m", "hatchery_lab.isolation", "ra", "eth0", prefix)


def test_router_advertisement_from_a_vm_is_not_seen(lab: Lab) -> None:
    prefix = "2001:db8:bad::"

    def configured() -> bool:
        addresses = lab.victim.ok("ip", "-6", "addr", "show", "dev", "eth0")
        routes = lab.victim.ok("ip", "-6", "route", "show", "default")
        return prefix in addresses or "default" in routes

    # (b) The victim's kernel accepts RAs (accept_ra=1, not forwarding) and would autoconfigure.
    assert lab.victim.ok("sysctl", "-n", "net.ipv6.conf.eth0.accept_ra").strip() == "1"
    _ra(lab, prefix + "/64")
    time.sleep(1.5)
    assert not configured(), lab.victim.ok("ip", "-6", "addr")
    lab.remove_rules()
    _ra(lab, prefix + "/64")
    _wait(configured, 10, "the victim to take the rogue's RA once the rules are gone")
    assert lab.rogue.link_local() in lab.victim.ok("ip", "-6", "route", "show", "default")


def _ping6(guest: Guest, target: str, *extra: str) -> bool:
    return guest.run("ping", "-6", "-n", "-c", "1", "-W", "2", *extra, target).returncode == 0


def _neighbour_mac(guest: Guest, address: str) -> str:
    out = guest.ok("ip", "-6", "neigh", "show", address, "dev", "eth0")
    return out.split("lladdr ", 1)[1].split()[0] if "lladdr " in out else ""


def test_ipv6_only_from_the_vms_own_addresses(lab: Lab) -> None:
    rogue_ll, tenant_ll, peer_ll = (g.link_local() for g in (lab.rogue, lab.tenant, lab.peer))
    na = (sys.executable, "-m", "hatchery_lab.isolation", "na", "eth0", tenant_ll)
    # (c) The kernel's own link-local address is the one the rules derive from the MAC.
    assert rogue_ll == link_local(lab.rogue.mac)
    assert _ping6(lab.rogue, f"{peer_ll}%eth0"), "link-local from the VM's own MAC must pass"
    assert _ping6(lab.tenant, f"{ULA}2", "-I", f"{ULA}11"), "its pool address must pass"
    # Neighbour spoofing: the rogue, from its own address, claims the tenant's for its MAC.
    assert _ping6(lab.peer, f"{tenant_ll}%eth0")
    assert _neighbour_mac(lab.peer, tenant_ll) == lab.tenant.mac
    lab.rogue.ok(*na)
    time.sleep(0.5)
    assert _neighbour_mac(lab.peer, tenant_ll) == lab.tenant.mac
    # Spoofed sources: a pool address that is not the tenant's; a link-local address that is
    # not the rogue's (its own removed, so the kernel cannot pick it).
    lab.tenant.ok("ip", "-6", "addr", "add", f"{ULA}66/64", "dev", "eth0", "nodad")
    assert not _ping6(lab.tenant, f"{ULA}2", "-I", f"{ULA}66")
    lab.rogue.ok("ip", "-6", "addr", "del", f"{rogue_ll}/64", "dev", "eth0")
    lab.rogue.ok("ip", "-6", "addr", "add", "fe80::66/64", "dev", "eth0", "nodad")
    assert not _ping6(lab.rogue, f"{peer_ll}%eth0")
    # Without the rules every one of them gets through.
    lab.remove_rules()
    assert _ping6(lab.tenant, f"{ULA}2", "-I", f"{ULA}66")
    assert _ping6(lab.rogue, f"{peer_ll}%eth0")
    lab.rogue.ok(*na)
    _wait(lambda: _neighbour_mac(lab.peer, tenant_ll) == lab.rogue.mac, 5,
          "the peer to believe the rogue's advertisement")  # fmt: skip


def test_node_services_are_closed_to_vms_and_open_to_other_ports(lab: Lab) -> None:
    http_port = BootServiceConfig().http_port
    boot_http = f"http://{lab.server_ip}:{http_port}/artefacts/hello.txt"
    tftp = f"tftp://{lab.server_ip}/hello.txt"
    # (d) From VM ports: no boot HTTP, no TFTP, no API on the node's bridge address...
    for vm in (lab.rogue, lab.tenant):
        assert lab.curl(vm, boot_http) is None, vm.name
        assert lab.curl(vm, tftp) is None, vm.name
        assert lab.api(vm, lab.server_ip) is None, vm.name
        # ...while the metadata service, and the API through it, still answer.
        local = lab.curl(vm, f"http://{MD}/latest/meta-data/local-ipv4", timeout=10)
        assert local == vm.ip, (vm.name, local)
        assert lab.api(vm, MD) == API_REPLY, vm.name
    # From a port that is not a VM's, the same services answer.
    assert lab.curl(lab.peer, boot_http, timeout=10) == "boot file\n"
    assert lab.curl(lab.peer, tftp, timeout=10) == "boot file\n"
    assert lab.api(lab.peer, lab.server_ip) == API_REPLY
    # Any address of the node will do for the API (it listens on 0.0.0.0, and Linux takes a
    # packet for any local address on any interface): closed to VMs on that one too.
    lab.env.run("ip", "addr", "add", f"{OTHER_NODE_ADDRESS}/32", "dev", "lo")
    assert lab.api(lab.peer, OTHER_NODE_ADDRESS) == API_REPLY
    assert lab.api(lab.rogue, OTHER_NODE_ADDRESS) is None
    # proxyDHCP's udp/4011: a VM's request (a MAC and its own address) never reaches it.
    listener = lab.env.start("pxe-4011", [sys.executable, "-c", PXE_LISTENER, lab.server_ip])
    listener.wait_for("listening")
    for guest in (lab.rogue, lab.peer):
        guest.ok(sys.executable, "-c", PXE_SENDER, lab.server_ip, guest.name)
    time.sleep(1)
    assert "from peer" in listener.text() and "from rogue" not in listener.text()
    # DHCPv6 (udp/547, IPv6 births): a VM's Solicit never reaches the node's server.
    dhcp6 = lab.env.start("dhcp6-547", [sys.executable, "-c", DHCP6_LISTENER, lab.env.bridge])
    dhcp6.wait_for("listening")
    for guest in (lab.rogue, lab.peer):
        guest.ok(sys.executable, "-c", DHCP6_SENDER, guest.name)
    time.sleep(1)
    assert "from peer" in dhcp6.text() and "from rogue" not in dhcp6.text()
    # The rules, not routing or the servers, kept the VM out.
    lab.remove_rules()
    lab.rogue.ok(sys.executable, "-c", PXE_SENDER, lab.server_ip, "rogue")
    lab.rogue.ok(sys.executable, "-c", DHCP6_SENDER, "rogue")
    time.sleep(1)
    assert "from rogue" in listener.text()
    assert "from rogue" in dhcp6.text()
    listener.stop()
    dhcp6.stop()
    assert lab.curl(lab.rogue, boot_http, timeout=10) == "boot file\n"
    assert lab.api(lab.rogue, lab.server_ip) == API_REPLY


def _frames_seen(lab: Lab) -> set[str]:
    """What the peer receives when the rogue broadcasts one frame of each ethertype."""
    sniffer = lab.env.start("sniffer", [sys.executable, "-m", "hatchery_lab.isolation", "sniff",
                                        "eth0", "2"], ns=lab.peer.ns)  # fmt: skip
    sniffer.wait_for("listening")
    lab.rogue.ok(sys.executable, "-m", "hatchery_lab.isolation", "frames", "eth0")
    sniffer.process.wait(timeout=20)
    lab.env.services.remove(sniffer)
    line = next(x for x in sniffer.text().splitlines() if x.startswith("seen:"))
    return set(line.split()[1:])


def test_only_ipv4_arp_and_ipv6_leave_a_vm_port(lab: Lab) -> None:
    # The kernel here has no 802.1Q module, so tagged frames are built by hand (raw socket).
    assert _frames_seen(lab) == {CONTROL}
    lab.remove_rules()
    assert _frames_seen(lab) == {CONTROL, *ETHERTYPES}


def _flush_unheard(lab: Lab) -> None:
    """A real ``nft flush ruleset`` in the node's namespace (the test's own), with the node's
    keeper deaf meanwhile (its ``nft monitor`` stopped), so what the flush left can be
    looked at before anything is put back."""
    lab.env.run("nft", "add", "table", "inet", "operators_own")
    lab.env.run("nft", "flush", "ruleset")
    tables = lab.tables()
    assert not lab.our_tables() & tables, tables  # the flush was real
    assert "inet operators_own" not in tables, tables


def test_a_flush_of_the_ruleset_never_opens_a_vm_port(lab: Lab) -> None:
    """``systemctl reload nftables`` (Debian's nftables.conf begins with ``flush ruleset``),
    its restart or stop, or an operator's own flush delete every table, the agent's too,
    while the VMs keep running. The held copy of the rules (``metadata/held.py``) is passed
    by, so the rogue VM's frames of every ethertype stay refused while the agent's keeper
    has not put the ordinary tables back; then it does. Without the held copy (as before
    it), the same flush lets them through until the keeper acts."""
    assert lab.our_tables() | lab.our_tables(held=True) <= lab.tables()
    monitor = lab.keeper_monitor()
    os.kill(monitor, signal.SIGSTOP)
    try:
        _flush_unheard(lab)
        assert lab.our_tables(held=True) <= lab.tables()
        assert _frames_seen(lab) == {CONTROL}  # refused by the held copy alone
        assert not lab.our_tables() & lab.tables()  # the ordinary tables were still gone
        refused = lab.env.run("nft", "delete", "table", "bridge",
                              table_name(lab.env.bridge, held=True), check=False)  # fmt: skip
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    finally:
        os.kill(monitor, signal.SIGCONT)
    _wait(lambda: lab.our_tables() <= lab.tables(), 20, "the agent to put its tables back")
    assert "held copy stayed" in lab.node.text()
    assert _frames_seen(lab) == {CONTROL}
    # Without the held copy: the flush opens the port until the keeper hears of it.
    lab.release_held()
    os.kill(monitor, signal.SIGSTOP)
    try:
        _flush_unheard(lab)
        assert _frames_seen(lab) == {CONTROL, *ETHERTYPES}
    finally:
        os.kill(monitor, signal.SIGCONT)
    _wait(lambda: lab.our_tables() | lab.our_tables(held=True) <= lab.tables(), 20,
          "the agent to put its tables and their held copy back")  # fmt: skip
    assert _frames_seen(lab) == {CONTROL}


def _flood(guest: Guest, *argv: str) -> list[int]:
    out = guest.ok(sys.executable, "-m", "hatchery_lab.isolation", *argv, timeout=60)
    return [int(word) for word in out.split() if word.isdigit()]


def test_a_vm_flooding_the_agent_is_held_to_its_rate(lab: Lab) -> None:
    """A VM sends 3000 DISCOVERs and 200 router solicitations at once and opens metadata
    connections as fast as it can: its port's buckets let ``DHCP_RATE``, ``RS_RATE`` and
    ``METADATA_RATE`` through, the rest is dropped on the bridge (and counted); a node being
    birthed gets its lease meanwhile and another VM's metadata answers. Without the rules
    the agent answers as much of the flood as it keeps up with."""
    legit = _node_dhcp(lab)
    started = time.monotonic()
    sent, offers = _flood(lab.tenant, "dhcp-flood", "eth0", lab.tenant.mac, "3000")
    elapsed = time.monotonic() - started
    assert sent == 3000
    assert 1 <= offers <= 20 + 10 * elapsed + 5, (offers, elapsed)  # burst + rate x time
    assert _dropped(lab)["dhcp-rate"] >= 3000 - offers - 30
    got = lab.udhcpc(lab.victim, "-V", PXE_CLIENT, tries=5)
    assert got.get("ip") == f"{lab.env.subnet}.{BIRTHS[0]}", got

    started = time.monotonic()
    _flood(lab.rogue, "rs-flood", "eth0", "200")
    allowed = 10 + 2 * (time.monotonic() - started) + 2  # burst + rate x time
    assert _dropped(lab)["rs-rate"] >= 200 - allowed, _dropped(lab)

    (connected,) = _flood(lab.rogue, "connect-flood", MD, "80", "2")
    assert 1 <= connected <= 200 + 50 * 4, connected  # burst + rate x (flood + SYN retries)
    assert _dropped(lab)["metadata-rate"] > 0
    local = lab.curl(lab.tenant, f"http://{MD}/latest/meta-data/local-ipv4", timeout=10)
    assert local == lab.tenant.ip, local

    lab.remove_rules()
    _, unlimited = _flood(lab.tenant, "dhcp-flood", "eth0", lab.tenant.mac, "3000")
    assert unlimited >= 5 * offers, (unlimited, offers)  # as many as the agent keeps up with
    legit.stop()
