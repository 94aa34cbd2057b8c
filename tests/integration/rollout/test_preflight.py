"""The rollout's preflight, soak and pause against a simulated fleet over mutual TLS.

``hatchery-rollout run`` must refuse, changing nothing, when it cannot finish: a host that
does not answer, a host without the image (and no peer to fetch it from), a host without
room to stage it, a client certificate that would expire before the predicted end. Each
refusal is one line naming the host. ``--fetch-from`` distributes the image first; ``--soak``
re-checks each wave's health after a wait; SIGUSR1/SIGUSR2 pause and go on.
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

from hatchery_lab.agent import free_port
from hatchery_rollout.journal import read_journal
from tests.integration.rollout.conftest import SimFleet, Tls

FAST = ["--poll-interval", "0.01", "--progress-interval", "2"]


def rollout(tls: Tls, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hatchery_rollout.cli", *args, *tls.args()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _with_unreachable_host(sim: SimFleet) -> str:
    """Add a host whose port nothing listens on; its address."""
    address = f"127.0.0.1:{free_port()}"
    with sim.fleet.open("a") as fleet:
        fleet.write(f"  - {{name: hostdown, address: '{address}', location: sim/b1/r9}}\n")
    return address


def test_preflight_refuses_with_one_line_per_problem_and_changes_nothing(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(12, missing_image=["host00003"], low_space=["host00007"])
    address = _with_unreachable_host(sim)
    journal = tmp_path / "j.jsonl"
    args = ["run", "--fleet", str(sim.fleet), "--version", "v2", "--journal", str(journal),
            "--host-seconds", "600", "--cert-margin", str(400 * 86400)]  # fmt: skip
    # The fixture's client certificate lives 90 days: a 400-day margin cannot be met.
    refused = rollout(tls, *args, *FAST)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    err = refused.stderr
    assert "preflight found 4 problem(s); nothing was changed" in err, err
    assert f"hostdown: unreachable at {address}" in err
    assert "host00003: image v2 is not in its store" in err
    assert "host00007: 0.00 GiB free on /data" in err
    assert "the client certificate" in err and "expires at" in err
    assert not journal.exists()
    assert all(s["posts"] == 0 for s in sim.stats().values())
    # --dry-run lists the same problems and exits 1; with a short margin the cert is fine.
    dry = rollout(tls, *args[:-2], "--dry-run", *FAST)
    assert dry.returncode == 1, dry.stderr
    problems = [line for line in dry.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 3, dry.stderr
    assert "preflight: 3 problem(s)" in dry.stdout


def test_fetch_from_a_peer_distributes_the_image_before_wave_one(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(6, upgrade_delay=0.01, missing_image=["host00002", "host00004"])
    peer = f"127.0.0.1:{sim.ports['host00000']}"
    journal = tmp_path / "j.jsonl"
    args = ["run", "--fleet", str(sim.fleet), "--version", "v2", "--journal", str(journal)]
    dry = rollout(tls, *args, "--fetch-from", peer, "--dry-run", *FAST)
    assert dry.returncode == 0, dry.stderr
    assert f"hosts to fetch v2 from {peer}: 2" in dry.stdout
    done = rollout(tls, *args, "--fetch-from", peer, *FAST)
    assert done.returncode == 0, done.stderr
    stats = sim.stats()
    assert {n: s["fetches"] for n, s in stats.items() if s["fetches"]} == {
        "host00002": 1,
        "host00004": 1,
    }
    assert all(s["version"] == "v2" for s in stats.values())


def test_soak_rechecks_each_wave_and_halts_on_a_host_that_degraded(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(6, upgrade_delay=0.01)
    journal = tmp_path / "j.jsonl"
    argv = [sys.executable, "-m", "hatchery_rollout.cli", "run", "--fleet", str(sim.fleet),
            "--version", "v2", "--journal", str(journal), "--soak", "3", *FAST,
            *tls.args()]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # Wave 1 is host00000 alone; once done, the journal says the soak began.
        while '"t":"soak"' not in (journal.read_text() if journal.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sim.configure(baseline_fail=["host00000"])  # it degrades while the wave soaks
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert "host00000 failed: unhealthy after the soak" in err, err
    stats = sim.stats()
    assert all(s["posts"] == 0 for n, s in stats.items() if n != "host00000")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["step"] for r in records if r["t"] == "soak"] == [1]


def test_sigusr1_pauses_and_sigusr2_goes_on(
    simfleet: Callable[..., SimFleet], tls: Tls, tmp_path: Path
) -> None:
    sim = simfleet(40, upgrade_delay=0.3)
    journal = tmp_path / "j.jsonl"
    argv = [sys.executable, "-m", "hatchery_rollout.cli", "run", "--fleet", str(sim.fleet),
            "--version", "v2", "--journal", str(journal), *FAST, *tls.args()]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum(s["posts"] for s in sim.stats().values()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)
        # Hosts already past the gate when the signal came still post; wait until the
        # journal says the pause began and every started host is done, however slow the
        # machine, then no host may start for as long as the pause lasts.
        while True:
            records = [json.loads(x) for x in journal.read_text().splitlines()]
            kinds = [r["t"] for r in records]
            posting = {r["host"] for r in records if r.get("state") == "posting"}
            done = {r["host"] for r in records if r.get("state") == "done"}
            if "pause" in kinds and posting <= done:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        paused = sum(s["posts"] for s in sim.stats().values())
        time.sleep(1.5)
        assert sum(s["posts"] for s in sim.stats().values()) == paused  # nothing new started
        assert paused < 40 and proc.poll() is None
        os.kill(proc.pid, signal.SIGUSR2)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert all(s["version"] == "v2" for s in sim.stats().values())
    kinds = [json.loads(line)["t"] for line in journal.read_text().splitlines()]
    assert kinds.index("pause") < kinds.index("continue")
    assert read_journal(journal).ended is not None
