"""The agent's wire schema: what ``/healthz`` and ``/v1/upgrade`` say and take, as typed values.

One definition shared by the agent (which writes these documents, and persists the upgrade
status in the same form), the ``hatchery`` CLI and ``hatchery-rollout`` (which read them), as
Dominator shares ``proto/hypervisor`` between the hypervisor and its tools. docs/api.md
describes the documents.

Reading is tolerant, because the other side may be older or newer: unknown fields are
ignored, a field of the wrong type reads as its default, an unknown ``state`` reads as
``idle`` and an unknown ``mode`` as none. Only a document that is no health answer at all
(no ``version``) is refused, with ``ValueError``. Nothing here does I/O, so the rollout can
import it without the agent's dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

__all__ = [
    "BootStatus",
    "Health",
    "LogEntry",
    "Mode",
    "Phase",
    "UpgradeRequest",
    "UpgradeStatus",
    "VmOutcome",
    "VmResult",
]


class Mode(StrEnum):
    """How a node takes a new image: files patched in place, or a kexec into it."""

    LIVE = "live"
    REBOOT = "reboot"


class Phase(StrEnum):
    """Where a node's latest upgrade is: idle (never asked), running, done or failed."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_E = TypeVar("_E", bound=StrEnum)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _enum(kind: type[_E], value: object) -> _E | None:
    try:
        return kind(value) if isinstance(value, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """The body of ``POST /v1/upgrade``.

    ``guard_seconds``: reboot mode only (None: the agent's default). ``allow_downgrade``: a
    version older than the running one is refused (409) unless this is true.
    ``refresh_vms``: live mode only, move every running VM to a new QEMU process once the
    patch is in place (each one's outcome in the status's ``vms``). Optional fields are sent
    only when set, so an older agent, which refuses fields it does not know, still takes a
    plain request.
    """

    version: str
    mode: Mode = Mode.LIVE
    guard_seconds: int | None = None
    allow_downgrade: bool = False
    refresh_vms: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": self.version, "mode": self.mode.value}
        if self.guard_seconds is not None:
            body["guard_seconds"] = self.guard_seconds
        if self.allow_downgrade:
            body["allow_downgrade"] = True
        if self.refresh_vms:
            body["refresh_vms"] = True
        return body


class VmResult(StrEnum):
    """What an upgrade did to a VM that ran before it.

    A reboot: ``restoring`` until the agent of the new boot has dealt with it, then
    ``resumed`` (memory kept), ``cold-started`` (booted afresh: the guest lost its memory),
    ``stopped`` (not running, and not brought back) or ``failed`` (bringing it back raised an
    error). A live patch with ``refresh_vms``: ``refreshed`` (moved to a new QEMU process,
    memory kept) or ``refresh-failed`` (it runs on in its old QEMU, on the old binary)."""

    RESTORING = "restoring"
    RESUMED = "resumed"
    COLD_STARTED = "cold-started"
    STOPPED = "stopped"
    FAILED = "failed"
    REFRESHED = "refreshed"
    REFRESH_FAILED = "refresh-failed"


@dataclass(frozen=True, slots=True)
class VmOutcome:
    """One VM in an upgrade's report: ``pause_seconds`` (``resumed``, ``refreshed``) is how
    long the guest was paused (for a reboot, from the pause before its state was saved to
    running again after the boot); ``reason`` (any other result) says why it was not
    resumed or refreshed."""

    name: str
    result: VmResult
    pause_seconds: float | None = None
    reason: str | None = None

    @property
    def degraded(self) -> bool:
        """Whether the guest lost its memory, is not running or still runs the old QEMU
        (anything but resumed or refreshed, once the agent is done with it)."""
        return self.result not in (VmResult.RESUMED, VmResult.REFRESHED, VmResult.RESTORING)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result.value,
                "pause_seconds": self.pause_seconds, "reason": self.reason}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> VmOutcome | None:
        """None for anything that is not an outcome, or a result this side does not know (a
        newer agent's)."""
        if not isinstance(data, Mapping):
            return None
        name, result = _text(data.get("name")), _enum(VmResult, data.get("result"))
        if name is None or result is None:
            return None
        pause = _number(data.get("pause_seconds"))
        return cls(name, result, pause if pause is not None and pause >= 0 else None,
                   _text(data.get("reason")))  # fmt: skip


def _outcomes(data: object) -> tuple[VmOutcome, ...]:
    if not isinstance(data, list):
        return ()
    return tuple(o for o in map(VmOutcome.from_json, data) if o is not None)


