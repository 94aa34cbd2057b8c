"""Run a plan against the fleet: health-gated waves, halt on the first failure, journaled.

Per host (each step journaled before it is taken):

1. baseline: ``GET /healthz``; checks failing now are recorded and do not count later; a host
   already on the target version is skipped. The next wave's baselines are asked for while
   this wave's upgrades run (once all of its requests are out; read-only, at most
   ``AHEAD_MAX_AGE`` old when used, dropped on a pause or a halt, not taken with a soak),
   so a wave starts with its upgrade requests and the wave boundary costs no handshakes;
2. the pre hook (if any), then ``POST /v1/upgrade`` (``posting`` is durable first);
3. poll until the agent reports the target version and its upgrade is no longer running
   (a reboot-mode host may be unreachable meanwhile);
4. health: poll ``/healthz`` until no check fails that was not failing before, within the
   health timeout; ``boot.fallback`` is a failure;
5. reboot mode: the agent's per-VM report (``vm_report``): resumed, cold-started, and the
   longest pause are journaled with the host; a VM that was not resumed makes the host
   *degraded*, which halts the rollout only with ``halt_on_degraded``;
6. the post hook (if any); done.

A host whose upgrade request may already have reached its agent (resume after a crash, or
``--retry-failed``) is first re-checked: if the agent runs or is installing the target,
the request is not sent again; otherwise it is re-sent (the POST is idempotent per version).

A failed host halts the rollout: no new host starts, hosts in flight finish, the next wave
never starts. With ``soak``, each wave but the last is followed by a wait and one more health
check of its hosts (a host that degraded meanwhile fails). ``pause`` holds back hosts not
started yet until ``go`` (the CLI wires them to SIGUSR1 and SIGUSR2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hatchery.wire import Health, Mode, Phase, UpgradeRequest, VmResult
from hatchery_rollout import vmreport
from hatchery_rollout.client import AgentClient
from hatchery_rollout.errors import AgentError, RolloutError
from hatchery_rollout.inventory import Host
from hatchery_rollout.journal import FINAL, HostRecord, HostState, Journal
from hatchery_rollout.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExecOptions:
    version: str
    mode: Mode = Mode.LIVE
    poll_interval: float = 2.0
    upgrade_timeout: float = 1800.0
    health_timeout: float = 300.0
    pre_hook: str | None = None
    post_hook: str | None = None
    hook_timeout: float = 600.0
    allow_downgrade: bool = False
    soak: float = 0.0  # seconds after each wave before its hosts' health is checked again
    halt_on_degraded: bool = False  # a VM cold-started (not resumed) fails its host
    refresh_vms: bool = False  # live mode: every VM moved to a new QEMU after the patch

    def request(self) -> UpgradeRequest:
        """What each host is sent (the wire schema's ``POST /v1/upgrade`` body)."""
        return UpgradeRequest(self.version, self.mode, allow_downgrade=self.allow_downgrade,
                              refresh_vms=self.refresh_vms)  # fmt: skip

    def to_json(self) -> dict[str, object]:
        return {
            "allow_downgrade": self.allow_downgrade,
            "mode": str(self.mode),
            "poll_interval": self.poll_interval,
            "upgrade_timeout": self.upgrade_timeout,
            "health_timeout": self.health_timeout,
            "pre_hook": self.pre_hook,
            "post_hook": self.post_hook,
            "hook_timeout": self.hook_timeout,
            "soak": self.soak,
            "halt_on_degraded": self.halt_on_degraded,
            "refresh_vms": self.refresh_vms,
        }

    @classmethod
    def from_json(cls, version: str, data: Mapping[str, object]) -> ExecOptions:
        def num(key: str, default: float) -> float:
            value = data.get(key, default)
            return float(value) if isinstance(value, int | float) else default

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        return cls(
            version=version,
            mode=Mode(str(data.get("mode", "live"))),
            poll_interval=num("poll_interval", 2.0),
            upgrade_timeout=num("upgrade_timeout", 1800.0),
            health_timeout=num("health_timeout", 300.0),
            pre_hook=text("pre_hook"),
            post_hook=text("post_hook"),
            hook_timeout=num("hook_timeout", 600.0),
            allow_downgrade=data.get("allow_downgrade") is True,
            soak=num("soak", 0.0),
            halt_on_degraded=data.get("halt_on_degraded") is True,
            refresh_vms=data.get("refresh_vms") is True,
        )


LONG_POLL = 30.0  # seconds an agent may hold GET /v1/upgrade?wait= open
AHEAD_MAX_AGE = 30.0  # seconds a baseline taken during the previous wave stays usable


class HostFailed(RolloutError):
    """This host's upgrade failed; the message says why."""


class _NotStarted(Exception):
    """The rollout halted before this host's upgrade was requested."""


@dataclass(slots=True)
class Outcome:
    halted_by: tuple[str, str] | None = None  # (host, reason) of the first failure
    failed: dict[str, str] = field(default_factory=dict)
    wave_seconds: list[float] = field(default_factory=list)
    not_started: int = 0
    degraded: dict[str, str] = field(default_factory=dict)  # host -> why (not halting)


class Executor:
    def __init__(
        self,
        hosts: Mapping[str, Host],
        waves: Sequence[Sequence[str]],
        records: dict[str, HostRecord],
        journal: Journal,
        client: AgentClient,
        options: ExecOptions,
        progress: Progress,
    ) -> None:
        self.hosts = hosts
        self.waves = waves
        self.records = records
        self.journal = journal
        self.client = client
        self.opts = options
        self.progress = progress
        self.outcome = Outcome()
        self._halt = asyncio.Event()
        self._going = asyncio.Event()  # cleared while paused: no host starts
        self._going.set()
        self._notes: set[asyncio.Task[None]] = set()
        # Baselines of the next wave, taken while this one upgrades: (health, when).
        self._ahead: dict[str, tuple[Health, float]] = {}
        self._ahead_task: asyncio.Task[None] | None = None
        self._unposted: set[str] = set()  # this wave's hosts whose request is not out yet
        self._posted = asyncio.Event()

    def pause(self) -> None:
        """No new host starts until ``go``; hosts already upgrading finish (SIGUSR1)."""
        if self._going.is_set():
            self._going.clear()
            log.warning("paused: hosts in flight finish, no new host starts (SIGUSR2 goes on)")
            self._ahead.clear()  # retaken when the hosts start
            self._note("pause")

    def _note(self, kind: str) -> None:
        """Journal ``kind`` from a signal handler (not a coroutine): queued, not waited for."""
        task = asyncio.get_running_loop().create_task(self.journal.append(kind, wait=False))
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    def go(self) -> None:
        """Start hosts again after ``pause`` (SIGUSR2)."""
        if not self._going.is_set():
            self._going.set()
            log.warning("going on")
            self._note("continue")

    async def run(self) -> Outcome:
        for index, wave in enumerate(self.waves):
            todo = [n for n in wave if self.records[n].state not in FINAL]
            if self._halt.is_set():
                self.outcome.not_started += len(todo)
                continue
            self._stop_ahead()
            self.progress.start_wave(index)
            started = time.monotonic()
            if todo:
                self._unposted = set(todo)
                self._posted.clear()
                if self.opts.soak <= 0 and index + 1 < len(self.waves):
                    self._ahead_task = asyncio.create_task(
                        self._baselines_ahead(self.waves[index + 1]), name="baselines-ahead"
                    )
                await asyncio.gather(*(self._one(n) for n in todo))
            self.outcome.wave_seconds.append(time.monotonic() - started)
            last = index == len(self.waves) - 1
            if todo and self.opts.soak > 0 and not last and not self._halt.is_set():
                await self._soak(
                    index, [n for n in todo if self.records[n].state is HostState.DONE]
                )
        self._stop_ahead()
        if self.outcome.halted_by is None:
            await self.journal.append("end", result="done")
        else:
            host, reason = self.outcome.halted_by
            await self.journal.append("end", result="halted", host=host, reason=reason)
        return self.outcome

    def _stop_ahead(self) -> None:
        """A wave starts: baselines not in yet are asked by their hosts themselves."""
        if self._ahead_task is not None:
            self._ahead_task.cancel()
            self._ahead_task = None

    def _request_out(self, name: str) -> None:
        """``name``'s upgrade request is out (or never will be): once the whole wave's are,
        the next wave's baselines may be taken."""
        self._unposted.discard(name)
        if not self._unposted:
            self._posted.set()

    async def _baselines_ahead(self, wave: Sequence[str]) -> None:
        """Ask the next wave's hosts for their health while this wave upgrades: the CPU is
        idle then, and the new wave starts with its upgrade requests. A host that does not
        answer here is simply asked again when it starts."""
        await self._posted.wait()
        names = [n for n in wave if not self.records[n].sent and self.records[n].state
                 not in FINAL]  # fmt: skip

        async def one(name: str) -> None:
            if self._halt.is_set() or not self._going.is_set():
                return
            try:
                health = await self.client.health(self.hosts[name])
            except AgentError:
                return
            self._ahead[name] = (health, time.monotonic())

        await asyncio.gather(*(one(n) for n in names))

    def _baseline_ahead(self, name: str) -> Health | None:
        taken = self._ahead.pop(name, None)
        if taken is None or time.monotonic() - taken[1] > AHEAD_MAX_AGE:
            return None
        return taken[0]

    async def _soak(self, index: int, names: Sequence[str]) -> None:
        """Wait ``soak`` seconds, then each host of the wave must still be healthy (against
        its baseline): a host that degrades after it was done halts the rollout."""
        log.info("step %d done: soaking %gs", index + 1, self.opts.soak)
        await self.journal.append("soak", step=index + 1, seconds=self.opts.soak)
        await asyncio.sleep(self.opts.soak)

        async def recheck(name: str) -> None:
            host, rec = self.hosts[name], self.records[name]
            try:
                health = await self.client.health(host, close=True)
            except AgentError as exc:
                await self._fail(host, rec, f"after the soak: {exc}")
                return
            new = tuple(c for c in health.failing() if c not in set(rec.baseline or ()))
            if health.version != self.opts.version or new:
                what = health.detail(new) if new else f"runs {health.version}"
                await self._fail(host, rec, f"unhealthy after the soak: {what}")

        await asyncio.gather(*(recheck(n) for n in names))

    async def _one(self, name: str) -> None:
        if not self._going.is_set():
            await self._going.wait()
        if self._halt.is_set():  # a host of this wave failed before this one started
            self.outcome.not_started += 1
            self._request_out(name)
            return
        host, rec = self.hosts[name], self.records[name]
        start = time.monotonic()
        self.progress.host_started()
        try:
            skipped = await self._upgrade(host, rec)
        except _NotStarted:
            self.progress.in_flight -= 1
            self.outcome.not_started += 1
            return
        except (HostFailed, AgentError) as exc:
            await self._fail(host, rec, str(exc))
            self.progress.host_finished(False, None)
            return
        finally:
            self._request_out(name)
        self.progress.host_finished(True, None if skipped else time.monotonic() - start)

    async def _set(self, host: Host, rec: HostRecord, state: HostState, **fields: object) -> None:
        # Durable before the next step: POSTING (before the request leaves), DONE, SKIPPED,
        # FAILED. The states in between ride along with the next waited-for record.
        wait = state not in (HostState.BASELINE, HostState.POSTED, HostState.UPGRADED)
        await self.journal.host(host.name, state, wait=wait, **fields)
        rec.state = state
        if state in (HostState.POSTING, HostState.POSTED, HostState.UPGRADED):
            rec.sent = True

    async def _fail(self, host: Host, rec: HostRecord, reason: str) -> None:
        log.error("%s failed: %s", host.name, reason)
        rec.reason = reason
        await self._set(host, rec, HostState.FAILED, reason=reason, **_vm_fields(rec))
        self.outcome.failed[host.name] = reason
        if self.outcome.halted_by is None:
            self.outcome.halted_by = (host.name, reason)
            self._halt.set()
            await self.journal.append("halt", host=host.name, reason=reason)

    async def _upgrade(self, host: Host, rec: HostRecord) -> bool:
        """Upgrade one host; True when it was skipped (already on the target)."""
        target = self.opts.version
        if not rec.sent:
            health = self._baseline_ahead(host.name) or await self.client.health(host)
            # Untouched so far (also on a resume): a fresh baseline is the right one.
            rec.baseline = health.failing()
            await self._set(
                host, rec, HostState.BASELINE, failing=list(rec.baseline), version=health.version
            )
            if health.version == target and health.upgrade.state is not Phase.RUNNING:
                await self._set(host, rec, HostState.SKIPPED)
                return True
            if self._halt.is_set():  # another host failed meanwhile: do not start this one
                raise _NotStarted
            await self._hook("pre", self.opts.pre_hook, host)
            await self._post(host, rec)
            self._request_out(host.name)
        else:
            now = await self._recheck(host)
            status = now.upgrade if now is not None else None
            on_target = now is not None and now.version == target
            installing = (
                status is not None and status.state is Phase.RUNNING and status.target == target
            )
            if not on_target and not installing and now is not None:
                log.info("%s: the upgrade did not reach the agent; sending it again", host.name)
                await self._post(host, rec)
            self._request_out(host.name)
        health = await self._wait_version(host)
        await self._set(host, rec, HostState.UPGRADED)
        await self._wait_healthy(host, rec, health)
        await self._vm_report(host, rec)
        await self._hook("post", self.opts.post_hook, host)
        await self._set(host, rec, HostState.DONE, **_vm_fields(rec))
        return False

    async def _post(self, host: Host, rec: HostRecord) -> None:
        await self._set(host, rec, HostState.POSTING, mode=str(self.opts.mode))
        try:
            result = await self.client.upgrade(host, self.opts.request())
        except AgentError as exc:
            raise HostFailed(f"upgrade request refused: {exc}") from exc
        await self._set(host, rec, HostState.POSTED, status=result.status)

    async def _recheck(self, host: Host) -> Health | None:
        """The host's health after a possible earlier request; None while it is unreachable."""
        try:
            return await self.client.health(host)
        except AgentError as exc:
            log.info("%s: not reachable yet (%s); polling", host.name, exc)
            return None

    async def _wait_version(self, host: Host) -> Health:
        """Wait for the target version: long-poll ``GET /v1/upgrade?wait=`` while the upgrade
        runs (plain polling every ``poll_interval`` with an agent that answers at once), then
        confirm with ``/healthz`` (its answer, returned, is the first health sample: most
        often the host's last request, so it closes the connection). Unreachable meanwhile
        (a reboot) is not a failure."""
        target = self.opts.version
        deadline = time.monotonic() + self.opts.upgrade_timeout
        last = "no answer yet"
        while True:
            asked = time.monotonic()
            try:
                wait = max(0.0, min(LONG_POLL, deadline - asked))
                status = await self.client.upgrade_status(host, wait=wait)
                if status.state is not Phase.RUNNING:
                    health = await self.client.health(host, close=True)
                    if health.boot.fallback:
                        raise HostFailed(
                            f"booted back into {health.version}: {health.boot.reason or '?'}"
                        )
                    if health.upgrade.state is Phase.FAILED:
                        error = health.upgrade.error or "no reason given"
                        raise HostFailed(f"upgrade failed: {error}")
                    if health.version == target and health.upgrade.state is not Phase.RUNNING:
                        return health
                    last = f"version {health.version}, upgrade {health.upgrade.state}"
                else:
                    last = f"upgrade to {status.target} running"
            except AgentError as exc:  # rebooting, or a transient network failure
                last = str(exc)
            now = time.monotonic()
            if now >= deadline:
                raise HostFailed(
                    f"not on {target} after {self.opts.upgrade_timeout:g}s (last: {last})"
                )
            if now - asked < self.opts.poll_interval:  # answered at once: do not spin
                await asyncio.sleep(self.opts.poll_interval - (now - asked))

    async def _wait_healthy(self, host: Host, rec: HostRecord, first: Health) -> None:
        """No check failing that was not failing before, within ``health_timeout``; ``first``
        is the answer that confirmed the version (asking again at once would tell the same)."""
        baseline = set(rec.baseline or ())
        deadline = time.monotonic() + self.opts.health_timeout
        sample: Health | None = first
        while True:
            try:
                health = sample or await self.client.health(host, close=True)
            except AgentError as exc:
                new_detail = str(exc)
            else:
                if health.boot.fallback:
                    raise HostFailed(
                        f"booted back into {health.version}: {health.boot.reason or '?'}"
                    )
                if health.version != self.opts.version:
                    raise HostFailed(f"runs {health.version} again, not {self.opts.version}")
                new = tuple(c for c in health.failing() if c not in baseline)
                if not new:
                    return
                new_detail = "new failing checks: " + health.detail(new)
            sample = None
            if time.monotonic() >= deadline:
                raise HostFailed(f"unhealthy after {self.opts.health_timeout:g}s: {new_detail}")
            await asyncio.sleep(self.opts.poll_interval)

    # --- the VMs of a reboot ---------------------------------------------------------------
    async def _vm_report(self, host: Host, rec: HostRecord) -> None:
        """Reboot mode (or live with ``refresh_vms``): wait (within the health timeout) until
        the agent has reported every VM that ran before the upgrade, then keep its tally in
        ``rec`` (journaled with the host). A degraded host fails with ``halt_on_degraded``,
        unless the journal already holds the same degradation from before a
        ``--retry-failed`` (the operator has seen it); else it is logged and listed. An
        agent without the report passes.

        :raise HostFailed: still restoring at the deadline, or degraded and halting.
        """
        if self.opts.mode is not Mode.REBOOT and not self.opts.refresh_vms:
            return
        deadline = time.monotonic() + self.opts.health_timeout
        while True:
            try:
                status = (await self.client.health(host)).upgrade
            except AgentError as exc:
                status, last = None, str(exc)
            if status is not None and not status.restoring:
                break
            if status is not None:
                waiting = [vm.name for vm in status.vms if vm.result is VmResult.RESTORING]
                last = "restoring " + ", ".join(waiting)
            if time.monotonic() >= deadline:
                raise HostFailed(f"VMs not restored after {self.opts.health_timeout:g}s: {last}")
            await asyncio.sleep(self.opts.poll_interval)
        if status.target != self.opts.version:
            return  # not this upgrade's report (an agent that never wrote one)
        earlier, rec.vms = rec.vms, vmreport.tally(status)
        why = rec.vms.degraded if rec.vms is not None else None
        if why is None:
            return
        seen = earlier is not None and earlier.degraded == why
        if self.opts.halt_on_degraded and not seen:
            raise HostFailed(f"degraded: {why}")
        log.warning("%s degraded: %s", host.name, why)
        self.outcome.degraded[host.name] = why

    async def _hook(self, which: str, command: str | None, host: Host) -> None:
        if not command:
            return
        env = dict(os.environ)
        env.update(
            HATCHERY_HOST=host.name,
            HATCHERY_ADDRESS=host.address,
            HATCHERY_LOCATION="/".join(host.location),
            HATCHERY_VERSION=self.opts.version,
            HATCHERY_MODE=str(self.opts.mode),
            HATCHERY_HOOK=which,
        )
        proc = await asyncio.create_subprocess_shell(
            command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.opts.hook_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HostFailed(f"{which} hook timed out after {self.opts.hook_timeout:g}s") from None
        if proc.returncode != 0:
            tail = "; ".join(out.decode(errors="replace").strip().splitlines()[-3:]) or "no output"
            raise HostFailed(f"{which} hook exited with {proc.returncode}: {tail}")


def _vm_fields(rec: HostRecord) -> dict[str, object]:
    """The host's VM tally as journal fields (none without a report: the record is as an
    older rollout wrote it)."""
    return rec.vms.fields() if rec.vms is not None else {}
