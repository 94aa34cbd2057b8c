"""Reboot mode through the controller: staged, guard armed, VMs stopped, the jump taken; then
the agent that comes up afterwards settles how it ended and restores the VMs."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from hatchery.errors import CommandError
from hatchery.state import write_json
from hatchery.upgrade import reboot
from hatchery.upgrade.controller import RESTORE_CONCURRENCY, UpgradeError, Upgrader
from hatchery.upgrade.model import BootStatus, Mode, Phase, VmOutcome, VmResult
from hatchery.wire import Health, UpgradeStatus
from tests.support.upgrade_roots import DirImages, root_image, wait_done


class Vms:
    """A small VmControl: which VMs run (512 MiB each), which were saved and restored, and
    what restoring each reports (``outcomes``; default: resumed after a 2.5 s pause)."""

    def __init__(
        self,
        running: list[str] | None = None,
        memory_mib: int = 512,
        outcomes: dict[str, VmOutcome] | None = None,
        events: list[str] | None = None,
    ) -> None:
        self.events = events if events is not None else []
        self.running = list(running or [])
        self.stopped: list[str] = []
        self.suspended: list[str] = []
        self.restored: list[str] = []
        self.each_mib = memory_mib
        self.outcomes = dict(outcomes or {})

    def running_names(self) -> list[str]:
        return list(self.running)

    async def stop_for_reboot(self, name: str) -> None:
        self.stopped.append(name)

    async def suspend_for_reboot(self, name: str) -> None:
        self.events.append(f"save {name}")
        self.suspended.append(name)

    def memory_mib(self, names: list[str]) -> int:
        return self.each_mib * len(names)

    async def restore(self, name: str) -> VmOutcome:
        if name == "broken":
            raise CommandError(["qemu-system-x86_64"], 1, "no such disk")
        self.restored.append(name)
        return self.outcomes.get(name, VmOutcome(name, VmResult.RESUMED, pause_seconds=2.5))


class Kexec:
    """Stands in for kexec (``reboot.Kexec``): what was loaded and where the node would have
    jumped, in one list with the VMs' saves (``events``) to tell their order."""

    def __init__(
        self, events: list[str] | None = None, loads: list[bool] | None = None,
        error: Exception | None = None,
    ) -> None:  # fmt: skip
        self.events = events if events is not None else []
        self.loads = list(loads or [])  # what each load answers (default: loaded)
        self.taken: list[Path] = []
        self.error = error
        self._staged: Path | None = None

    def load(self, staged: Path) -> bool:
        self._staged = staged
        loaded = self.loads.pop(0) if self.loads else True
        self.events.append(f"load {staged.name}: {loaded}")
        return loaded

    def unload(self) -> None:
        self.events.append("unload")

    def jump(self, loaded: bool) -> None:
        assert self._staged is not None
        self.events.append(f"jump, loaded: {loaded}")
        self.taken.append(self._staged)
        if self.error is not None:
            raise self.error


class VmsThatCannotBeSaved(Vms):
    async def suspend_for_reboot(self, name: str) -> None:
        raise RuntimeError(f"the state file of {name} cannot be written")


def images_at(tmp_path: Path) -> DirImages:
    images = DirImages(tmp_path / "images")
    for version in ("v2", "v3"):
        images.add(version, root_image(version))
    return images


def pending(state: Path, version: str, previous: str, fallback: str | None = None) -> Path:
    d = reboot.pending_dir(state)
    d.mkdir(parents=True)
    (d / "version").write_text(version + "\n")
    (d / "previous").write_text(previous + "\n")
    (d / "restore").write_text("web1\ndb1\n")
    if fallback:
        (d / "fallback").write_text(fallback + "\n")
    return d


def boot(tmp_path: Path, images: DirImages, running: str, vms: Vms) -> Upgrader:
    """The agent of the next boot, as agent.py builds it: settled before anything else."""
    upgrader = Upgrader(tmp_path, images, tmp_path, vms=vms, version=lambda: running)
    upgrader.settle_boot()
    return upgrader


