"""A command under a pseudo-terminal, as an operator's would run: ``hatchery vm console
--attach`` in tests that type into a guest's console and read its answers."""

from __future__ import annotations

import errno
import os
import pty
import select
import signal
import termios
import time


class Terminal:
    """A command under a pseudo-terminal, read without blocking."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the CLI, its stdin/stdout/stderr the terminal
            os.execv(argv[0], argv)
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 120) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} in {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError as exc:  # EIO: the child closed the terminal
                    if exc.errno != errno.EIO:
                        raise
                    raise AssertionError(f"ended before {marker!r}: {self.output!r}") from exc
                self.output += chunk
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def lflag(self) -> int:
        return int(termios.tcgetattr(self.fd)[3])

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"the CLI did not exit: {self.output[-2000:]!r}")
            with_data, _, _ = select.select([self.fd], [], [], 0.2)
            if with_data:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
