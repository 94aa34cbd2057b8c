"""Open a file by a client's name inside a served root, or refuse: the one path jail.

Both servers that hand out files by name use it: TFTP (boot loaders) and boot HTTP (kernels
and initrds for nodes being birthed). Both answer an untrusted network, so the rules are the
same and live here once; each server turns a ``Refused`` into its own answer (a TFTP error
code, an HTTP 404) through ``Refused.reason``.

The rules, in order: an absolute name or any ``..`` component is refused outright; the rest
is resolved with every symlink followed and must still lie inside the root (a symlink
*within* the root is fine, one leading out of it is not); the final component is opened
with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a FIFO cannot hang the server) and the opened
descriptor's real path is checked again through ``/proc/self/fd``, so a directory swapped
for a symlink between the check and the open is caught too. Only regular files are served.
The caller reads from the returned descriptor, never by the name again.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from hatchery.errors import HatcheryError

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class Reason(StrEnum):
    """Why a name was refused, for the server to choose its answer."""

    NOT_FOUND = "not found"  # nothing by that name (or a name too long to be one)
    FORBIDDEN = "forbidden"  # outside the root, not a regular file, or unreadable
    FAILED = "failed"  # the open failed for another reason (I/O error, out of descriptors)


class Refused(HatcheryError):
    """A name the jail will not serve; ``reason`` says which kind of refusal it is."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """An open, checked regular file: read through ``fd`` (the caller closes it)."""

    fd: int
    size: int
    path: str


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def open_in_root(root: str | Path, name: str) -> OpenedFile:
    """Open ``name`` (relative, ``/``-separated) below ``root`` for reading, or ``Refused``."""
    base = os.path.realpath(root)
    if name.startswith("/"):
        raise Refused(Reason.FORBIDDEN, "absolute paths are not served")
    if ".." in name.split("/"):
        raise Refused(Reason.FORBIDDEN, "'..' is not allowed in file names")
    try:
        real = os.path.realpath(os.path.join(base, name))
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        raise Refused(Reason.NOT_FOUND, "file not found") from None
    if not _inside(base, real):
        raise Refused(Reason.FORBIDDEN, "path leads outside the served root")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise refusal(exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(Reason.FORBIDDEN, "not a regular file")
        check_opened(base, fd, real)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, real)


def check_opened(root: str, fd: int, expected: str) -> None:
    """Refuse ``fd`` unless the file it holds lies inside ``root`` (``expected``: the path it
    was opened by, used where there is no /proc to ask)."""
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        opened = expected  # no /proc: the checks before the open stand alone
    if not _inside(root, opened):
        raise Refused(Reason.FORBIDDEN, "path leads outside the served root")


def refusal(exc: OSError) -> Refused:
    """The refusal for an ``open`` that failed with ``exc``."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return Refused(Reason.NOT_FOUND, "file not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return Refused(Reason.FORBIDDEN, "access denied")
    return Refused(Reason.FAILED, f"cannot open file: {exc.strerror or exc}")