async def test_reboot_request_stages_arms_stops_and_jumps(tmp_path: Path) -> None:
    images, vms, kexec = images_at(tmp_path), Vms(["web1", "db1"]), Kexec()
    upgrader = Upgrader(tmp_path, images, tmp_path, vms=vms, version=lambda: "v2", kexec=kexec)
    code, answer = await upgrader.request("v3", Mode.REBOOT, guard_seconds=90)
    assert code == 202 and answer.state is Phase.RUNNING and answer.mode is Mode.REBOOT
    for _ in range(100):
        if kexec.taken:
            break
        await asyncio.sleep(0.02)
    staged = reboot.boot_dir(tmp_path) / "v3"
    assert kexec.taken == [staged]
    assert (staged / "vmlinuz").read_bytes() == b"kernel-1"
    assert (reboot.boot_dir(tmp_path) / "v2" / "initrd").exists(), "the way back is staged"
    armed = reboot.pending_dir(tmp_path)
    assert (armed / "version").read_text() == "v3\n"
    assert (armed / "previous").read_text() == "v2\n"
    assert (armed / "guard-seconds").read_text() == "90\n"
    assert (armed / "restore").read_text() == "web1\ndb1\n"
    assert vms.suspended == ["web1", "db1"] and vms.stopped == []  # memory kept, not stopped
    await upgrader.close()  # the shutdown that follows a kexec is no failure
    assert upgrader.status.state is Phase.RUNNING
    assert upgrader.status.detail == "staged v3; saving 2 VMs to /data, then kexec"

    after = Vms()
    new = boot(tmp_path, images, "v3", after)
    assert new.status.state is Phase.DONE and new.status.target == "v3"
    assert new.status.detail == "rebooted into v3" and images.current == "v3"
    assert not armed.exists() and after.restored == []
    await new.after_boot()
    assert after.restored == ["web1", "db1"]


async def _rebooted(tmp_path: Path, vms: Vms, kexec: Kexec) -> Upgrader:
    """A reboot request to v3 from v2, run until it jumped or ended."""
    upgrader = Upgrader(tmp_path, images_at(tmp_path), tmp_path, vms=vms, version=lambda: "v2",
                        kexec=kexec)  # fmt: skip
    await upgrader.request("v3", Mode.REBOOT)
    for _ in range(200):
        if kexec.taken or upgrader.status.state is not Phase.RUNNING:
            break
        await asyncio.sleep(0.02)
    return upgrader


async def test_the_kernel_is_loaded_before_the_vms_pause(tmp_path: Path) -> None:
    """Loading reads and hashes the new kernel and root (5 s on an emulated vCPU): done while
    the VMs still run, those seconds are not their pause."""
    events: list[str] = []
    upgrader = await _rebooted(tmp_path, Vms(["web1", "db1"], events=events), Kexec(events))
    assert events == ["load v3: True", "save web1", "save db1", "jump, loaded: True"]
    await upgrader.close()


@pytest.mark.parametrize("second", [True, False], ids=["loaded-after-the-saves", "firmware"])
async def test_a_kernel_refused_beside_the_vms_is_loaded_again_once_they_are_saved(
    tmp_path: Path, second: bool
) -> None:
    """A node short of memory while its VMs run: their state is on /data after the saves
    and their memory freed, so the load is tried again then; only if that fails too does
    the node leave through firmware."""
    events: list[str] = []
    upgrader = await _rebooted(tmp_path, Vms(["web1"], events=events),
                               Kexec(events, loads=[False, second]))  # fmt: skip
    assert events == ["load v3: False", "save web1", f"load v3: {second}",
                      f"jump, loaded: {second}"]  # fmt: skip
    await upgrader.close()


async def test_an_upgrade_that_stops_before_its_jump_unloads_the_kernel(tmp_path: Path) -> None:
    """Else a later ``systemctl kexec`` (an operator's) would boot the abandoned version."""
    events: list[str] = []
    upgrader = await _rebooted(tmp_path, VmsThatCannotBeSaved(["web1"]), Kexec(events))
    await wait_done(upgrader)
    assert events == ["load v3: True", "unload"]
    assert upgrader.status.state is Phase.FAILED
    assert "the state file of web1 cannot be written" in (upgrader.status.error or "")


def test_a_kernel_that_cannot_be_read_is_not_loaded(tmp_path: Path) -> None:
    """``kexec -l`` of a missing file fails before it loads anything (safe on any host)."""
    assert reboot.HostKexec().load(tmp_path / "nothing-staged") is False


