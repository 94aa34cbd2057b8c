"""``hatchery-rollout``: upgrade a fleet in growing-concurrency waves, health-gated, resumable.

Commands: ``plan`` (print waves and the predicted time), ``run`` (preflight, then upgrade),
``resume JOURNAL`` (continue after a crash or a halt), ``status JOURNAL``. While ``run`` or
``resume`` upgrades, SIGUSR1 pauses it (hosts in flight finish, no new host starts) and
SIGUSR2 lets it go on. Errors are one line plus a hint;
tracebacks only with ``--debug``. Exit status: 0 done, 1 error, 3 halted by a failed host.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import datetime as dt
import json
import logging
import resource
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hatchery.client import Credentials
from hatchery.errors import HatcheryError, report
from hatchery.log import setup_logging
from hatchery.wire import Health, Mode
from hatchery_rollout import preflight
from hatchery_rollout.client import AgentClient
from hatchery_rollout.errors import JournalError, RolloutError
from hatchery_rollout.executor import ExecOptions, Executor, Outcome
from hatchery_rollout.inventory import DEFAULT_PORT, Fleet, Host, load_fleet, synthetic_fleet
from hatchery_rollout.journal import HostRecord, HostState, Journal, JournalState, read_journal
from hatchery_rollout.planner import (
    Plan,
    PlanOptions,
    format_duration,
    make_plan,
    parse_progression,
    predict_window,
)
from hatchery_rollout.progress import Progress

log = logging.getLogger("hatchery_rollout.cli")
EXIT_HALTED = 3


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mutual TLS")
    g.add_argument(
        "--ca",
        type=Path,
        default=None,
        help="CA (default $HATCHERY_CA, else ca.pem in $XDG_CONFIG_HOME/hatchery or "
        "~/.config/hatchery)",
    )
    g.add_argument(
        "--cert",
        type=Path,
        default=None,
        help="client certificate ($HATCHERY_CERT, else client.pem there)",
    )
    g.add_argument(
        "--key",
        type=Path,
        default=None,
        help="client key ($HATCHERY_KEY, else client.key there)",
    )
    g.add_argument("--connections", type=int, default=256, help="open connections at most (256)")
    g.add_argument("--request-timeout", type=float, default=10.0, help="seconds per request (10)")


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument(
        "--progression",
        default="linear",
        help="linear (default), exponential, or a list such as 1,5,10%%",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="hosts per wave at most")
    g.add_argument("--spread", default=None, help="failure-domain level (e.g. rack) or 'location'")
    g.add_argument(
        "--vms-anywhere", action="store_true", help="do not move hosts without VMs to the front"
    )


def _plan_options(args: argparse.Namespace) -> PlanOptions:
    return PlanOptions(
        progression=parse_progression(args.progression),
        max_concurrency=args.max_concurrency,
        spread=args.spread,
        empty_first=not args.vms_anywhere,
    )


def _print_plan(plan: Plan, host_seconds: float, as_json: bool, extra: Mapping[str, Any]) -> None:
    barrier = plan.predict_barrier(host_seconds)
    window = predict_window(plan.hosts, host_seconds, plan.options.max_concurrency)
    if as_json:
        doc = {
            "hosts": plan.hosts,
            "steps": len(plan.waves),
            "sizes": [len(w) for w in plan.waves],
            "waves": [[h.name for h in w] for w in plan.waves],
            "progression": str(plan.options.progression),
            "max_concurrency": plan.options.max_concurrency,
            "spread": plan.options.spread,
            "host_seconds": host_seconds,
            "predicted_seconds": {"barrier": barrier, "window": window},
            **extra,
        }
        print(json.dumps(doc, indent=2))
        return
    o = plan.options
    print(
        f"{plan.hosts} hosts in {len(plan.waves)} steps ({o.progression}"
        f"{f', at most {o.max_concurrency} a step' if o.max_concurrency else ''}"
        f"{f', spread by {o.spread}' if o.spread else ''})"
    )
    for key, value in extra.items():
        print(f"{key}: {value}")
    for i, wave in enumerate(plan.waves, 1):
        names = wave[0].name if len(wave) == 1 else f"{wave[0].name} … {wave[-1].name}"
        print(f"  step {i:4d}: {len(wave):6d} hosts  {names}")
    print(
        f"predicted at {host_seconds:g}s a host: {format_duration(barrier)} "
        f"({len(plan.waves)} steps, one after the other); "
        f"{format_duration(window)} with a growing window and no barrier"
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    if (args.hosts is None) == (args.fleet is None):
        raise RolloutError("give exactly one of --hosts N and --fleet FILE")
    if args.hosts is not None and args.hosts < 0:
        raise RolloutError("--hosts must be >= 0")
    fleet = synthetic_fleet(args.hosts) if args.hosts is not None else load_fleet(args.fleet)
    plan = make_plan(fleet.hosts, _plan_options(args), fleet.levels)
    _print_plan(plan, args.host_seconds, args.json, {})
    return 0


def _raise_nofile() -> None:
    """Many agents at once need many sockets: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _client(args: argparse.Namespace, *, keepalive: float | None = 2.0) -> AgentClient:
    _raise_nofile()
    ctx = Credentials.from_env(args.ca, args.cert, args.key).context()
    return AgentClient(
        ctx,
        connections=args.connections,
        request_timeout=args.request_timeout,
        keepalive=keepalive,
    )