@dataclass(frozen=True, slots=True)
class UpgradeStatus:
    """A node's latest upgrade (``GET /v1/upgrade``, ``upgrade`` in ``/healthz``).

    ``error`` says why it failed; ``detail`` what it did (``3 replace; restarted: ssh.service``)
    or, for a reboot that fell back, ``fallback``. Times are Unix seconds. ``vms``: after a
    reboot-mode upgrade (or a live one with ``refresh_vms``), one outcome per VM that ran
    before it (empty otherwise, and from an agent older than the report).
    """

    state: Phase = Phase.IDLE
    target: str | None = None
    mode: Mode | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    detail: str | None = None
    vms: tuple[VmOutcome, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "target": self.target,
            "mode": self.mode.value if self.mode is not None else None,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "detail": self.detail,
            "vms": [vm.to_json() for vm in self.vms],
        }

    @property
    def restoring(self) -> bool:
        """Whether the agent is still bringing back VMs after a reboot (the report is not
        final yet)."""
        return any(vm.result is VmResult.RESTORING for vm in self.vms)

    @classmethod
    def from_json(cls, data: object) -> UpgradeStatus:
        """Never raises: anything that is not a status reads as idle."""
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            state=_enum(Phase, data.get("state")) or Phase.IDLE,
            target=_text(data.get("target")),
            mode=_enum(Mode, data.get("mode")),
            error=_text(data.get("error")),
            started=_number(data.get("started")),
            finished=_number(data.get("finished")),
            detail=_text(data.get("detail")),
            vms=_outcomes(data.get("vms")),
        )


@dataclass(frozen=True, slots=True)
class BootStatus:
    """``boot`` in ``/healthz``: whether the node booted back into its previous version
    because a reboot-mode upgrade's new version did not mark itself good (and why)."""

    fallback: bool = False
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"fallback": self.fallback, "reason": self.reason}

    @classmethod
    def from_json(cls, data: object) -> BootStatus:
        """Never raises: anything that is not a boot status reads as no fallback."""
        if not isinstance(data, Mapping):
            return cls()
        return cls(fallback=data.get("fallback") is True, reason=_text(data.get("reason")))


@dataclass(frozen=True, slots=True)
class Health:
    """The ``/healthz`` document.

    ``checks`` maps a check's name to ``ok`` or ``fail: <why>``; ``healthy`` is true iff all
    are ok. ``vms`` counts VMs by state, plus ``total``. ``uptime`` is the agent's, in seconds.
    """

    version: str
    healthy: bool = False
    checks: Mapping[str, str] = field(default_factory=dict)
    vms: Mapping[str, int] = field(default_factory=dict)
    upgrade: UpgradeStatus = UpgradeStatus()
    boot: BootStatus = BootStatus()
    uptime: float | None = None
    free_bytes: int | None = None  # free on the agent's state folder (/data): staging room

    @property
    def vms_total(self) -> int | None:
        return self.vms.get("total")

    def failing(self) -> tuple[str, ...]:
        """Names of the checks that are not ``ok``, sorted."""
        return tuple(sorted(name for name, value in self.checks.items() if value != "ok"))

    def detail(self, names: tuple[str, ...]) -> str:
        """``name: value`` of the named checks, for a message."""
        return ", ".join(f"{n}: {self.checks.get(n, '?')}" for n in names)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "healthy": self.healthy,
            "checks": dict(self.checks),
            "vms": dict(self.vms),
            "upgrade": self.upgrade.to_json(),
            "boot": self.boot.to_json(),
            "uptime": self.uptime,
            "free_bytes": self.free_bytes,
        }

    @classmethod
    def from_json(cls, data: object) -> Health:
        """Read a health answer.

        :raise ValueError: ``data`` is not one (not an object, or no string ``version``).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("version"), str):
            raise ValueError("no version in the health answer")
        raw_checks = data.get("checks")
        checks = (
            {str(k): str(v) for k, v in raw_checks.items()}
            if isinstance(raw_checks, Mapping)
            else {}
        )
        raw_vms = data.get("vms")
        vms = (
            {
                str(k): v
                for k, v in raw_vms.items()
                if isinstance(v, int) and not isinstance(v, bool)
            }
            if isinstance(raw_vms, Mapping)
            else {}
        )
        return cls(
            version=data["version"],
            healthy=data.get("healthy") is True,
            checks=checks,
            vms=vms,
            upgrade=UpgradeStatus.from_json(data.get("upgrade")),
            boot=BootStatus.from_json(data.get("boot")),
            uptime=_number(data.get("uptime")),
            free_bytes=free
            if isinstance(free := data.get("free_bytes"), int)
            and not isinstance(free, bool)
            and free >= 0
            else None,
        )


#: The most lines one ``GET /v1/logs`` may ask for (``lines``).
MAX_LOG_LINES = 10_000


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of ``GET /v1/logs`` (newline-delimited JSON, one entry a line), from the
    node's journal or the agent's own recent lines: ``time`` in Unix seconds, ``unit`` the
    systemd unit, ``level`` one of debug, info, warning, error, critical, ``source`` the
    logger or syslog identifier."""

    time: float
    unit: str
    level: str
    source: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "unit": self.unit, "level": self.level,
                "source": self.source, "message": self.message}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> LogEntry | None:
        """None for anything that is not an entry (a newer agent's other lines)."""
        if not isinstance(data, Mapping):
            return None
        time, message = _number(data.get("time")), _text(data.get("message"))
        if time is None or message is None:
            return None
        return cls(time, _text(data.get("unit")) or "", _text(data.get("level")) or "info",
                   _text(data.get("source")) or "", message)  # fmt: skip
