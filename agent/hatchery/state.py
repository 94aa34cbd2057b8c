"""State on disk: written atomically, read back tolerantly.

A write goes to a temporary file in the same directory, is fsynced, renamed over the old
file, and the directory is fsynced, so a crash at any instant leaves the old or the new
content, never a torn file. A file that does not parse is reported and moved aside
(``NAME.corrupt-<time>``), never silently replaced: an operator can look at it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)


class StateError(HatcheryError):
    """State could not be written."""


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary has a random name and is created with ``O_EXCL|O_NOFOLLOW``, so a file or
    symlink planted at a predictable temporary name is never opened, truncated or written
    through; ``mode`` is set with ``fchmod`` at creation, whatever the umask. The rename
    replaces a symlink at ``path`` itself, never its target.
    """
    _write_new(path, data, mode, replace=True)


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write key material to ``path``: mode 0600 from creation, never through a symlink.

    Refuses (``StateError``) when anything exists at ``path``, a symlink included, unless
    ``force``: then the new file replaces whatever is there (a symlink is replaced, its
    target untouched). Either way the content goes to a fresh ``O_EXCL|O_NOFOLLOW`` file,
    fsynced, and appears at ``path`` in one step (link or rename), the folder fsynced: a
    crash leaves the old key or the new one, never a torn one. The one helper for every
    private key and seed the project writes.
    """
    _write_new(path, data, 0o600, replace=force)


def _write_new(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path, follow_symlinks=False)  # EEXIST if anything is at path
            os.unlink(tmp)
        fsync_dir(path.parent)
    except FileExistsError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(
            f"cannot write {path}: it already exists", hint="pass --force to replace it"
        ) from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def set_aside(path: Path, why: str) -> Path:
    """Move a corrupt file out of the way, keeping it for the operator; return where it went."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.error("state file %s is corrupt (%s): kept as %s", path, why, aside)
    return aside


def read_json(path: Path) -> Any | None:
    """The parsed content of ``path``; None if it is missing or corrupt (then set aside)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        set_aside(path, str(exc))
        return None


def iter_json_files(directory: Path, suffix: str = ".json") -> Iterator[tuple[Path, Any]]:
    """Every readable ``*.json`` in ``directory`` (temporaries and corrupt files skipped)."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(suffix):
            continue
        value = read_json(path)
        if value is not None:
            yield path, value


def iter_json_files_nested(directory: Path, filename: str) -> Iterator[tuple[Path, Any]]:
    """Every readable ``<directory>/*/<filename>`` (one folder per object)."""
    if not directory.is_dir():
        return
    for sub in sorted(directory.iterdir()):
        path = sub / filename
        if sub.is_dir() and path.exists():
            value = read_json(path)
            if value is not None:
                yield path, value