def _kexec_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuses: str | None) -> Path:
    """A ``kexec`` first on PATH that writes each command line it gets to a file (returned)
    and refuses, with the kernel's words, those holding the flag ``refuses`` ("-s": a kernel
    without the file-based load), or every one (""), or none (None). It stands in for the
    kernel's answers, which this host cannot give: loading a kernel here would arm its own
    reboot."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "kexec-calls"
    if refuses is None:
        refusal = ""
    elif refuses:
        refusal = (f'case " $* " in *" {refuses} "*) echo "kexec_file_load failed: '
                   'Function not implemented" >&2; exit 1 ;; esac\n')  # fmt: skip
    else:
        refusal = 'echo "kexec_load failed: Operation not permitted" >&2; exit 1\n'
    script = bin_dir / "kexec"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n{refusal}exit 0\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_the_file_based_load_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Secure Boot's lockdown only ``kexec_file_load`` loads (a signed kernel)."""
    calls = _kexec_on_path(tmp_path, monkeypatch, refuses=None)
    staged = tmp_path / "v3"
    assert reboot.HostKexec().load(staged) is True
    assert calls.read_text().splitlines() == [
        f"-s -l {staged}/vmlinuz --initrd={staged}/initrd --reuse-cmdline"
    ]


def test_a_kernel_without_the_file_based_load_gets_the_classic_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _kexec_on_path(tmp_path, monkeypatch, refuses="-s")
    staged = tmp_path / "v3"
    with caplog.at_level("INFO", logger="hatchery.upgrade.reboot"):
        assert reboot.HostKexec().load(staged) is True
    assert calls.read_text().splitlines() == [
        f"-s -l {staged}/vmlinuz --initrd={staged}/initrd --reuse-cmdline",
        f"-l {staged}/vmlinuz --initrd={staged}/initrd --reuse-cmdline",
    ]
    assert "(kexec_load)" in caplog.text


