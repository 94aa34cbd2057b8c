"""A live patch with ``refresh_vms``: once the patch is in place every running VM is moved to
a new QEMU process, one at a time, each outcome in the status's per-VM report; a VM that
cannot be moved runs on in its old QEMU and is reported, never lost. The wire and the
rollout's side of it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchery.errors import CommandError
from hatchery.upgrade.controller import UpgradeError, Upgrader
from hatchery.upgrade.model import Mode, Phase, VmOutcome, VmResult
from hatchery.wire import UpgradeRequest, UpgradeStatus
from hatchery_rollout.cli import _exec_options, _parser
from hatchery_rollout.errors import RolloutError
from hatchery_rollout.executor import ExecOptions
from hatchery_rollout.vmreport import VmTally, tally
from tests.support.upgrade_roots import RELEASE, DirImages, root_image, unpack, wait_done


class Vms:
    """A small VmControl for live patches: the running VMs, the order they were refreshed
    in, the root's version each saw (the patch must be in place first), what each reports."""

    def __init__(self, root: Path, running: list[str], outcomes: dict[str, VmOutcome]) -> None:
        self.root = root
        self.running = running
        self.outcomes = outcomes
        self.refreshed: list[tuple[str, str]] = []

    def running_names(self) -> list[str]:
        return list(self.running)

    async def refresh_for_upgrade(self, name: str) -> VmOutcome:
        self.refreshed.append((name, version_of(self.root)))
        if name == "broken":
            raise CommandError(["qemu-system-x86_64"], 1, "cannot open the tap")
        return self.outcomes.get(name, VmOutcome(name, VmResult.REFRESHED, pause_seconds=0.2))

    async def stop_for_reboot(self, name: str) -> None:
        raise AssertionError("a live patch stops no VM")

    async def suspend_for_reboot(self, name: str) -> None:
        raise AssertionError("a live patch saves no VM")

    def memory_mib(self, names: list[str]) -> int:
        return 0

    async def restore(self, name: str) -> VmOutcome:
        raise AssertionError("a live patch restores no VM")


def version_of(root: Path) -> str:
    return (root / "usr/lib/os-release").read_text().strip().split("=", 1)[1]


def make(
    tmp_path: Path, vms: list[str], outcomes: dict[str, VmOutcome] | None = None
) -> tuple[Upgrader, Vms]:
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    unpack(root_image("v1"), root)
    images = DirImages(tmp_path / "images")
    images.add("v1", root_image("v1"))
    images.add("v2", root_image("v2"))
    control = Vms(root, vms, outcomes or {})
    upgrader = Upgrader(state, images, root, vms=control, version=lambda: version_of(root),
                        kernel_release=RELEASE)  # fmt: skip
    return upgrader, control


async def test_every_running_vm_is_refreshed_after_the_patch(tmp_path: Path) -> None:
    upgrader, vms = make(tmp_path, ["web1", "db1"])
    code, _ = await upgrader.request("v2", Mode.LIVE, refresh_vms=True)
    assert code == 202
    await wait_done(upgrader)
    status = upgrader.status
    assert status.state is Phase.DONE, status
    assert vms.refreshed == [("web1", "v2"), ("db1", "v2")], "one at a time, after the patch"
    assert status.vms == (VmOutcome("web1", VmResult.REFRESHED, pause_seconds=0.2),
                          VmOutcome("db1", VmResult.REFRESHED, pause_seconds=0.2))  # fmt: skip
    assert status.detail is not None and status.detail.endswith("refreshed 2 of 2 VMs")
    assert not any(vm.degraded for vm in status.vms)
    # Persisted in the wire form: a restarted agent reports the same.
    again = Upgrader(tmp_path / "state", None, tmp_path / "root", vms=vms,
                     version=lambda: "v2")  # fmt: skip
    assert again.status.vms == status.vms


