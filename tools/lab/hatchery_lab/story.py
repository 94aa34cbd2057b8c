"""Hatchery's whole story in one run — `make demo` and the end-to-end test share it.

1. build (or reuse) hypervisor images v1 and v2 and the appliance VM image;
2. boot node A from v1 (direct kernel boot, blank data disk): /data is made, its agent starts;
3. node B, with only a blank data disk, PXE-boots from A (DHCP → iPXE → HTTP kernel+initrd,
   its seed from A) and comes up as a hypervisor;
4. through the agent API (mutual TLS), launch an appliance VM on B by direct kernel boot: it
   gets its address by DHCP and its identity from the metadata service;
5. ``hatchery-rollout`` upgrades A and B to v2 in live mode, 1 then 2 hosts, health-gated;
   the appliance VM keeps running throughout (same QEMU PID, uptime continuing);
6. a summary of every step.

Everything runs on a lab bridge the story creates and removes; guests run under TCG here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hatchery.client import ApiError
from hatchery.wire import MAX_LOG_LINES
from hatchery_lab.agent import Pki
from hatchery_lab.demo_images import build_version, signed, signing_key
from hatchery_lab.images import build_images
from hatchery_lab.node import (
    Lab,
    NodeSpec,
    RunningNode,
    boot_node,
    lab_network,
    seed_tar,
    serve_folder,
)

BIN = Path(sys.executable).parent
NODE_A = "52:54:00:de:00:0a"
NODE_B = "52:54:00:de:00:0b"


def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Step:
    title: str
    seconds: float
    outcome: str


@dataclass
class Story:
    workdir: Path
    say: Callable[[str], None] = _say
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[dict[str, str]]:
        self.say(f"\n==> {title}")
        started = time.monotonic()
        result = {"outcome": ""}
        yield result
        took = time.monotonic() - started
        self.steps.append(Step(title, took, result["outcome"]))
        self.say(f"    {result['outcome']} ({took:.0f} s)")

    def summary(self) -> str:
        lines = ["", "summary", f"  {'step':<58} {'took':>7}  outcome"]
        for s in self.steps:
            lines.append(f"  {s.title:<58} {s.seconds:6.0f}s  {s.outcome}")
        total = sum(s.seconds for s in self.steps)
        lines.append(f"  {'total':<58} {total:6.0f}s")
        lines.append(f"  logs, consoles and each node's agent log: {self.workdir}")
        return "\n".join(lines)


def _api(node: RunningNode, method: str, path: str, **kwargs: Any) -> Any:
    return asyncio.run(node.api(method, path, **kwargs))


def _publish(
    node: RunningNode,
    builds: dict[str, Path],
    pki: Pki,
    admin: Any,
    say: Callable[[str], None],
    base: Path,
) -> dict[str, dict[str, Any]]:
    """Publish the builds into the node's store in one command (at once, each shared object
    once), saying their size before and the time after; ``base``: the build the node runs
    (the others' initrds go as patches on its root image). The CLI's answer, by version."""
    size = sum(p.stat().st_size for b in builds.values() for p in b.iterdir() if p.is_file())
    names = " and ".join(builds)
    say(f"    {node.spec.name}: publishing {names} ({size / 1e6:.0f} MB) into its image store")
    argv = [str(BIN / "hatchery"), "image", "publish", *map(str, builds.values()), "--json",
            "--base", str(base), "--agent", node.address, "--ca", str(pki.ca), "--cert",
            str(admin.cert), "--key", str(admin.key)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - started
    answers = json.loads(done.stdout)
    answers = answers if isinstance(answers, list) else [answers]
    how = []
    for answer in answers:
        if answer.get("from_running_root"):
            how.append(f"{answer['version']}'s root image taken from the one the node runs")
        elif answer.get("patched_on_running_root"):
            how.append(f"{answer['version']}'s initrd as a patch on it")
    rate = size / 1e6 / max(took, 0.001)
    say(f"    {node.spec.name}: published {names} in {took:.0f} s "
        f"({rate:.1f} MB/s; {', '.join(how) or 'sent whole'})")  # fmt: skip
    return {answer["version"]: answer for answer in answers}


def _rollout(argv: list[str], log: Path, say: Callable[[str], None]) -> tuple[int, str]:
    """Run hatchery-rollout, echoing its plan and progress lines as they come."""
    lines: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip():
                say(f"    | {line.rstrip()}")
        status = proc.wait(timeout=3600)
    output = "".join(lines)
    log.write_text(output)
    return status, output


def _keep_agent_log(node: RunningNode) -> None:
    """Keep the node's agent log (its journal, through ``hatchery logs``) beside its console,
    whatever the story's outcome: a slow or failed step's evidence, read after the nodes are
    gone. Called while the node still runs."""
    path = node.console.parent / f"{node.spec.name}-agent.log"
    try:
        text = node.agent_log(MAX_LOG_LINES, "2h")
    except subprocess.TimeoutExpired as exc:  # never in the way of the story's own outcome
        text = f"(hatchery logs: {exc})"
    path.write_text(text)


def _wait_for_booted_image(
    node: RunningNode, version: str, answered: float, say: Callable[[str], None]
) -> bool:
    """Whether ``node``, born over the network, took ``version``, the image it runs, from
    its birth peer by itself (``hatchery.images.booted``) in time; ``answered``: when its
    agent first answered (``time.monotonic``)."""
    try:
        _wait(lambda: version in {i["version"] for i in _api(node, "GET", "/v1/images")["images"]},
              300, f"{node.spec.name} to take {version} from its birth peer")  # fmt: skip
    except TimeoutError:
        say(f"    {node.spec.name}: has not taken {version} from its birth peer; publish it "
            "(hatchery image publish)")  # fmt: skip
        return False
    took = time.monotonic() - answered
    say(f"    {node.spec.name}: holds {version}, taken from its birth peer around the root "
        f"image it runs (by {took:.0f} s after its agent answered)")  # fmt: skip
    return True


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(3)


def run_story(workdir: Path, say: Callable[[str], None] = _say) -> Story:
    story = Story(workdir, say)
    workdir.mkdir(parents=True, exist_ok=True)
    with story.step("1. build images v1, v2 and the appliance VM (cached)") as r:
        started = time.monotonic()
        say("    building the appliance VM image (cached by its inputs)")
        appliance = build_images("appliance-vm") / "appliance-vm"
        builds = {}
        for v in ("v1", "v2"):
            say(f"    building hypervisor {v} ({time.monotonic() - started:.0f} s so far)")
            builds[v] = build_version(v)
        say(f"    images ready ({time.monotonic() - started:.0f} s)")
        key = signing_key(workdir / "keys")
        for b in builds.values():
            signed(b, key)
        r["outcome"] = "hypervisor v1 and v2 (demo overlays), appliance VM; v1 and v2 signed"
    pki = Pki.make(workdir / "pki")
    admin = pki.client("admin", "admin")
    prefix = f"10.{random.randrange(200, 250)}.{random.randrange(0, 250)}"
    with contextlib.ExitStack() as stack:
        lab: Lab = stack.enter_context(lab_network(prefix))
        a_spec = NodeSpec("node-a", NODE_A, f"{prefix}.11", (f"{prefix}.100", f"{prefix}.119"),
                          memory_mib=2560)  # fmt: skip
        b_spec = NodeSpec("node-b", NODE_B, f"{prefix}.12", (f"{prefix}.120", f"{prefix}.139"),
                          memory_mib=3072)  # fmt: skip
        b_seed = seed_tar(b_spec, lab, pki, key.public.parent)
        a_seed = seed_tar(
            a_spec, lab, pki, key.public.parent,
            boot={"http_port": 8080, "births": {"start": f"{prefix}.50", "end": f"{prefix}.59"},
                  "cmdline": "console=ttyS0 panic=30"},
            extra={f"hatchery/seeds/{NODE_B}.tar": b_seed},
        )  # fmt: skip
        with story.step("2. boot node A from v1 (direct kernel boot, blank data disk)") as r:
            v1 = builds["v1"]
            node_a = stack.enter_context(boot_node(
                a_spec, lab, pki, workdir / "node-a", kernel=v1 / "hypervisor.vmlinuz",
                initrd=v1 / "hypervisor.cpio.zst", seed=a_seed,
            ))  # fmt: skip
            stack.callback(_keep_agent_log, node_a)  # before the node stops (LIFO)
            say(f"    node-a: QEMU started (pid {node_a.process.pid}), console in "
                f"{node_a.console}")  # fmt: skip
            health = node_a.wait_agent(900, version="v1", say=say)
            published = {f"a-{v}": answer for v, answer in
                         _publish(node_a, builds, pki, admin, say, base=v1).items()}  # fmt: skip
            story.facts["a_data"] = "hatchery-data" in node_a.console_text()
            r["outcome"] = f"agent up on {node_a.address}, version {health['version']}"
        with story.step("3. node B PXE-boots from node A's agent") as r:
            node_b = stack.enter_context(boot_node(b_spec, lab, pki, workdir / "node-b"))
            stack.callback(_keep_agent_log, node_b)
            say(f"    node-b: QEMU started (pid {node_b.process.pid}); PXE from node A "
                "(iPXE prints nothing on the serial console until the kernel runs)")  # fmt: skip
            health = node_b.wait_agent(1500, version="v1", say=say)
            answered = time.monotonic()
            # B takes v1, the image it runs, from A by itself (hatchery.images.booted):
            # only v2 is published, at once, while it does
            only_v2 = {"v2": builds["v2"]}
            for v, answer in _publish(node_b, only_v2, pki, admin, say, base=v1).items():
                published[f"b-{v}"] = answer
            story.facts["b_booted_v1"] = _wait_for_booted_image(node_b, "v1", answered, say)
            story.facts["published"] = published
            r["outcome"] = f"agent up on {node_b.address}, version {health['version']}, born from A"
        with story.step("4. appliance VM on node B through the API (mutual TLS)") as r:
            base = stack.enter_context(serve_folder(lab, appliance))
            vm = _api(node_b, "POST", "/v1/vms", json={
                "name": "app1", "memory_mib": 256,
                "kernel": {"kernel": f"{base}/appliance-vm.vmlinux",
                           "initrd": f"{base}/appliance-vm.cpio.lz4",
                           "cmdline": "console=ttyS0 quiet panic=-1"},
            })  # fmt: skip
            try:
                console = _wait(
                    lambda: (
                        (t := _api(node_b, "GET", "/v1/vms/app1/console"))
                        and "HATCHERY-APPLIANCE: ready" in t
                        and t
                    ),
                    1200,
                    "the appliance to be ready",
                )
            except TimeoutError:  # what the VM and node B's agent said, while it answers
                try:
                    tail = str(_api(node_b, "GET", "/v1/vms/app1/console"))[-3000:]
                except ApiError as exc:
                    tail = f"(not read: {exc})"
                say(f"    app1's console (its end):\n{tail}")
                say(f"    node-b: hatchery logs --since 30m\n{node_b.agent_log(200)}")
                raise
            lease = f"HATCHERY-APPLIANCE: lease {vm['ip']} " in console
            identity = f'"instanceId": "{vm["uuid"]}"' in console
            story.facts.update(vm=vm, vm_console=console, vm_lease=lease, vm_identity=identity)
            if not (lease and identity):  # what node B's agent saw, while it still answers
                say(f"    node-b: hatchery logs --since 10m\n{node_b.agent_log(60, '10m')}")
            held = vm.get("limits") or {}
            r["outcome"] = (
                f"vm app1 (pid {vm['pid']}): DHCP lease {vm['ip']} "
                f"{'ok' if lease else 'MISSING'}, its own identity from the metadata service "
                f"{'ok' if identity else 'MISSING'}; its QEMU held by the kernel to "
                f"{(held.get('memory_max') or 0) / 2**20:.0f} MiB and "
                f"{held.get('tasks_max')} tasks"
            )
        with story.step("5. hatchery-rollout: A and B to v2, live, 1 then 2 hosts") as r:
            fleet = workdir / "fleet.yaml"
            fleet.write_text(yaml.safe_dump({"hosts": [
                {"name": "node-a", "address": node_a.address, "location": "lab/rack1"},
                {"name": "node-b", "address": node_b.address, "location": "lab/rack2"},
            ]}))  # fmt: skip
            status, output = _rollout(
                [str(BIN / "hatchery-rollout"), "run", "--fleet", str(fleet), "--version", "v2",
                 "--mode", "live", "--journal", str(workdir / "rollout.jsonl"),
                 "--ca", str(pki.ca), "--cert", str(admin.cert), "--key", str(admin.key),
                 "--upgrade-timeout", "1500", "--health-timeout", "600",
                 "--progress-interval", "5"],
                workdir / "rollout.log", say,
            )  # fmt: skip
            if status != 0:
                logs = "".join(f"\n--- {node.spec.name}: hatchery logs --since 30m\n"
                               f"{node.agent_log()}" for node in (node_a, node_b))  # fmt: skip
                raise RuntimeError(f"the rollout failed:\n{output}{logs}")
            after = _api(node_b, "GET", "/v1/vms/app1")
            versions = [node.wait_agent(600)["version"] for node in (node_a, node_b)]
            restored, held, stayed = {}, {}, {}
            for node in (node_a, node_b):
                name = node.spec.name
                restored[name] = node.metric("hatchery_bridge_tables_restored_total")
                held[name] = node.metric('hatchery_bridge_held_rules{bridge="br0"}')
                stayed[name] = node.agent_log(lines=2000).count("their held copy stayed")
                say(f"    {name}: the patch restarted nftables.service, whose flush takes br0's "
                    f"VM port rules; the agent put them back {restored[name]:g} time(s), their "
                    f"held copy (which no flush takes) stayed {stayed[name]} time(s)")  # fmt: skip
            story.facts.update(vm_after=after, versions=versions, rollout=output,
                               tables_restored=restored, held_rules=held,
                               held_stayed=stayed)  # fmt: skip
            r["outcome"] = (f"versions {versions}; app1 {after['state']}, pid {after['pid']} "
                            f"(was {vm['pid']}), uptime {after['uptime']:.0f} s")  # fmt: skip
        story.facts["summary"] = [s.__dict__ for s in story.steps]
        (workdir / "story.json").write_text(json.dumps(story.facts, indent=2, default=str))
    say(story.summary())
    return story
