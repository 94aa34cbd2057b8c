"""Issue 4: the whole story, as `make demo` runs it, with each step's observable result."""

from __future__ import annotations

import re
from pathlib import Path

from hatchery.config import VmIsolationConfig
from hatchery.qemu.accel import TCG_CODE_CACHE_MIB
from hatchery.vms.limits import FILE_FLOOR, MIB, TASKS_BASE
from hatchery_lab.images import build_images
from hatchery_lab.story import run_story


def test_the_whole_story(images: Path, tmp_path: Path) -> None:
    story = run_story(tmp_path / "story")
    facts = story.facts
    assert [s.title[:2] for s in story.steps] == ["1.", "2.", "3.", "4.", "5."]
    assert facts["vm_lease"], "the appliance VM got no DHCP lease from node B's agent"
    assert facts["vm_identity"], "the appliance VM got no identity from the metadata service"
    assert facts["versions"] == ["v2", "v2"]
    # each node's store took v1 around the root image it runs, and v2's initrd as a patch on
    # it (images.running_root): neither was uploaded whole. Node A's v1 came so in the
    # publish; node B, born from A, took v1 from A's boot service by itself (images.booted),
    # while only v2 was published into it.
    assert facts["published"]["a-v1"]["from_running_root"] == ["hypervisor.cpio.zst"]
    assert "b-v1" not in facts["published"] and facts["b_booted_v1"], facts["published"]
    for node in ("a", "b"):
        v2 = facts["published"][f"{node}-v2"]
        assert v2["patched_on_running_root"] == ["hypervisor.cpio.zst"], v2
        assert "hypervisor.cpio.zst" not in v2["uploaded"], v2
    # v2's patch restarted nftables.service (a drop-in changed), whose stop and start flush
    # the node's ruleset: each agent put its bridge's tables back (docs/security.md).
    assert all(times >= 1 for times in facts["tables_restored"].values()), facts
    # and meanwhile the held copy of the rules, which no flush takes, kept the VM ports closed
    # (node kernel 6.1: nft table owners; metadata/held.py)
    assert all(held == 1 for held in facts["held_rules"].values()), facts
    assert all(times >= 1 for times in facts["held_stayed"].values()), facts
    before, after = facts["vm"], facts["vm_after"]
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert after["uptime"] > 0
    # node B runs systemd: the kernel holds the VM's QEMU to its RAM, its boot files, TCG's
    # cache if any (node B's agent runs it on KVM, over the SVM node B's TCG emulates) and
    # the overhead (vms.limits), read back from its scope's cgroup
    appliance = build_images("appliance-vm") / "appliance-vm"
    files = sum((appliance / name).stat().st_size
                for name in ("appliance-vm.vmlinux", "appliance-vm.cpio.lz4"))  # fmt: skip
    base = (before["memory_mib"] + VmIsolationConfig().memory_overhead_mib) * MIB
    base += -(-files // MIB) * MIB  # in whole MiB
    for view in (before, after):
        held = view["limits"]
        assert held is not None, "node B reports no cgroup limits for its VM's QEMU"
        assert held["memory_max"] in (base, base + TCG_CODE_CACHE_MIB * MIB), held
        assert held["tasks_max"] == TASKS_BASE + before["vcpus"], held
        assert held["file_max"] == FILE_FLOOR, held  # no disk: its logs' bound
        assert 0 < held["memory"] < held["memory_max"] and 0 < held["tasks"] < held["tasks_max"]
    # Each node's agent log, kept through `hatchery logs` (the node's journal over the API)
    # before the nodes stopped: the live patch to v2 is in it, and the journal kept the
    # level of the agent's warning about its missing CRL (no demo node has one).
    for name in ("node-a", "node-b"):
        kept = (tmp_path / "story" / name / f"{name}-agent.log").read_text()
        assert "agent ready" in kept and "live patch to v2" in kept, kept[-2000:]
        born = re.search(r"image v1, which this node was born with, taken from \S+: (\d+) bytes "
                         r"downloaded, (\d+) of its running root image not", kept)  # fmt: skip
        if name == "node-b":  # its root image (most of v1) came from its own RAM
            assert born and int(born[2]) > int(born[1]) > 0, kept[-3000:]
        else:  # direct boot: no birth peer
            assert born is None
        # both nodes' CPUs offer SVM (TCG's -cpu max): KVM's module was loaded before their
        # agents chose (hatchery-kvm.service), at every start of the agent
        chosen = re.findall(r"accelerator (\w+): ", kept)
        assert chosen and set(chosen) == {"kvm"}, chosen
        assert " WARNING hatchery-agent: hatchery.revocation: no CRL" in kept, kept[-2000:]
