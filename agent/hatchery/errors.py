"""The root of every error Hatchery raises on purpose.

Each error carries a human message and, where it helps, a hint for the operator; the CLIs
print ``message`` (and ``hint``) on one line and keep tracebacks for ``--debug``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


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
    """An external command failed: it could not start, timed out, or exited non-zero.

    The message names the command and the cause, and carries the tail of its stderr;
    ``returncode`` is None when the command never finished. ``hatchery.host.run`` is the one
    place that raises it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stderr: str = "",
        *,
        reason: str | None = None,
    ) -> None:
        detail = "; ".join(stderr.strip().splitlines()[-5:])
        if reason is not None:  # it never finished: "kexec: timed out after 120s"
            message = f"{show_command(argv)}: {reason}" + (f": {detail}" if detail else "")
        else:
            message = f"{show_command(argv)} exited with {returncode}: {detail or 'no output'}"
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def show_command(argv: Sequence[str], width: int = 60) -> str:
    """The command as a person recognises it: the program's name and its first arguments."""
    if not argv:
        return "(no command)"
    shown = argv[0].rsplit("/", 1)[-1]
    for arg in argv[1:]:
        if len(shown) + 1 + len(arg) > width:
            return shown + " …"
        shown += " " + arg
    return shown


def report(program: str, exc: HatcheryError) -> int:
    """The CLIs' one exit point for user errors: one line, a hint, the traceback at DEBUG."""
    logging.getLogger(program).debug("failure", exc_info=exc)
    print(f"{program}: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return 1
