"""The root of every error Hatchery raises on purpose.

Each error carries a human message and, where it helps, a hint for the operator; the CLIs
print ``message`` (and ``hint``) on one line and keep tracebacks for ``--debug``.
"""

from __future__ import annotations

import logging
import sys


class HatcheryError(Exception):
    """A failure an operator can understand and act on."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(HatcheryError):
    """A configuration value is missing, of the wrong type or out of range."""


class CommandError(HatcheryError):
    """An external command failed; its stderr is part of the message."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:]
        detail = "; ".join(tail) if tail else "no output"
        super().__init__(f"{argv[0]} exited with {returncode}: {detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


def report(program: str, exc: HatcheryError) -> int:
    """The CLIs' one exit point for user errors: one line, a hint, the traceback at DEBUG."""
    logging.getLogger(program).debug("failure", exc_info=exc)
    print(f"{program}: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return 1
