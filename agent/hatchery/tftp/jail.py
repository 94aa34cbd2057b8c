"""Resolve a TFTP filename inside the served root, or refuse it with a TFTP error.

The rules, in order: backslashes are path separators (Windows PXE loaders send them); an
absolute name or any ``..`` component is refused outright; the rest is resolved with every
symlink followed and must still lie inside the root (a symlink *within* the root is fine, one
leading out of it is not); the final component is opened with ``O_NOFOLLOW`` and the opened
descriptor's real path is checked again through ``/proc/self/fd``, so a directory swapped for
a symlink between the check and the open is caught too. Only regular files are served.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from hatchery.tftp.packet import ErrorCode

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class Refused(Exception):
    """A request the server answers with a TFTP ERROR packet (code and message)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class OpenedFile:
    fd: int
    size: int
    path: str


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def open_in_root(root: str, filename: str) -> OpenedFile:
    """Open ``filename`` below ``root`` (an already resolved absolute path) for reading."""
    name = filename.replace("\\", "/")
    if name.startswith("/"):
        raise Refused(ErrorCode.ACCESS_VIOLATION, "absolute paths are not served")
    if ".." in name.split("/"):
        raise Refused(ErrorCode.ACCESS_VIOLATION, "'..' is not allowed in file names")
    try:
        real = os.path.realpath(os.path.join(root, name))
    except (OSError, ValueError):
        raise Refused(ErrorCode.FILE_NOT_FOUND, "file not found") from None
    if not _inside(root, real):
        raise Refused(ErrorCode.ACCESS_VIOLATION, "path leads outside the served root")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise _refusal(exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(ErrorCode.ACCESS_VIOLATION, "not a regular file")
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = real  # no /proc: the checks above stand alone
        if not _inside(root, opened):
            raise Refused(ErrorCode.ACCESS_VIOLATION, "path leads outside the served root")
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, real)


def _refusal(exc: OSError) -> Refused:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return Refused(ErrorCode.FILE_NOT_FOUND, "file not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return Refused(ErrorCode.ACCESS_VIOLATION, "access denied")
    return Refused(ErrorCode.NOT_DEFINED, f"cannot open file: {exc.strerror or exc}")
