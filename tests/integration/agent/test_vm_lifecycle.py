"""Issue 6 acceptance: real QEMU VMs through the CLI over mutual TLS, outliving the agent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hatchery.metadata.service import teardown_bridge
from hatchery.vms import limits
from hatchery_lab.agent import (
    AgentProcess,
    Pki,
    bridge_config,
    free_port,
    qemu_alive,
)
from hatchery_lab.cpio_writer import Entry
from hatchery_lab.guest import (
    INIT_PRELUDE,
    VIRTIO_NET_MODULES,
    GuestKernel,
    busybox_initramfs,
    find_guest_kernel,
)
from hatchery_lab.net import bridge
from hatchery_lab.vmns import ns_vm
from tests.conftest import missing

# The guest asks the agent's DHCP server for its address, then its identity from the
# metadata service, and prints both on its serial console.
GUEST_INIT = INIT_PRELUDE + (
    r"""
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
echo "GUEST-UP mac=$(cat /sys/class/net/eth0/address)"
udhcpc -i eth0 -q -n -t 20 -T 1 -s /bin/lease
request='GET /latest/dynamic/instance-identity/document HTTP/1.0\r\n\r\n'
i=0; while [ $i -lt 30 ]; do
  doc="$(printf "$request" | nc -w 3 169.254.169.254 80 | tail -n 1)"
  case "$doc" in *instanceName*) echo "METADATA $doc"; break;; esac
  sleep 1; i=$((i+1))
done
while true; do sleep 60; done
"""
)

LEASE_SCRIPT = r"""#!/bin/sh
case "$1" in
bound|renew)
  ip addr add "$ip/$mask" dev "$interface"
  [ -n "$router" ] && ip route add default via "${router%% *}"
  echo "LEASE ip=$ip mask=$mask router=$router lease=$lease"
  ;;
