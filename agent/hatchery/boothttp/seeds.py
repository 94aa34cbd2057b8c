"""The operator's folder of seeds for the machines this node births: ``<folder>/<mac>.tar``.

A seed holds a node's private key. The boot HTTP service reads it straight from this folder
when the machine redeems its birth token (``tokens.py``); it is never copied into the folder
served to everyone. The folder is kept 0700 and its seeds 0600 (``tighten``): a seed that
another local user could read is made private and reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hatchery.dhcp.leases import normalise_mac

log = logging.getLogger(__name__)
MAX_SEED = 16 * 1024 * 1024  # the same bound the born node's fetch applies
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class SeedFolder:
    folder: Path

    def path(self, mac: str) -> Path | None:
        """The seed file of ``mac`` (named ``<mac>.tar``, any case, ``:`` or ``-``), or None."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return None
        for entry in entries:
            name = entry.name
            if not name.endswith(".tar"):
                continue
            with contextlib.suppress(ValueError):
                if normalise_mac(name[: -len(".tar")]) == mac:
                    return self.folder / name
        return None

    def read(self, mac: str) -> bytes | None:
        """The seed of ``mac``, or None when there is none or it is not a plain file of at
        most ``MAX_SEED`` bytes (a link or a FIFO put there is refused, not followed)."""
        path = self.path(mac)
        if path is None:
            return None
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            log.warning("seed for %s: cannot open %s: %s", mac, path, exc.strerror)
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SEED:
                log.warning("seed for %s: %s is not a file of at most %d bytes", mac, path,
                            MAX_SEED)  # fmt: skip
                return None
            data = f.read(MAX_SEED + 1)
        return data if len(data) <= MAX_SEED else None

    def tighten(self) -> None:
        """Make the folder 0700 and every seed in it 0600; say which ones were not.

        A missing folder is fine (this node births no one with a seed); a chmod that fails
        (a read-only folder) is reported and the seeds are still served only by token.
        """
        try:
            if not self.folder.is_dir():  # the configured folder may be a link (to /data)
                return
            _private(self.folder, 0o700)
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".tar") and entry.is_file(follow_symlinks=False):
                    _private(Path(entry.path), 0o600)
        except OSError as exc:
            log.warning("seeds: cannot make %s private: %s", self.folder, exc)


def _private(path: Path, mode: int) -> None:
    current = path.stat().st_mode
    if current & 0o077:
        log.warning("seeds: %s was readable by others (mode %o): now %o", path, current & 0o777,
                    mode)  # fmt: skip
        path.chmod(mode)
