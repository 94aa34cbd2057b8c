"""A reboot-mode rollout reads each host's per-VM report (the simulated agents report their VMs
resumed, or cold-started where told): the table, the journal and ``status`` carry the counts
and the longest pause; a degraded host is reported, and halts only with --halt-on-degraded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hatchery_rollout.journal import HostState, read_journal
from tests.integration.rollout.conftest import SimFleet, Tls

FAST = ["--poll-interval", "0.01", "--progress-interval", "2"]


def rollout(tls: Tls, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hatchery_rollout.cli", *args, *tls.args()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def run_args(sim: SimFleet, journal: Path) -> list[str]:
    return ["run", "--fleet", str(sim.fleet), "--version", "v2", "--journal", str(journal)]


HOSTS = 12  # linear waves: 0 | 1-2 | 3-5 | 6-9 | 10-11: host00004 is in step 3
COLD = "host00004"
REASON = "vm vm0 cold-started: resume failed: injected: its state file is missing; cold-started"


def start(simfleet: Callable[..., SimFleet]) -> SimFleet:
    vms = {f"host{i:05d}": 2 for i in range(HOSTS)}
    return simfleet(HOSTS, upgrade_delay=0.02, vms=vms, cold_start=[COLD], restore_delay=0.1)


def host_records(journal: Path, state: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    return {r["host"]: r for r in lines if r.get("t") == "host" and r["state"] == state}


def status_json(journal: Path) -> dict[str, Any]:
    shown = subprocess.run(
        [sys.executable, "-m", "hatchery_rollout.cli", "status", str(journal), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    doc: dict[str, Any] = json.loads(shown.stdout)
    return doc


def test_a_cold_started_vm_is_reported_and_the_rollout_goes_on(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = start(simfleet)
    journal = tmp_path / "j.jsonl"
    done = rollout(tls, *run_args(sim, journal), "--mode", "reboot", *FAST)
    assert done.returncode == 0, done.stderr
    assert f"1 host(s) degraded (a VM not resumed): {COLD}" in done.stderr
    assert all(s["version"] == "v2" for s in sim.stats().values())

    records = host_records(journal, "done")
    assert len(records) == HOSTS
    cold = records[COLD]
    assert (cold["resumed"], cold["cold_started"], cold["not_restored"]) == (1, 1, 0)
    assert cold["max_pause"] == 1.6 and cold["degraded"] == REASON
    for name, rec in records.items():
        if name != COLD:  # both VMs resumed, waited for while they were still restoring
            assert (rec["resumed"], rec["cold_started"], rec["max_pause"]) == (2, 0, 1.6), name
            assert "degraded" not in rec

    header, *rows = done.stdout.splitlines()
    assert header.split()[-4:] == ["resumed", "cold", "max", "pause"]
    step3 = next(r for r in rows if r.split()[0] == "3").split()
    assert step3[-3:] == ["5", "1", "1.6s"]  # 3 hosts, 2 VMs each: one cold-started
    total = next(r for r in rows if r.split()[0] == "all").split()
    assert total[-3:] == ["23", "1", "1.6s"]
    assert f"degraded: {COLD}: {REASON}" in rows

    doc = status_json(journal)
    assert doc["result"] == "done"
    assert doc["degraded"] == [{"host": COLD, "reason": REASON}]
    assert doc["vms"] == {"hosts": HOSTS, "resumed": 23, "cold_started": 1, "not_restored": 0,
                          "max_pause": 1.6}  # fmt: skip


def test_halt_on_degraded_halts_and_a_retry_accepts_what_was_seen(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = start(simfleet)
    journal = tmp_path / "j.jsonl"
    argv = [*run_args(sim, journal), "--mode", "reboot", "--halt-on-degraded", *FAST]
    halted = rollout(tls, *argv)
    assert halted.returncode == 3, halted.stderr
    assert f"halted: {COLD} failed: degraded: {REASON}" in halted.stderr
    started = {n for n, s in sim.stats().items() if s["posts"]}
    assert started == {f"host{i:05d}" for i in range(6)}  # steps 1-3: no new host after it
    state = read_journal(journal)
    assert state.failed() == [(COLD, f"degraded: {REASON}")]
    failed = host_records(journal, "failed")[COLD]
    assert failed["cold_started"] == 1 and failed["degraded"] == REASON
    assert json.loads(journal.read_text().splitlines()[0])["options"]["halt_on_degraded"]

    # The operator looked at the VM and retries: the same degradation is accepted, the
    # rollout (still halting on degraded hosts) goes on, and no host is upgraded twice.
    resumed = rollout(tls, "resume", str(journal), "--retry-failed", *FAST[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"degraded (a VM not resumed): {COLD}" in resumed.stderr
    for name, s in sim.stats().items():
        assert (s["upgrades"], s["posts"], s["version"]) == (1, 1, "v2"), (name, s)
    assert read_journal(journal).hosts[COLD].state is HostState.DONE


def test_a_live_rollout_has_no_vm_report(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(3, upgrade_delay=0.01, vms={"host00001": 2}, cold_start=["host00001"])
    journal = tmp_path / "j.jsonl"
    done = rollout(tls, *run_args(sim, journal), "--halt-on-degraded", *FAST)
    assert done.returncode == 0, done.stderr
    assert all("resumed" not in r for r in host_records(journal, "done").values())
    assert status_json(journal)["vms"]["hosts"] == 0
