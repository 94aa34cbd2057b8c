"""hatchery-rollout against a simulated fleet of 200+ agent endpoints over mutual TLS.

The tool runs as a real subprocess; the simulated agents count upgrade requests and upgrades
actually started, so "exactly once" is what the agents saw, not what the tool believes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hatchery_rollout.journal import HostState, read_journal
from tests.integration.rollout.conftest import SimFleet, Tls

HOSTS = 210
FAST = ["--poll-interval", "0.01", "--progress-interval", "2"]


def rollout(tls: Tls, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hatchery_rollout.cli", *args, *tls.args()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def run_args(sim: SimFleet, journal: Path) -> list[str]:
    return ["run", "--fleet", str(sim.fleet), "--version", "v2", "--journal", str(journal)]


def test_full_rollout_upgrades_every_host_once(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(HOSTS, upgrade_delay=0.02, already=["host00005"])
    journal = tmp_path / "j.jsonl"
    done = rollout(tls, *run_args(sim, journal), *FAST)
    assert done.returncode == 0, done.stderr
    stats = sim.stats()
    assert len(stats) == HOSTS
    for name, s in stats.items():
        assert s["version"] == "v2", name
        if name == "host00005":  # already on the target: skipped, never asked to upgrade
            assert s["posts"] == 0 and s["upgrades"] == 0
        else:
            assert (s["posts"], s["upgrades"]) == (1, 1), (name, s)
    state = read_journal(journal)
    counts = state.counts()
    assert counts[HostState.DONE] == HOSTS - 1 and counts[HostState.SKIPPED] == 1
    assert state.ended is not None and state.ended["result"] == "done"
    # 209 hosts to plan linearly: 1+2+…+20 = 210 >= 209, so 20 steps
    assert len(state.waves) == 20
    status = subprocess.run(
        [sys.executable, "-m", "hatchery_rollout.cli", "status", str(journal), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)["result"] == "done"
    again = rollout(tls, "run", "--fleet", str(sim.fleet), "--version", "v2", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "already on target: 210" in again.stdout


def test_health_failure_halts_and_retry_after_repair(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    # Linear waves: 0 | 1-2 | 3-5 | 6-9 | 10-14 | 15-20 | …: host00020 is in step 6.
    sim = simfleet(HOSTS, upgrade_delay=0.02, fail_health=["host00020"])
    journal = tmp_path / "j.jsonl"
    halted = rollout(tls, *run_args(sim, journal), *FAST, "--health-timeout", "0.3")
    assert halted.returncode == 3, halted.stderr
    assert "host00020" in halted.stderr and "units" in halted.stderr
    stats = sim.stats()
    failed_at = stats["host00020"]["first_unhealthy"]
    assert failed_at is not None
    started = {n: s for n, s in stats.items() if s["posts"]}
    assert set(started) == {f"host{i:05d}" for i in range(21)}  # steps 1-6 only
    assert all(s["first_post"] <= failed_at for s in started.values())
    assert all(s["upgrades"] == 0 for n, s in stats.items() if n not in started)
    state = read_journal(journal)
    assert state.failed()[0][0] == "host00020" and state.halted is not None

    plain = rollout(tls, "resume", str(journal), *FAST[2:])
    assert plain.returncode == 1 and "--retry-failed" in plain.stderr

    sim.configure(fail_health=[])  # the operator repairs the host
    resumed = rollout(tls, "resume", str(journal), "--retry-failed", *FAST[2:])
    assert resumed.returncode == 0, resumed.stderr
    for name, s in sim.stats().items():
        assert (s["upgrades"], s["version"]) == (1, "v2"), (name, s)
        assert s["posts"] == 1, (name, s)  # host00020 was re-checked, not asked again


def test_sigkill_mid_rollout_then_resume_upgrades_each_host_once(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(HOSTS, upgrade_delay=0.05)
    journal = tmp_path / "j.jsonl"
    argv = [sys.executable, "-m", "hatchery_rollout.cli", *run_args(sim, journal), *FAST]
    proc = subprocess.Popen(
        [*argv, *tls.args()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            text = journal.read_text() if journal.exists() else ""
            if text.count('"state":"posting"') >= 60:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the rollout finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    before = sim.stats()
    assert 0 < sum(s["upgrades"] for s in before.values()) < HOSTS
    shown = subprocess.run(
        [sys.executable, "-m", "hatchery_rollout.cli", "status", str(journal)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "running or crashed" in shown.stdout
    resumed = rollout(tls, "resume", str(journal), *FAST[2:])
    assert resumed.returncode == 0, resumed.stderr
    for name, s in sim.stats().items():
        assert (s["upgrades"], s["posts"], s["version"]) == (1, 1, "v2"), (name, s)
    assert read_journal(journal).resumes == 1


def test_already_failing_check_is_not_a_failure_and_hooks_run(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(6, upgrade_delay=0.01, baseline_fail=["host00001"])
    log = tmp_path / "hooks.log"
    hook = f'echo "$HATCHERY_HOOK $HATCHERY_HOST $HATCHERY_ADDRESS $HATCHERY_VERSION" >> {log}'
    ok = rollout(
        tls,
        *run_args(sim, tmp_path / "j.jsonl"),
        *FAST,
        "--pre-hook",
        hook,
        "--post-hook",
        hook,
    )
    assert ok.returncode == 0, ok.stderr
    state = read_journal(tmp_path / "j.jsonl")
    assert state.hosts["host00001"].state is HostState.DONE
    assert state.hosts["host00001"].baseline == ("vms",)
    lines = log.read_text().splitlines()
    assert len(lines) == 12
    port = sim.ports["host00003"]
    assert f"pre host00003 127.0.0.1:{port} v2" in lines
    assert f"post host00003 127.0.0.1:{port} v2" in lines


def test_failing_pre_hook_fails_the_host_before_its_upgrade(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(6, upgrade_delay=0.01)
    hook = 'test "$HATCHERY_HOST" != host00002 || { echo drain refused; exit 7; }'
    res = rollout(tls, *run_args(sim, tmp_path / "j.jsonl"), *FAST, "--pre-hook", hook)
    assert res.returncode == 3
    assert "host00002" in res.stderr and "pre hook exited with 7: drain refused" in res.stderr
    stats = sim.stats()
    assert stats["host00002"]["posts"] == 0
    assert all(stats[f"host{i:05d}"]["posts"] == 0 for i in range(3, 6))
