"""hatchery-rollout against a simulated 10 000-host fleet, and the plan against the paper.

One simulator process serves every agent endpoint over mutual TLS on loopback; each upgrade
takes ``DELAY`` seconds (15 s scaled down). The tool runs as a child process: its wall time
against the ideal schedule for the same progression (steps × DELAY: a barrier between steps,
zero cost per request), its CPU time and peak memory from ``wait4``'s rusage. The survey (the
preflight: two requests to every host before planning) is reported apart from the rollout
proper.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import table, write_section
from hatchery import pki
from hatchery_rollout.inventory import synthetic_fleet
from hatchery_rollout.journal import read_journal
from hatchery_rollout.planner import format_duration, make_plan, predict_window

HOSTS = int(os.environ.get("BENCH_ROLLOUT_HOSTS", "10000"))
DELAY = float(os.environ.get("BENCH_ROLLOUT_DELAY", "0.5"))  # seconds an upgrade takes
POLL = DELAY / 5  # the default 2 s poll for 15 s hosts, scaled alike
PAPER = {100: "3m32s", 10_000: "35m21s"}


def _rusage_wait(proc: subprocess.Popen[bytes]) -> tuple[int, os.struct_rusage]:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _plan_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for n in (100, 10_000):
        plan = make_plan(synthetic_fleet(n).hosts)
        rows.append(
            [
                n,
                len(plan.waves),
                format_duration(plan.predict_barrier(15)),
                format_duration(predict_window(n, 15)),
                PAPER[n],
            ]
        )
    return rows


def _handshake_cpu(ctx_client: ssl.SSLContext, ctx_server: ssl.SSLContext) -> tuple[float, float]:
    """CPU seconds of one full mutual-TLS handshake on each side (median of 200), with the
    bench's own certificates, client and server in this process over memory BIOs: the
    floor under any client of this machine's OpenSSL, whatever its HTTP layer."""
    client_times: list[float] = []
    server_times: list[float] = []
    for _ in range(200):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = ctx_client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
        server = ctx_server.wrap_bio(s_in, s_out, server_side=True)
        spent = {"client": 0.0, "server": 0.0}
        done = {"client": False, "server": False}
        while not all(done.values()):
            for side, obj, out, peer_in in (
                ("client", client, c_out, s_in),
                ("server", server, s_out, c_in),
            ):
                if not done[side]:
                    t = time.process_time()
                    try:
                        obj.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                    spent[side] += time.process_time() - t
                peer_in.write(out.read())
        client_times.append(spent["client"])
        server_times.append(spent["server"])
    client_times.sort()
    server_times.sort()
    return client_times[100], server_times[100]


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = pki.init_ca(tmp / "ca")
        server = pki.issue(tmp / "ca", "sim", tmp, server_names=("127.0.0.1",))
        client = pki.issue(tmp / "ca", "bench", tmp, groups=("admin",))
        hs_client, hs_server = _handshake_cpu(
            pki.client_context(ca, client.cert, client.key),
            pki.server_context(ca, server.cert, server.key),
        )
        config = {
            "hosts": HOSTS,
            "ca": str(ca),
            "cert": str(server.cert),
            "key": str(server.key),
            "upgrade_delay": DELAY,
            "fleet": str(tmp / "fleet.yaml"),
            "ready": str(tmp / "ready.json"),
        }
        (tmp / "sim.json").write_text(json.dumps(config))
        sim = subprocess.Popen(
            [sys.executable, "-m", "hatchery_rollout.simfleet", str(tmp / "sim.json")],
            stdout=subprocess.DEVNULL,
        )
        try:
            t0 = time.monotonic()
            while not (tmp / "ready.json").exists():
                if sim.poll() is not None or time.monotonic() - t0 > 300:
                    raise SystemExit("the simulated fleet did not start")
                time.sleep(0.2)
            print(f"simulated {HOSTS} agents ready in {time.monotonic() - t0:.1f}s", flush=True)
            journal = tmp / "journal.jsonl"
            argv = [
                sys.executable,
                "-m",
                "hatchery_rollout.cli",
                "run",
                "--fleet",
                str(tmp / "fleet.yaml"),
                "--version",
                "v2",
                "--journal",
                str(journal),
                "--poll-interval",
                str(POLL),
                "--progress-interval",
                "15",
                "--ca",
                str(ca),
                "--cert",
                str(client.cert),
                "--key",
                str(client.key),
            ]
            started = time.time()
            tool = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            code, usage = _rusage_wait(tool)
            wall = time.time() - started
            if code != 0:
                raise SystemExit(f"the rollout failed with exit status {code}")
        finally:
            if sim.poll() is None:
                os.kill(sim.pid, signal.SIGTERM)
            _, sim_usage = _rusage_wait(sim)
        state = read_journal(journal)
        first = float(state.start["ts"])
        end = float((state.ended or {}).get("ts", first))
        waves = len(state.waves)

    ideal = waves * DELAY
    rollout = end - first
    survey = first - started
    cpu = usage.ru_utime + usage.ru_stime
    sim_cpu = sim_usage.ru_utime + sim_usage.ru_stime
    rows = [
        ["ideal schedule (steps × upgrade time)", f"{ideal:.1f}", "-"],
        ["hatchery-rollout, rollout proper", f"{rollout:.1f}", f"{(rollout / ideal - 1):+.1%}"],
        ["hatchery-rollout, with the survey", f"{wall:.1f}", f"{(wall / ideal - 1):+.1%}"],
    ]
    body = (
        f"{HOSTS} simulated agents (one process, one loopback port each, mutual TLS), an "
        f"upgrade takes {DELAY:g} s (15 s scaled down {15 / DELAY:g}x), polls every {POLL:g} s; "
        f"linear progression: {waves} steps.\n\n"
        + table(["run", "seconds", "overhead vs ideal"], rows)
        + "\n\n"
        + "Survey (the preflight: health and image store of every host, one connection "
        + f"each, before planning): {survey:.1f} s. "
        + f"Tool CPU: {cpu:.1f} s ({cpu / wall:.0%} of one core), peak RSS "
        + f"{usage.ru_maxrss / 1024:.0f} MiB; the simulator used {sim_cpu:.1f} s CPU. Both "
        + "share the machine's 2 cores, so part of the overhead is the simulator's load.\n\n"
        + f"The floor under any client on this machine ({ssl.OPENSSL_VERSION}): one full "
        + f"mutual-TLS handshake costs {hs_client * 1e3:.2f} ms of CPU on the client and "
        + f"{hs_server * 1e3:.2f} ms on the agent (median of 200, in one process). A host "
        + "needs two connections (the survey's, the upgrade's), so the tool's CPU cannot go "
        + f"below {2 * HOSTS * hs_client:.1f} s, and the survey, with every handshake's two "
        + f"sides on {os.cpu_count()} cores, not below "
        + f"{HOSTS * (hs_client + hs_server) / (os.cpu_count() or 1):.1f} s, before any HTTP "
        + "request is made.\n\n"
        + "Plan against SmallStack's table (15 s a host, linear progression):\n\n"
        + table(
            ["hosts", "steps", "predicted (barrier)", "predicted (window)", "paper"],
            _plan_rows(),
        )
        + "\n\nThe paper's figures are a few seconds above steps × 15 s: its per-step overhead."
    )
    print(body)
    write_section("rollout", "Fleet rollout: hatchery-rollout vs the ideal schedule", body)
