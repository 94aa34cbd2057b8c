"""The rollout tool's errors: one root, each with a human message and, where it helps, a hint."""

from __future__ import annotations

from hatchery.errors import HatcheryError


class RolloutError(HatcheryError):
    """The root of every error ``hatchery-rollout`` raises on purpose."""


class InventoryError(RolloutError):
    """The fleet inventory is malformed; the message names the file and the key."""


class PlanError(RolloutError):
    """The rollout options cannot make a plan (bad progression, unknown spread level)."""


class JournalError(RolloutError):
    """The journal is unreadable, corrupt in its middle, or in use by another run."""


class AgentError(RolloutError):
    """An agent answered with an error (``status``, its HTTP status) or could not be reached
    (``status`` None)."""

    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint=hint)
        self.status = status