def _exec_options(args: argparse.Namespace) -> ExecOptions:
    if getattr(args, "refresh_vms", False) and args.mode != Mode.LIVE:
        raise RolloutError("--refresh-vms is for --mode live",
                           hint="a reboot saves and resumes every VM anyway")  # fmt: skip
    return ExecOptions(
        version=args.version,
        mode=Mode(args.mode),
        poll_interval=args.poll_interval,
        upgrade_timeout=args.upgrade_timeout,
        health_timeout=args.health_timeout,
        pre_hook=args.pre_hook,
        post_hook=args.post_hook,
        hook_timeout=args.hook_timeout,
        allow_downgrade=args.allow_downgrade,
        soak=args.soak,
        halt_on_degraded=args.halt_on_degraded,
        refresh_vms=getattr(args, "refresh_vms", False),
    )


def _predicted_seconds(plan: Plan, args: argparse.Namespace) -> float:
    """The rollout's predicted length: its waves one after the other, soaks between them."""
    soak = float(args.soak)
    return plan.predict_barrier(args.host_seconds) + soak * max(0, len(plan.waves) - 1)


async def _preflight(
    args: argparse.Namespace, fleet: Fleet, plan_options: PlanOptions
) -> tuple[dict[str, Health], list[preflight.Problem], list[Host]]:
    """Ask every host; the problems that would stop the rollout; the hosts to fetch for."""
    t0 = time.monotonic()
    # Two requests per host on one connection (a handshake is most of a request's cost); the
    # second closes it. Its TLS sessions are not kept for the rollout: ten thousand of them
    # cost ~170 MiB (17 KiB each measured), to save ~0.8 ms of CPU a host.
    async with _client(args, keepalive=1.0) as surveyor:
        facts = await preflight.gather(surveyor, fleet.hosts, args.connections)
        source = None
        if args.fetch_from is not None:
            peer = Host("peer", args.fetch_from if ":" in args.fetch_from
                        else f"{args.fetch_from}:{DEFAULT_PORT}")  # fmt: skip
            source = await preflight.source_of(surveyor, peer, args.version)
    log.info("surveyed %d hosts in %.1fs", len(facts), time.monotonic() - t0)
    found = preflight.problems(fleet.hosts, facts, args.version, source)
    survey = {n: f.health for n, f in facts.items() if f.health is not None}
    plan = make_plan(_to_upgrade(fleet, survey, args.version), plan_options, fleet.levels)
    creds = Credentials.from_env(args.ca, args.cert, args.key)
    predicted = _predicted_seconds(plan, args)
    now = dt.datetime.now(dt.UTC)
    cert = preflight.certificate_problem(creds.cert, now, predicted, args.cert_margin)
    if cert is not None:
        found.insert(0, cert)
    fetch = preflight.missing_image(fleet.hosts, facts, args.version) if source else []
    return survey, found, fetch