async def test_a_vm_that_cannot_be_refreshed_is_reported_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    stale = VmOutcome("paused1", VmResult.REFRESH_FAILED,
                      reason="vm paused1 is paused; it runs on in its old QEMU")  # fmt: skip
    upgrader, vms = make(tmp_path, ["broken", "paused1", "web1"], {"paused1": stale})
    await upgrader.request("v2", Mode.LIVE, refresh_vms=True)
    await wait_done(upgrader)
    status = upgrader.status
    assert status.state is Phase.DONE, "the patch itself succeeded"
    assert [vm.name for vm in status.vms] == ["broken", "paused1", "web1"]
    broken, paused, web = status.vms
    assert broken.result is VmResult.REFRESH_FAILED and "cannot open the tap" in str(broken.reason)
    assert paused == stale and web.result is VmResult.REFRESHED
    assert broken.degraded and paused.degraded and not web.degraded
    assert status.detail is not None and "refreshed 1 of 3 VMs (2 not: see vms)" in status.detail


async def test_without_the_option_no_vm_is_touched(tmp_path: Path) -> None:
    upgrader, vms = make(tmp_path, ["web1"])
    await upgrader.request("v2", Mode.LIVE)
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.DONE and upgrader.status.vms == ()
    assert vms.refreshed == []


async def test_refresh_vms_is_refused_for_a_reboot(tmp_path: Path) -> None:
    upgrader, vms = make(tmp_path, ["web1"])
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v2", Mode.REBOOT, refresh_vms=True)
    assert err.value.status == 422 and "live mode" in err.value.message
    assert upgrader.status.state is Phase.IDLE and vms.refreshed == []


def test_the_wire_sends_the_option_only_when_set_and_reads_the_new_results() -> None:
    assert "refresh_vms" not in UpgradeRequest("v2").to_json()
    assert UpgradeRequest("v2", refresh_vms=True).to_json()["refresh_vms"] is True
    status = UpgradeStatus(Phase.DONE, "v2", Mode.LIVE, vms=(
        VmOutcome("a", VmResult.REFRESHED, 0.15),
        VmOutcome("b", VmResult.REFRESH_FAILED, reason="QEMU: no such device"),
    ))  # fmt: skip
    assert UpgradeStatus.from_json(status.to_json()) == status
    assert not status.restoring


def test_the_rollout_counts_refreshed_vms_and_a_stale_one_degrades_its_host() -> None:
    status = UpgradeStatus(Phase.DONE, "v2", Mode.LIVE, vms=(
        VmOutcome("a", VmResult.REFRESHED, 0.15),
        VmOutcome("b", VmResult.REFRESHED, 0.4),
        VmOutcome("c", VmResult.REFRESH_FAILED, reason="QEMU: no such device"),
    ))  # fmt: skip
    summary = tally(status)
    assert summary == VmTally(refreshed=2, refresh_failed=1, max_pause=0.4,
                              degraded="vm c refresh-failed: QEMU: no such device")  # fmt: skip
    assert summary.fields()["refresh_failed"] == 1
    clean = tally(UpgradeStatus(Phase.DONE, "v2", Mode.LIVE,
                                vms=(VmOutcome("a", VmResult.REFRESHED, 0.1),)))  # fmt: skip
    assert clean is not None and clean.degraded is None
    options = ExecOptions("v2", refresh_vms=True)
    assert options.request().refresh_vms
    assert ExecOptions.from_json("v2", options.to_json()) == options


def test_the_rollout_flag_reaches_the_request_and_is_refused_with_a_reboot() -> None:
    run = ["run", "--fleet", "fleet.yaml", "--version", "v2"]
    options = _exec_options(_parser().parse_args([*run, "--refresh-vms"]))
    assert options.request().to_json() == {"version": "v2", "mode": "live", "refresh_vms": True}
    assert ExecOptions.from_json("v2", options.to_json()).refresh_vms
    assert not ExecOptions.from_json("v2", {}).refresh_vms  # a journal from before
    with pytest.raises(RolloutError) as err:
        _exec_options(_parser().parse_args([*run, "--refresh-vms", "--mode", "reboot"]))
    assert "--mode live" in err.value.message