esac
"""


@pytest.fixture
def lab(tmp_path: Path, require_root: None, require_tool: Callable[[str], str]) -> Iterator[dict]:
    require_tool("qemu-system-x86_64")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    assert isinstance(kernel, GuestKernel)
    octet = random.randrange(16, 250)
    subnet = f"10.{octet}.77"
    artefacts = tmp_path / "artefacts"  # VM sources come from artefact folders, not anywhere
    artefacts.mkdir()
    initrd = artefacts / "initrd"
    modules = [kernel.module(m) for m in VIRTIO_NET_MODULES]
    lease = Entry.file("bin/lease", LEASE_SCRIPT.encode(), 0o755)
    initrd.write_bytes(busybox_initramfs(GUEST_INIT, modules=modules, files=[lease]))
    pki_ = Pki.make(tmp_path / "pki")
    with bridge(f"{subnet}.1/24") as br:
        agent = AgentProcess.configure(
            tmp_path, pki_, [bridge_config(br, subnet)],
            vm_sources={"folders": [str(kernel.vmlinux().parent), str(artefacts)]},
        )  # fmt: skip
        agent.start()
        try:
            yield {"agent": agent, "kernel": kernel.vmlinux(), "initrd": initrd, "subnet": subnet,
                   "bridge": br}  # fmt: skip
        finally:
            agent.kill_with_vms()
            for link in subprocess.run(
                ["ip", "-o", "link"], capture_output=True, text=True
            ).stdout.splitlines():
                name = link.split(": ")[1].split("@")[0]
                if name.startswith("hv-") and f"master {br}" in link:
                    subprocess.run(["ip", "link", "del", name], check=False)
            asyncio.run(teardown_bridge(br))


def _wait_console(agent: AgentProcess, name: str, marker: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = agent.cli("vm", "console", name).stdout
        if marker in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} on {name}'s console:\n{text[-2000:]}")
        time.sleep(1)


def _ping(ip: str) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "3", ip], capture_output=True).returncode == 0


def _create(lab: dict, name: str) -> dict:
    return lab["agent"].cli_json(
        "vm", "create", name, "--kernel", str(lab["kernel"]), "--initrd", str(lab["initrd"]),
        "--cmdline", "console=ttyS0 quiet", "--memory", "192",
    )  # fmt: skip


def test_vm_outlives_agent_and_is_readopted(lab: dict, require_tool: Callable[[str], str]) -> None:
    require_tool("ping")
    agent: AgentProcess = lab["agent"]
    ip = f"{lab['subnet']}.10"
    vm = _create(lab, "app1")
    assert vm["state"] == "running" and vm["ip"] == ip
    pid = vm["pid"]
    console = _wait_console(agent, "app1", "GUEST-UP")
    assert f"mac={vm['mac']}" in console
    # Its address comes from the agent's DHCP server, out of the pool.
    console = _wait_console(agent, "app1", "LEASE ")
    assert f"LEASE ip={ip} mask=24 router={lab['subnet']}.1 lease=3600" in console
    # The guest reads its identity from the metadata service, through the bridge redirect.
    console = _wait_console(agent, "app1", "METADATA ")
    doc = json.loads(console.split("METADATA ", 1)[1].splitlines()[0])
    assert (
        doc["instanceName"] == "app1" and doc["privateIp"] == ip and doc["instanceId"] == vm["uuid"]
    )
    assert _ping(ip), "the guest does not answer on the bridge"

    agent.kill()  # SIGKILL: no chance to clean up
    assert qemu_alive(pid), "killing the agent stopped the VM"
    assert _ping(ip), "the guest stopped answering while the agent was down"

    agent.start()
    listed = {v["name"]: v for v in agent.cli_json("vm", "list")["vms"]}
    assert listed["app1"]["state"] == "running" and listed["app1"]["pid"] == pid
    # A graceful stop of the agent (what a unit restart or a live patch does) leaves it too.
    agent.kill(signal.SIGTERM)
    assert qemu_alive(pid), "stopping the agent stopped the VM"
    agent.start()
    # A direct kernel boot runs on qboot, recorded for the VM's life (``qemu.firmware``);
    # the guest above found its way and its identity with it.
    assert agent.cli_json("vm", "show", "app1")["firmware"] == "qboot"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-bios") + 1] == b"/usr/share/qemu/qboot.rom"
    # QEMU runs under its seccomp filter (mode 2), in a session of its own.
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Seccomp:\t2" in status, status
    assert os.getsid(pid) == pid

    stopped = agent.cli_json("vm", "stop", "app1", "--timeout", "3")
    assert stopped["state"] == "stopped"
    assert not qemu_alive(pid)
    agent.cli("vm", "destroy", "app1")
    pool = agent.cli_json("pool", "list")
    assert pool["free"] == pool["total"] == 2
    assert agent.cli_json("vm", "list")["vms"] == []


# A web server for VM sources that is not on the node: it runs in a namespace on the lab's
# bridge. ``/to/<path>`` redirects to ``<path>`` on the same server; ``/away`` redirects to
# the node's own API on loopback, which the agent must refuse to follow.
SOURCE_SERVER = r"""
import http.server, sys
port, away = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/to/") or self.path == "/away":
            self.send_response(302)
            self.send_header("Location", away if self.path == "/away" else self.path[3:])
            self.end_headers()
            return
        super().do_GET()
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"""


def test_vm_killed_while_agent_down_is_crashed(lab: dict, tmp_path: Path) -> None:
    """Also: the kernel and initrd come by URL (the agent downloads them into the VM folder),
    from a server off the node, through a redirect; URLs to the node itself are refused."""
    agent: AgentProcess = lab["agent"]
    served = tmp_path / "served"
    served.mkdir()
    (served / "vmlinux").write_bytes(Path(lab["kernel"]).read_bytes())
    (served / "initrd").write_bytes(Path(lab["initrd"]).read_bytes())
    port = free_port()
    subnet = lab["subnet"]
    with ns_vm(lab["bridge"], "52:54:00:5e:00:32", f"{subnet}.50") as ns:
        web = subprocess.Popen(
            ["ip", "netns", "exec", ns.netns, sys.executable, "-c", SOURCE_SERVER, str(port),
             f"http://127.0.0.1:{agent.port}/healthz"],
            cwd=served, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(1)
            base = f"http://{subnet}.50:{port}"
            for refused in (f"{base}/away", f"http://127.0.0.1:{agent.port}/healthz",
                            f"http://{subnet}.1:{agent.port}/healthz"):  # fmt: skip
                answer = agent.cli("vm", "create", "bad", "--kernel", f"{base}/vmlinux",
                                   "--initrd", refused, check=False)  # fmt: skip
                assert answer.returncode == 1 and "HTTP 400" in answer.stderr, answer.stderr
                assert "refused" in answer.stderr, answer.stderr
            vm = agent.cli_json("vm", "create", "app2", "--kernel", f"{base}/to/vmlinux",
                                "--initrd", f"{base}/initrd", "--cmdline", "console=ttyS0 quiet",
                                "--memory", "192")  # fmt: skip
        finally:
            web.kill()
            web.wait()
    assert vm["kernel_boot"]["kernel"].endswith("/vms/app2/kernel")
    _wait_console(agent, "app2", "GUEST-UP")
    agent.kill()
    os.kill(vm["pid"], 9)
    time.sleep(0.5)
    agent.start()
    shown = agent.cli_json("vm", "show", "app2")
    assert shown["state"] == "crashed"
    assert "agent was down" in shown["reason"]
    health = agent.cli_json("health")
    assert health["healthy"] is False and health["checks"]["vms"].startswith("fail")
    agent.cli("vm", "destroy", "app2")
    assert agent.cli_json("pool", "list")["free"] == 2


# A source server that stalls: it promises a large file, sends a little, then nothing.
STALLING_SERVER = r"""
import http.server, sys, time
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        self.wfile.write(b"\0" * 65536)
        self.wfile.flush()
        time.sleep(600)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