def _to_upgrade(fleet: Fleet, survey: Mapping[str, Health], version: str) -> list[Host]:
    return [
        replace(h, vms=survey[h.name].vms_total if h.name in survey else h.vms)
        for h in fleet.hosts
        if not (h.name in survey and survey[h.name].version == version)
    ]


async def _run(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    options = _exec_options(args)
    plan_options = _plan_options(args)
    survey: dict[str, Health] = {}
    found: list[preflight.Problem] = []
    fetch: list[Host] = []
    if not args.no_survey:
        survey, found, fetch = await _preflight(args, fleet, plan_options)
    on_target = {n for n, h in survey.items() if h.version == options.version}
    plan = make_plan(_to_upgrade(fleet, survey, options.version), plan_options, fleet.levels)
    if args.dry_run:
        extra: dict[str, Any] = {"already on target": len(on_target)}
        if survey:
            failing = sum(1 for h in survey.values() if h.failing())
            extra["hosts failing a check now (baseline)"] = failing
        if fetch:
            extra[f"hosts to fetch {options.version} from {args.fetch_from}"] = len(fetch)
        extra["preflight"] = f"{len(found)} problem(s)" if found else "ok"
        _print_plan(plan, args.host_seconds, args.json, extra)
        for problem in found:
            print(f"problem: {problem.line()}", file=sys.stderr)
        return 1 if found else 0
    if found:
        raise preflight.refuse(found)
    survey.clear()  # every host's answers: tens of MiB for a large fleet, not needed now
    if fetch:
        print(f"fetching {options.version} from {args.fetch_from} on {len(fetch)} host(s)",
              file=sys.stderr)  # fmt: skip
        async with _client(args, keepalive=None) as fetcher:
            failed = await preflight.distribute(
                fetcher, fetch, args.fetch_from, options.version, args.fetch_concurrency
            )
        if failed:
            raise preflight.refuse(failed)
    client = _client(args)  # TLS files are checked before the journal is made
    journal_path = args.journal or Path(
        f"hatchery-rollout-{options.version}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    )
    start = {
        "version": options.version,
        "options": options.to_json(),
        "plan": {
            "progression": str(plan_options.progression),
            "max_concurrency": plan_options.max_concurrency,
            "spread": plan_options.spread,
        },
        "source": fleet.source,
        "hosts": [
            {"name": h.name, "address": h.address, "location": list(h.location)}
            for h in fleet.hosts
        ],
        "waves": [[h.name for h in w] for w in plan.waves],
    }
    journal = Journal.create(journal_path, start)
    print(f"journal: {journal_path}", file=sys.stderr)
    for name in sorted(on_target):
        journal.append_sync("host", host=name, state=str(HostState.SKIPPED), survey=True)
    records = {h.name: HostRecord() for h in fleet.hosts}
    for name in on_target:
        records[name].state = HostState.SKIPPED
    async with client:
        return await _execute(args, client, journal, fleet.by_name, start, records, options)


async def _execute(
    args: argparse.Namespace,
    client: AgentClient,
    journal: Journal,
    hosts: Mapping[str, Host],
    start: Mapping[str, Any],
    records: dict[str, HostRecord],
    options: ExecOptions,
) -> int:
    waves: list[list[str]] = start["waves"]
    todo = sum(
        1 for w in waves for n in w if records[n].state not in (HostState.DONE, HostState.SKIPPED)
    )
    progress = Progress(todo, len(waves), interval=args.progress_interval)
    executor = Executor(hosts, waves, records, journal, client, options, progress)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, executor.pause)
    loop.add_signal_handler(signal.SIGUSR2, executor.go)
    try:
        with progress:
            outcome = await executor.run()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        loop.remove_signal_handler(signal.SIGUSR2)
        await journal.aclose()
    _print_table(waves, records, outcome)
    if outcome.degraded:
        print(f"hatchery-rollout: {len(outcome.degraded)} host(s) degraded (a VM not resumed): "
              f"{', '.join(sorted(outcome.degraded))}", file=sys.stderr)  # fmt: skip
    if outcome.halted_by is not None:
        host, reason = outcome.halted_by
        print(f"hatchery-rollout: halted: {host} failed: {reason}", file=sys.stderr)
        print(
            f"hint: fix {host}, then: hatchery-rollout resume {journal.path} --retry-failed",
            file=sys.stderr,
        )
        return EXIT_HALTED
    print(f"hatchery-rollout: done: every host runs {options.version}", file=sys.stderr)
    return 0


def _print_table(
    waves: Sequence[Sequence[str]], records: Mapping[str, HostRecord], outcome: Outcome | None
) -> None:
    print(
        f"{'step':>5} {'hosts':>6} {'done':>6} {'skipped':>8} {'failed':>7} {'pending':>8}"
        f" {'seconds':>8} {_VM_HEADER}"
    )
    totals = [0, 0, 0, 0, 0]
    for i, wave in enumerate(waves):
        states = [records[n].state if n in records else HostState.PENDING for n in wave]
        done = sum(s is HostState.DONE for s in states)
        skipped = sum(s is HostState.SKIPPED for s in states)
        failed = sum(s is HostState.FAILED for s in states)
        pending = len(wave) - done - skipped - failed
        times = [
            r.finished - r.started
            for n in wave
            if (r := records.get(n)) is not None
            and r.started is not None
            and r.finished is not None
        ]
        secs = f"{max(times):.1f}" if times else "-"
        print(
            f"{i + 1:>5} {len(wave):>6} {done:>6} {skipped:>8} {failed:>7} {pending:>8} {secs:>8}"
            f" {_vm_columns([records[n] for n in wave if n in records])}"
        )
        for j, v in enumerate((len(wave), done, skipped, failed, pending)):
            totals[j] += v
    print(
        f"{'all':>5} {totals[0]:>6} {totals[1]:>6} {totals[2]:>8} {totals[3]:>7} {totals[4]:>8}"
        f" {'':>8} {_vm_columns(list(records.values()))}"
    )
    for name, rec in records.items():
        if rec.state is HostState.FAILED:
            print(f"failed: {name}: {rec.reason}")
    for name, rec in records.items():
        if rec.vms is not None and rec.vms.degraded is not None and rec.state is HostState.DONE:
            print(f"degraded: {name}: {rec.vms.degraded}")


_VM_HEADER = f"{'resumed':>8} {'cold':>5} {'max pause':>10}"


def _vm_columns(records: Sequence[HostRecord]) -> str:
    """The reboot VM report's columns for these hosts: VMs resumed, cold-started, and the
    longest pause (``-`` where no host reported)."""
    tallies = [r.vms for r in records if r.vms is not None]
    if not tallies:
        return f"{'-':>8} {'-':>5} {'-':>10}"
    pauses = [t.max_pause for t in tallies if t.max_pause is not None]
    pause = f"{max(pauses):.1f}s" if pauses else "-"
    resumed, cold = sum(t.resumed for t in tallies), sum(t.cold_started for t in tallies)
    return f"{resumed:>8} {cold:>5} {pause:>10}"


def _cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def _hosts_from_start(start: Mapping[str, Any]) -> dict[str, Host]:
    try:
        return {
            str(h["name"]): Host(str(h["name"]), str(h["address"]), tuple(h.get("location", ())))
            for h in start["hosts"]
        }
    except (KeyError, TypeError) as exc:
        raise JournalError(f"the journal's start record has no usable host list ({exc})") from exc


async def _resume(args: argparse.Namespace) -> int:
    journal, state = Journal.reopen(args.journal)
    try:
        if state.ended is not None and state.ended.get("result") == "done":
            print(f"hatchery-rollout: {args.journal}: already done", file=sys.stderr)
            journal.close()
            return 0
        failed = state.failed()
        if failed and not args.retry_failed:
            name, reason = failed[0]
            raise RolloutError(
                f"{len(failed)} host(s) failed, first {name}: {reason}",
                hint=f"fix them, then: hatchery-rollout resume {args.journal} --retry-failed",
            )
        journal.append_sync("resume", retry_failed=bool(args.retry_failed))
        state = read_journal(args.journal)
        hosts = _hosts_from_start(state.start)
        records = {n: state.hosts.get(n, HostRecord()) for n in hosts}
        options = ExecOptions.from_json(state.version, state.start.get("options", {}))
    except BaseException:
        journal.close()
        raise
    async with _client(args) as client:
        return await _execute(args, client, journal, hosts, state.start, records, options)


def _cmd_resume(args: argparse.Namespace) -> int:
    return asyncio.run(_resume(args))


def _status_doc(state: JournalState) -> dict[str, Any]:
    counts = state.counts()
    total = len(state.start.get("hosts", ()))
    counts[HostState.PENDING] += total - len(state.hosts)
    result = "halted" if state.halted else (state.ended or {}).get("result", "running or crashed")
    return {
        "version": state.version,
        "hosts": total,
        "steps": len(state.waves),
        "result": result,
        "resumes": state.resumes,
        "counts": {str(k): v for k, v in counts.items() if v},
        "failed": [{"host": n, "reason": r} for n, r in state.failed()],
        "degraded": [{"host": n, "reason": r} for n, r in state.degraded()],
        "vms": _vm_totals(state),
        "torn_tail": state.torn,
    }


def _vm_totals(state: JournalState) -> dict[str, Any]:
    """Over the hosts that reported their VMs after a reboot: how many resumed, were
    cold-started or are not running, and the longest pause; after a live patch with
    ``--refresh-vms`` also how many were refreshed or left on the old QEMU."""
    tallies = [r.vms for r in state.hosts.values() if r.vms is not None]
    pauses = [t.max_pause for t in tallies if t.max_pause is not None]
    totals: dict[str, Any] = {
        "hosts": len(tallies),
        "resumed": sum(t.resumed for t in tallies),
        "cold_started": sum(t.cold_started for t in tallies),
        "not_restored": sum(t.not_restored for t in tallies),
        "max_pause": max(pauses) if pauses else None,
    }
    refreshed = sum(t.refreshed for t in tallies)
    refresh_failed = sum(t.refresh_failed for t in tallies)
    if refreshed or refresh_failed:
        totals.update(refreshed=refreshed, refresh_failed=refresh_failed)
    return totals


def _cmd_status(args: argparse.Namespace) -> int:
    state = read_journal(args.journal)
    doc = _status_doc(state)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"rollout to {doc['version']}: {doc['result']}; "
        f"{doc['hosts']} hosts in {doc['steps']} steps"
        f"{f', resumed {state.resumes}x' if state.resumes else ''}"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in doc["counts"].items()))
    _print_table(
        state.waves, {n: state.hosts.get(n, HostRecord()) for w in state.waves for n in w}, None
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatchery-rollout", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the waves and the predicted duration")
    src = plan.add_argument_group("hosts")
    src.add_argument("--hosts", type=int, default=None, help="plan N synthetic hosts")
    src.add_argument("--fleet", type=Path, default=None, help="inventory file or location tree")
    plan.add_argument(
        "--host-seconds", type=float, default=15.0, help="time to upgrade a host (15)"
    )
    plan.add_argument("--json", action="store_true")
    _add_plan(plan)
    plan.set_defaults(func=_cmd_plan)

    run = sub.add_parser("run", help="upgrade the fleet")
    run.add_argument("--fleet", type=Path, required=True, help="inventory file or location tree")
    run.add_argument("--version", required=True, help="target image version")
    run.add_argument("--mode", choices=[str(m) for m in Mode], default="live")
    run.add_argument(
        "--allow-downgrade", action="store_true",
        help="install VERSION even on hosts that run a newer one (agents refuse it otherwise)",
    )  # fmt: skip
    run.add_argument("--journal", type=Path, default=None, help="journal file (new)")
    run.add_argument("--dry-run", action="store_true", help="survey and plan; change nothing")
    run.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    run.add_argument("--host-seconds", type=float, default=15.0, help="for --dry-run's prediction")
    run.add_argument(
        "--no-survey", action="store_true",
        help="do not ask every host first (no preflight: problems show up host by host)",
    )  # fmt: skip
    run.add_argument(
        "--fetch-from", default=None, metavar="PEER",
        help="hosts without the image fetch it from this agent (HOST[:PORT]) before wave 1",
    )  # fmt: skip
    run.add_argument("--fetch-concurrency", type=int, default=4,
                     help="hosts fetching from the peer at once (4)")  # fmt: skip
    run.add_argument(
        "--cert-margin", type=float, default=3600.0,
        help="seconds the client certificate must outlive the predicted end (3600)",
    )  # fmt: skip
    run.add_argument(
        "--soak", type=float, default=0.0,
        help="seconds to wait after each wave, then re-check its hosts' health (0)",
    )  # fmt: skip
    run.add_argument(
        "--halt-on-degraded", action="store_true",
        help="reboot mode: a host whose VM could only be cold-started (not resumed) halts the "
        "rollout (default: it is reported, the rollout goes on)",
    )  # fmt: skip
    run.add_argument(
        "--refresh-vms", action="store_true",
        help="live mode: after the patch each host moves every running VM to a new QEMU "
        "process (vm refresh); a VM left on the old QEMU makes its host degraded",
    )  # fmt: skip
    run.add_argument("--poll-interval", type=float, default=2.0)
    run.add_argument("--upgrade-timeout", type=float, default=1800.0)
    run.add_argument("--health-timeout", type=float, default=300.0)
    run.add_argument("--pre-hook", default=None, help="shell command before each host's upgrade")
    run.add_argument("--post-hook", default=None, help="shell command after each host is healthy")
    run.add_argument("--hook-timeout", type=float, default=600.0)
    run.add_argument("--progress-interval", type=float, default=None)
    _add_plan(run)
    _add_tls(run)
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue a crashed or halted rollout")
    resume.add_argument("journal", type=Path)
    resume.add_argument("--retry-failed", action="store_true", help="retry the failed hosts")
    resume.add_argument("--progress-interval", type=float, default=None)
    _add_tls(resume)
    resume.set_defaults(func=_cmd_resume)

    status = sub.add_parser("status", help="what a journal says")
    status.add_argument("journal", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    return parser


def _small_tls_buffers() -> None:
    """Read TLS into 16 KiB (one TLS record) rather than asyncio's 256 KiB per connection.

    asyncio's SSL transport allocates ``SSLProtocol.max_size`` bytes for each connection and
    reads at most that much at a time; the agents' answers are small JSON documents, so a
    smaller buffer costs nothing and saves ~60 MiB with 256 connections open (the survey).
    This process is the tool's own: nothing else shares its event loop. ``max_size`` is an
    undocumented class attribute of CPython's asyncio (3.11): if it goes away, setting it is
    harmless and the buffers are simply the default size again.
    """
    asyncio.sslproto.SSLProtocol.max_size = 16 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _small_tls_buffers()
    setup_logging(args.debug)
    try:
        result: int = args.func(args)
        return result
    except HatcheryError as exc:
        return report("hatchery-rollout", exc)
    except KeyboardInterrupt:
        print(
            "hatchery-rollout: interrupted; the journal keeps the state: resume it", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