def test_a_kernel_that_refuses_both_loads_says_why_for_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Then the upgrade goes on as it does for any refused load (loaded again once the VMs
    are saved, else through firmware: the controller's tests above)."""
    calls = _kexec_on_path(tmp_path, monkeypatch, refuses="")
    assert reboot.HostKexec().load(tmp_path / "v3") is False
    assert len(calls.read_text().splitlines()) == 2
    assert caplog.text.count("kexec_load failed: Operation not permitted") == 2


def test_unloading_takes_the_file_based_way_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kexec -s -u`` unloads a kernel loaded either way, and lockdown refuses ``-u``; a
    kernel without the file-based load unloads with ``-u``."""
    calls = _kexec_on_path(tmp_path, monkeypatch, refuses=None)
    reboot.HostKexec().unload()
    assert calls.read_text().splitlines() == ["-s -u"]
    other = tmp_path / "other"
    other.mkdir()
    calls = _kexec_on_path(other, monkeypatch, refuses="-s")
    reboot.HostKexec().unload()
    assert calls.read_text().splitlines() == ["-s -u", "-u"]


async def test_a_failed_jump_is_reported(tmp_path: Path) -> None:
    kexec = Kexec(error=CommandError(["kexec", "-e"], 1, "kexec_load failed: not permitted"))
    upgrader = Upgrader(tmp_path, images_at(tmp_path), tmp_path, version=lambda: "v2", kexec=kexec)
    await upgrader.request("v3", Mode.REBOOT)
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.FAILED
    assert upgrader.status.error == "kexec -e exited with 1: kexec_load failed: not permitted"


async def test_booted_into_the_new_version(tmp_path: Path) -> None:
    images, vms = images_at(tmp_path), Vms()
    d = pending(tmp_path, "v3", "v2")
    upgrader = boot(tmp_path, images, "v3", vms)
    assert upgrader.status.state is Phase.DONE and upgrader.status.target == "v3"
    assert images.current == "v3" and not d.exists()
    assert upgrader.boot_status() == BootStatus(fallback=False, reason=None)
    await upgrader.after_boot()
    assert vms.restored == ["web1", "db1"]
    await upgrader.after_boot()
    assert vms.restored == ["web1", "db1"], "VMs are restored once"


async def test_fell_back_to_the_previous_version(tmp_path: Path) -> None:
    images, vms = images_at(tmp_path), Vms()
    pending(tmp_path, "v4", "v3", fallback="v4 did not become healthy within 90s")
    upgrader = boot(tmp_path, images, "v3", vms)
    assert upgrader.status.state is Phase.FAILED and upgrader.status.target == "v4"
    assert upgrader.status.error == "fell back to v3: v4 did not become healthy within 90s"
    assert upgrader.boot_status().fallback is True
    await upgrader.after_boot()
    assert vms.restored == ["web1", "db1"] and images.current is None
    # Remembered by the next start too (the persisted status), until the next upgrade.
    assert boot(tmp_path, images, "v3", Vms()).boot_status().fallback is True


async def test_a_vm_that_cannot_be_restored_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = pending(tmp_path, "v3", "v2")
    (d / "restore").write_text("broken\nweb1\n")
    vms = Vms()
    upgrader = boot(tmp_path, images_at(tmp_path), "v3", vms)
    await upgrader.after_boot()
    assert vms.restored == ["web1"]
    assert "cannot restore vm broken after the reboot" in caplog.text


async def test_nothing_pending_is_nothing_to_do(tmp_path: Path) -> None:
    vms = Vms()
    upgrader = boot(tmp_path, images_at(tmp_path), "v3", vms)
    await upgrader.after_boot()
    assert upgrader.status.state is Phase.IDLE and vms.restored == []


def test_an_agent_that_stopped_before_the_reboot_is_not_left_running(tmp_path: Path) -> None:
    running = {"state": "running", "target": "v3", "mode": "reboot", "started": 1.0}
    write_json(tmp_path / "upgrade.json", running)
    images = images_at(tmp_path)
    upgrader = boot(tmp_path, images, "v2", Vms())
    assert upgrader.status.state is Phase.FAILED
    assert upgrader.status.error == "the agent stopped before the reboot"
    # Armed, the guard's story wins: settle_boot tells how the reboot ended.
    write_json(tmp_path / "upgrade.json", running)
    pending(tmp_path, "v3", "v2")
    upgrader = boot(tmp_path, images, "v3", Vms())
    assert upgrader.status.state is Phase.DONE and upgrader.status.detail == "rebooted into v3"


class Copied(DirImages):
    """A source whose artefacts are not kept as files as built: staging copies them."""

    def checked_file(self, version: str, role: str) -> Path | None:
        return None


def test_an_artefact_kept_as_built_is_linked_not_copied(tmp_path: Path) -> None:
    """Staging an artefact the store keeps as is costs a link, not a 100 MB copy; where the
    link cannot be made (the store on another file system) it is copied."""
    images = images_at(tmp_path)
    staged = reboot.stage(images, tmp_path, "v2")
    source = images.folder / "v2" / "initrd"
    assert (staged / "initrd").stat().st_ino == source.stat().st_ino
    assert (staged / "vmlinuz").stat().st_ino == (images.folder / "v2" / "kernel").stat().st_ino
    assert sorted(p.name for p in staged.iterdir()) == ["initrd", "vmlinuz"]
    # Staged again (the way back at the next reboot): the link is the file itself, kept.
    inode = (staged / "initrd").stat().st_ino
    assert reboot.stage(images, tmp_path, "v2") == staged
    assert (staged / "initrd").stat().st_ino == inode
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:  # tmpfs: another file system
        elsewhere = DirImages(Path(other))
        elsewhere.add("v3", root_image("v3"))
        staged = reboot.stage(elsewhere, tmp_path, "v3")
        copied = staged / "initrd"
        assert copied.read_bytes() == (elsewhere.folder / "v3" / "initrd").read_bytes()
        assert copied.stat().st_dev != (elsewhere.folder / "v3" / "initrd").stat().st_dev


def test_a_truncated_staged_file_is_detected_and_staged_again(tmp_path: Path) -> None:
    """A staged copy cut short (a crash while copying, on main written without fsync and
    reused as it was) is never booted: its sha256 is checked against the image's first."""
    images = Copied(tmp_path / "images")
    images.add("v2", root_image("v2"))
    staged = reboot.stage(images, tmp_path, "v2")
    initrd = (images.folder / "v2" / "initrd").read_bytes()
    assert (staged / "initrd").read_bytes() == initrd
    (staged / "initrd").write_bytes(initrd[: len(initrd) // 2])
    (staged / "vmlinuz").write_bytes(b"kernel-X")  # the same size, other bytes
    again = reboot.stage(images, tmp_path, "v2")
    assert again == staged
    assert (staged / "initrd").read_bytes() == initrd
    assert (staged / "vmlinuz").read_bytes() == b"kernel-1"
    assert sorted(p.name for p in staged.iterdir()) == ["initrd", "vmlinuz"]


def test_an_artefact_that_does_not_match_its_digest_is_not_staged(tmp_path: Path) -> None:
    class Lying(Copied):
        def artefact_digest(self, version: str, role: str) -> str | None:
            return "0" * 64

    images = Lying(tmp_path / "images")
    images.add("v2", root_image("v2"))
    with pytest.raises(reboot.StagingError, match="not the signed"):
        reboot.stage(images, tmp_path, "v2")
    assert list((reboot.boot_dir(tmp_path) / "v2").iterdir()) == []


async def test_a_reboot_without_room_to_save_the_vms_is_refused_before_anything_stops(
    tmp_path: Path,
) -> None:
    """Saving every running VM's memory must fit on /data (here: far more than any disk)."""
    images, kexec = images_at(tmp_path), Kexec()
    vms = Vms(["web1", "db1"], memory_mib=1 << 40)  # 1 EiB each: more than any disk
    upgrader = Upgrader(tmp_path, images, tmp_path, vms=vms, version=lambda: "v2", kexec=kexec)
    with pytest.raises(
        UpgradeError, match=r"saves the memory of 2 running VM\(s\) to /data"
    ) as err:
        await upgrader.request("v3", Mode.REBOOT, guard_seconds=90)
    assert err.value.status == 409
    assert vms.suspended == vms.stopped == [] and kexec.taken == []
    assert not reboot.pending_dir(tmp_path).exists()


RESTORING = (VmOutcome("web1", VmResult.RESTORING), VmOutcome("db1", VmResult.RESTORING))


async def test_the_status_reports_what_became_of_each_vm(tmp_path: Path) -> None:
    """Per VM that ran before the reboot: ``restoring`` from the moment the boot is settled
    (a reader knows to wait), then resumed with its pause or cold-started with the reason;
    persisted, so a restarted agent, ``/healthz`` and ``GET /v1/upgrade`` tell the same."""
    images = images_at(tmp_path)
    pending(tmp_path, "v3", "v2")
    cold = VmOutcome("db1", VmResult.COLD_STARTED,
                     reason="resume failed: its state file is missing; cold-started")  # fmt: skip
    vms = Vms(outcomes={"db1": cold})
    upgrader = boot(tmp_path, images, "v3", vms)
    assert upgrader.status.state is Phase.DONE and upgrader.status.vms == RESTORING
    assert upgrader.status.restoring
    await upgrader.after_boot()
    report = (VmOutcome("web1", VmResult.RESUMED, pause_seconds=2.5), cold)
    assert upgrader.status.vms == report and not upgrader.status.restoring
    assert upgrader.status.detail == "rebooted into v3"
    on_disk = Upgrader(tmp_path, images, tmp_path, vms=Vms(), version=lambda: "v3").status
    assert on_disk == upgrader.status
    wire = Health("v3", upgrade=upgrader.status).to_json()
    assert wire["upgrade"]["vms"] == [
        {"name": "web1", "result": "resumed", "pause_seconds": 2.5, "reason": None},
        {"name": "db1", "result": "cold-started", "pause_seconds": None,
         "reason": "resume failed: its state file is missing; cold-started"},
    ]  # fmt: skip
    assert Health.from_json(wire).upgrade == upgrader.status


async def test_a_vm_that_cannot_be_restored_is_reported_failed(tmp_path: Path) -> None:
    d = pending(tmp_path, "v3", "v2")
    (d / "restore").write_text("broken\nweb1\n")
    upgrader = boot(tmp_path, images_at(tmp_path), "v3", Vms())
    await upgrader.after_boot()
    assert upgrader.status.vms == (
        VmOutcome("broken", VmResult.FAILED,
                  reason="qemu-system-x86_64 exited with 1: no such disk"),
        VmOutcome("web1", VmResult.RESUMED, pause_seconds=2.5),
    )  # fmt: skip


async def test_a_fallback_boot_reports_its_vms_too(tmp_path: Path) -> None:
    pending(tmp_path, "v4", "v3", fallback="v4 did not become healthy within 90s")
    stopped = VmOutcome("db1", VmResult.STOPPED, reason="it no longer exists")
    upgrader = boot(tmp_path, images_at(tmp_path), "v3", Vms(outcomes={"db1": stopped}))
    assert upgrader.status.state is Phase.FAILED and upgrader.status.vms == RESTORING
    await upgrader.after_boot()
    assert upgrader.status.vms[1] == stopped and upgrader.status.state is Phase.FAILED


async def test_an_agent_stopped_while_restoring_leaves_no_vm_restoring(tmp_path: Path) -> None:
    """Its successor does not restore them (the boot was settled): a reader must not wait
    for ever, so those VMs read ``failed`` with the reason."""
    images = images_at(tmp_path)
    pending(tmp_path, "v3", "v2")
    boot(tmp_path, images, "v3", Vms())  # settled, then the agent stops before after_boot
    again = Upgrader(tmp_path, images, tmp_path, vms=Vms(), version=lambda: "v3")
    why = "the agent stopped before it restored this VM"
    assert again.status.vms == (VmOutcome("web1", VmResult.FAILED, reason=why),
                                VmOutcome("db1", VmResult.FAILED, reason=why))  # fmt: skip
    assert again.status.state is Phase.DONE and not again.status.restoring


async def test_a_live_patch_or_an_older_status_has_no_vm_report(tmp_path: Path) -> None:
    older = {"state": "done", "target": "v3", "mode": "reboot", "detail": "rebooted into v3"}
    write_json(tmp_path / "upgrade.json", older)
    upgrader = Upgrader(tmp_path, images_at(tmp_path), tmp_path, vms=Vms(), version=lambda: "v3")
    assert upgrader.status.vms == () and upgrader.status == UpgradeStatus.from_json(older)


class SlowVms(Vms):
    """Restores that take a while (QEMU starting, its state read back): how many overlap.
    ``slow`` holds its place until every other VM has been restored; the others yield
    once while they hold theirs, so those admitted together are seen together."""

    def __init__(self, slow: str, others: int) -> None:
        super().__init__()
        self.slow, self.others = slow, others
        self.rest_done = asyncio.Event()
        self.now = self.most = 0

    async def restore(self, name: str) -> VmOutcome:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            if name == self.slow:
                await self.rest_done.wait()
            else:
                await asyncio.sleep(0)
            return await super().restore(name)
        finally:
            self.now -= 1
            if len(self.restored) == self.others:
                self.rest_done.set()


async def test_vms_are_restored_side_by_side_bounded_and_all_reported(tmp_path: Path) -> None:
    """One after the other, the last VM's pause held every other VM's restore. Up to
    RESTORE_CONCURRENCY run at once; each outcome lands in the report, in its VM's place,
    none lost to another written at the same time (the report on disk says the same)."""
    names = [f"vm{i}" for i in range(7)]
    d = pending(tmp_path, "v3", "v2")
    (d / "restore").write_text("".join(f"{n}\n" for n in [*names, "broken"]))
    # vm0 is slow: the others do not wait for it (without restores side by side, vm0 would
    # wait for ever: it finishes only once all the others have).
    vms = SlowVms("vm0", others=len(names) - 1)
    images = images_at(tmp_path)
    upgrader = boot(tmp_path, images, "v3", vms)
    await asyncio.wait_for(upgrader.after_boot(), 30)
    assert vms.most == RESTORE_CONCURRENCY
    assert vms.restored[-1] == "vm0", vms.restored  # the slow one finished last
    expected = (
        *(VmOutcome(n, VmResult.RESUMED, pause_seconds=2.5) for n in names),
        VmOutcome("broken", VmResult.FAILED,
                  reason="qemu-system-x86_64 exited with 1: no such disk"),
    )  # fmt: skip
    assert upgrader.status.vms == expected and not upgrader.status.restoring
    on_disk = Upgrader(tmp_path, images, tmp_path, vms=Vms(), version=lambda: "v3").status
    assert on_disk.vms == expected