def test_agent_killed_mid_download_leaves_nothing_behind(lab: dict, tmp_path: Path) -> None:
    """Issue 14: a create holds its address and capacity in a persisted ``creating`` record
    from the start; an agent SIGKILLed while downloading frees both at its next start, and
    the name can be created again."""
    agent: AgentProcess = lab["agent"]
    subnet = lab["subnet"]
    port = free_port()
    with ns_vm(lab["bridge"], "52:54:00:5e:00:33", f"{subnet}.51") as ns:
        web = subprocess.Popen(
            ["ip", "netns", "exec", ns.netns, sys.executable, "-c", STALLING_SERVER, str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(1)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                create = pool.submit(agent.cli, "vm", "create", "slow1", "--kernel",
                                     f"http://{subnet}.51:{port}/vmlinux", "--no-start",
                                     check=False)  # fmt: skip
                folder = agent.state_dir / "vms" / "slow1"
                try:
                    deadline = time.monotonic() + 60
                    while not (folder / "kernel.part").exists():  # downloading
                        assert time.monotonic() < deadline, "the download never started"
                        assert not create.done(), create.result().stderr
                        time.sleep(0.2)
                    listed = agent.cli_json("vm", "list")["vms"]
                    assert [(v["name"], v["state"]) for v in listed] == [("slow1", "creating")]
                    assert agent.cli_json("pool", "list")["free"] == 1
                finally:
                    agent.kill()  # SIGKILL in the middle of the download
                assert create.result().returncode != 0
        finally:
            web.kill()
            web.wait()
    agent.start()
    assert agent.cli_json("vm", "list")["vms"] == []
    assert agent.cli_json("pool", "list")["free"] == 2
    assert not folder.exists()
    assert "vm slow1: removed, the agent stopped while creating it" in agent.log_path.read_text()
    vm = agent.cli_json("vm", "create", "slow1", "--kernel", str(lab["kernel"]), "--no-start")
    assert vm["state"] == "stopped" and vm["ip"] == f"{subnet}.10"
    agent.cli("vm", "destroy", "slow1")


def test_refusals_change_nothing(
    lab: dict, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    curl = require_tool("curl")
    agent: AgentProcess = lab["agent"]
    url = f"https://127.0.0.1:{agent.port}/v1/vms"
    # No client certificate: the TLS handshake fails.
    no_cert = subprocess.run([curl, "-sS", "--cacert", str(agent.pki.ca), url],
                             capture_output=True, text=True)  # fmt: skip
    assert no_cert.returncode != 0
    # A certificate from another CA: refused too.
    other = Pki.make(tmp_path / "other")
    stranger = other.client("mallory", "admin")
    foreign = subprocess.run(
        [curl, "-sS", "--cacert", str(agent.pki.ca), "--cert", str(stranger.cert),
         "--key", str(stranger.key), url], capture_output=True, text=True,
    )  # fmt: skip
    assert foreign.returncode != 0
    # A valid certificate without the group: 403, nothing created.
    agent.pki.client("eve", "visitors")
    denied = agent.cli("vm", "create", "evil", "--kernel", str(lab["kernel"]), client="eve",
                       check=False)  # fmt: skip
    assert denied.returncode == 1 and "HTTP 403" in denied.stderr and "may not" in denied.stderr
    assert agent.cli_json("vm", "list")["vms"] == []

    # Beyond capacity: refused, naming memory; the pool is untouched.
    big = agent.cli("vm", "create", "huge", "--kernel", str(lab["kernel"]), "--memory",
                    str(1024 * 1024), check=False)  # fmt: skip
    assert big.returncode == 1 and "memory" in big.stderr and "capacity" in big.stderr
    # A kernel QEMU cannot load: refused at once with QEMU's own words, the VM stopped.
    junk = Path(lab["initrd"]).parent / "junk"
    junk.write_bytes(b"not a kernel")
    started = time.monotonic()
    failed = agent.cli("vm", "create", "junk", "--kernel", str(junk), check=False)
    assert failed.returncode == 1 and "cannot start vm junk" in failed.stderr, failed.stderr
    assert time.monotonic() - started < 8, "the failed start was not noticed at once"
    shown = agent.cli_json("vm", "show", "junk")
    assert shown["state"] == "stopped" and shown["reason"].startswith("start failed:"), shown
    agent.cli("vm", "destroy", "junk")
    # Malformed input: 400 naming the field.
    bad = agent.cli("vm", "create", "Bad_Name", "--kernel", str(lab["kernel"]), check=False)
    assert bad.returncode == 1 and "bad vm name" in bad.stderr
    assert agent.cli_json("pool", "list")["free"] == 2

    # An empty pool: refused with a clear message.
    for name in ("p1", "p2"):
        agent.cli("vm", "create", name, "--kernel", str(lab["kernel"]), "--initrd",
                  str(lab["initrd"]), "--no-start")  # fmt: skip
    empty = agent.cli("vm", "create", "p3", "--kernel", str(lab["kernel"]), check=False)
    assert empty.returncode == 1 and "no free address" in empty.stderr
    assert [v["name"] for v in agent.cli_json("vm", "list")["vms"]] == ["p1", "p2"]


def _as_uid(uid: int, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with exactly the credentials a VM's QEMU has (and its working folder)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", "--no-new-privs", "--", *argv],
        cwd=cwd, capture_output=True, text=True, errors="replace", timeout=30,
    )  # fmt: skip


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_each_vm_qemu_runs_as_its_own_user(lab: dict, require_tool: Callable[[str], str]) -> None:
    """Issue 14: a guest that escapes into QEMU holds a uid of its VM's own, no capability,
    no_new_privs and the seccomp filter; it reaches its own files and nothing of another
    VM's or the agent's. The VM still boots and gets its lease; an agent restart, stop and
    destroy still work."""
    require_tool("setpriv")
    agent: AgentProcess = lab["agent"]
    vms = agent.state_dir / "vms"
    first = _create(lab, "own1")
    # Created without starting (like a record of an older agent): no uid yet, it gets one
    # at its first start, and its files are handed over then.
    agent.cli("vm", "create", "own2", "--kernel", str(lab["kernel"]), "--initrd",
              str(lab["initrd"]), "--cmdline", "console=ttyS0 quiet", "--memory", "192",
              "--no-start")  # fmt: skip
    shown = agent.cli_json("vm", "show", "own2")
    assert shown["uid"] is None and (vms / "own2" / "kernel").stat().st_uid == 0
    # A tap of its name left without an owner (which any uid could attach to): remade.
    stale = f"hv-{shown['uuid'].replace('-', '')[:12]}"
    subprocess.run(["ip", "tuntap", "add", "dev", stale, "mode", "tap"], check=True)
    try:
        second = agent.cli_json("vm", "start", "own2")
    except AssertionError:
        subprocess.run(["ip", "link", "del", stale], check=False)
        raise
    uids = [vm["uid"] for vm in (first, second)]
    assert uids == [0x7FF00000, 0x7FF00001], uids  # the lowest free of the default range
    for vm in (first, second):
        uid, gid = vm["uid"], vm["uid"]
        status = _status(vm["pid"])
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]  # real, eff, saved, fs
        assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        assert int(status["CapBnd"], 16) == int(status["CapInh"], 16) == 0
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        tap = f"hv-{vm['uuid'].replace('-', '')[:12]}"
        assert Path(f"/sys/class/net/{tap}/owner").read_text().strip() == str(uid)
        folder = vms / vm["name"]
        st = folder.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o710)
        run = (folder / "run").stat()  # the agent's: QEMU has its sockets and log by fd
        assert (run.st_uid, run.st_mode & 0o777) == (0, 0o700)
        assert (limits.applied(vm["pid"]) or {}).get("file_max") == limits.FILE_FLOOR
        record = (folder / "vm.json").stat()
        assert (record.st_uid, record.st_mode & 0o777) == (0, 0o600)
    _wait_console(agent, "own1", "LEASE ")  # it boots and gets its address as before

    # What QEMU of own1 can reach, tried with its credentials from its working folder.
    own1, own2 = vms / "own1", vms / "own2"
    uid1 = uids[0]
    assert _as_uid(uid1, "cat", "kernel", cwd=own1).returncode == 0  # its own kernel
    secrets = (str(own2 / "kernel"), str(agent.pki.server.key), str(agent.config_path))
    for path in ("vm.json", "qemu.log", "run/console.log", "../own2/kernel",
                 "../own2/run/console.log", *secrets):  # fmt: skip
        denied = _as_uid(uid1, "cat", path, cwd=own1)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, (path, denied)
    # no folder of its own on the data disk either: nothing to fill it with
    for argv in (["sh", "-c", "echo '{}' > vm.json"], ["touch", "planted"],
                 ["touch", "run/mine"], ["touch", "../own2/run/planted"]):  # fmt: skip
        assert _as_uid(uid1, *argv, cwd=own1).returncode != 0, argv
    # The console log is read without following a link QEMU could plant there.
    (own1 / "run" / "console.log").rename(own1 / "run" / "old.log")
    (own1 / "run" / "console.log").symlink_to(agent.pki.server.key)
    assert "PRIVATE KEY" not in agent.cli("vm", "console", "own1").stdout

    agent.kill()  # a restarted agent re-adopts both, through their sockets in run/
    agent.start()
    listed = {v["name"]: v for v in agent.cli_json("vm", "list")["vms"]}
    assert [listed[n]["state"] for n in ("own1", "own2")] == ["running", "running"]
    assert listed["own1"]["pid"] == first["pid"] and listed["own1"]["uid"] == uid1
    assert agent.cli_json("vm", "stop", "own1", "--timeout", "1")["state"] == "stopped"
    assert not qemu_alive(first["pid"])
    again = agent.cli_json("vm", "start", "own1")  # the same uid for life
    assert again["uid"] == uid1 and _status(again["pid"])["Uid"].split()[0] == str(uid1)
    for name in ("own1", "own2"):
        agent.cli("vm", "destroy", name)
    assert agent.cli_json("vm", "list")["vms"] == []
