"""Live patch: make the running root match a new image, file by file, VMs untouched.

Three-way, like a package upgrade: a path changes only where the *target image* differs from
the *current image* (so node-local changes to files the images agree on — logs, caches,
generated config — are left alone), and the running file is replaced only if it is not
already what the target wants. Paths the current image had and the target has not are
removed. /data, the API's mounts (/proc, /sys, /dev, /run, /tmp) and every persistent path
(a symlink into /data, or anything below one) are never touched.

Two phases, so a failure cannot leave a half-patched node:

1. **stage**: every new file or symlink is written next to its destination as
   ``.hatchery-new.<name>`` (missing directories are created); nothing visible changes yet.
2. **apply**: each staged file is renamed over its destination (atomic per file), the old one
   kept as a hard link in a backup folder on the same file system; deletions move the file
   there too. If anything fails, every step is undone in reverse order and the staged files
   are removed. ``commit`` drops the backups.

A kernel change cannot be live-patched; the caller checks for it (``ImageStore`` manifests)
and refuses with "reboot needed".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hatchery.errors import HatcheryError
from hatchery.host import AGENT_UNIT
from hatchery.upgrade.archive import iter_root
from hatchery.upgrade.fingerprint import Fingerprint, of_member, of_path

log = logging.getLogger(__name__)

NEVER = ("data", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log", "var/cache",
         "var/lib/systemd", "etc/machine-id", "etc/hostname", "etc/resolv.conf",
         "etc/adjtime", "etc/mtab")  # fmt: skip
BACKUP_DIR = ".hatchery-livepatch"
STAGED_PREFIX = ".hatchery-new."


class LivePatchError(HatcheryError):
    """The live patch cannot be applied; nothing was changed (or everything was restored)."""


@dataclass(frozen=True, slots=True)
class Change:
    path: str
    action: str  # "replace" (file or symlink), "mkdir", "delete"
    target: Fingerprint | None


@dataclass
class Plan:
    root: Path
    changes: list[Change] = field(default_factory=list)
    staged: dict[str, Path] = field(default_factory=dict)  # path -> staged file
    created_dirs: list[Path] = field(default_factory=list)

    @property
    def changed_paths(self) -> set[str]:
        return {c.path for c in self.changes}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.action] = counts.get(change.action, 0) + 1
        parts = [f"{n} {a}" for a, n in sorted(counts.items())] or ["no changes"]
        return ", ".join(parts)


def _excluded(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in NEVER) or path.startswith(
        (BACKUP_DIR, STAGED_PREFIX)
    )


def _under_persistent_link(root: Path, path: str) -> bool:
    """Whether ``path`` or one of its parents is, on the running node, a symlink into /data."""
    current = root
    for part in path.split("/"):
        current = current / part
        if current.is_symlink():
            target = os.readlink(current)
            if target == "/data" or target.startswith("/data/"):
                return True
    return False


def _same(running: Fingerprint | None, wanted: Fingerprint) -> bool:
    if running is None or running.kind != wanted.kind:
        return False
    if wanted.kind == "dir":
        return True  # directory permissions are not patched live
    if wanted.kind == "symlink":
        return running.digest == wanted.digest
    return running == wanted


class LivePatch:
    def __init__(self, root: Path, current: dict[str, Fingerprint] | None) -> None:
        """``current``: the fingerprints of the image the node runs (None: unknown, then only
        files the target changes relative to the running node are patched, none deleted)."""
        self.root = root
        self.current = current

    # --- phase 1 --------------------------------------------------------------------------
    def stage(self, target: BinaryIO) -> Plan:
        plan = Plan(self.root)
        seen: set[str] = set()
        try:
            for member, data in iter_root(target):
                seen.add(member.path)
                if _excluded(member.path) or _under_persistent_link(self.root, member.path):
                    continue
                self._stage_member(plan, member.path, of_member(member, data), data)
            if self.current is not None:
                for path, fp in sorted(self.current.items(), reverse=True):
                    if path in seen or fp.kind == "dir" or _excluded(path):
                        continue
                    if _under_persistent_link(self.root, path):
                        continue
                    if of_path(self.root / path) is not None:
                        plan.changes.append(Change(path, "delete", None))
        except BaseException:
            self.discard(plan)
            raise
        log.info("live patch staged: %s", plan.summary())
        return plan

    def _stage_member(self, plan: Plan, path: str, wanted: Fingerprint, data: bytes) -> None:
        if wanted.kind == "other":
            return  # device nodes and fifos come from devtmpfs and services, not the image
        if self.current is not None:
            if self.current.get(path) == wanted:
                # The images agree: whatever the node has there is the node's business, and
                # the file is not even read (most of a root is unchanged: that is the speed).
                return
        running = of_path(self.root / path)
        if _same(running, wanted):
            return
        if running is not None and (running.kind == "dir") != (wanted.kind == "dir"):
            raise LivePatchError(
                f"/{path} changes between a directory and a file: live patch cannot, a reboot can",
                hint="use reboot mode",
            )
        destination = self.root / path
        if wanted.kind == "dir":
            self._ensure_dir(plan, destination, wanted.perm)
            plan.changes.append(Change(path, "mkdir", wanted))
            return
        self._ensure_dir(plan, destination.parent, 0o755)
        staged = destination.with_name(STAGED_PREFIX + destination.name)
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        if wanted.kind == "symlink":
            os.symlink(wanted.digest, staged)
        else:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchown(fd, wanted.uid, wanted.gid)
                os.fchmod(fd, wanted.perm)
                os.fsync(fd)
            finally:
                os.close(fd)
        plan.staged[path] = staged
        plan.changes.append(Change(path, "replace", wanted))

    def _ensure_dir(self, plan: Plan, directory: Path, perm: int) -> None:
        missing: list[Path] = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for d in reversed(missing):
            d.mkdir(mode=perm)
            plan.created_dirs.append(d)

    def discard(self, plan: Plan) -> None:
        """Remove everything ``stage`` made; the running root is as before."""
        for staged in plan.staged.values():
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        for d in reversed(plan.created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    # --- phase 2 --------------------------------------------------------------------------
    def apply(self, plan: Plan, fail_after: int | None = None) -> None:
        """Swap everything in; on any failure restore every file and re-raise.

        ``fail_after`` injects a failure after that many steps (for tests of the rollback).
        """
        backup = self.root / BACKUP_DIR
        backup.mkdir(mode=0o700, exist_ok=True)
        undo: list[Callable[[], None]] = []
        try:
            for step, change in enumerate(plan.changes):
                if fail_after is not None and step >= fail_after:
                    raise LivePatchError(f"injected failure after {step} steps")
                if change.action == "mkdir":
                    continue  # made while staging
                destination = self.root / change.path
                saved = backup / f"{step}"
                existed = os.path.lexists(destination)
                if existed and not destination.is_dir():
                    os.link(destination, saved, follow_symlinks=False)
                if change.action == "delete":
                    if destination.is_dir() and not destination.is_symlink():
                        continue
                    os.unlink(destination)
                    undo.append(functools.partial(os.replace, saved, destination))
                else:
                    os.replace(plan.staged[change.path], destination)
                    if existed:
                        undo.append(functools.partial(os.replace, saved, destination))
                    else:
                        undo.append(functools.partial(os.unlink, destination))
        except BaseException as exc:
            log.error("live patch failed (%s): restoring %d files", exc, len(undo))
            for restore in reversed(undo):
                try:
                    restore()
                except OSError as restore_exc:  # keep going: restore all we can
                    log.error("cannot restore a file: %s", restore_exc)
            self.discard(plan)
            self._drop_backup()
            if isinstance(exc, HatcheryError):
                raise
            raise LivePatchError(f"live patch failed and was rolled back: {exc}") from exc

    def commit(self) -> None:
        self._drop_backup()

    def _drop_backup(self) -> None:
        backup = self.root / BACKUP_DIR
        if backup.is_dir():
            for entry in backup.iterdir():
                entry.unlink()
            backup.rmdir()


def units_to_restart(root: Path, changed: Iterable[str]) -> list[str]:
    """Units whose files changed: the unit file itself, a binary its Exec lines name, or a
    tree it declares with ``X-Hatchery-Restart-On=/path/`` (systemd ignores X- keys).
    ``hatchery-agent.service`` comes last: it performs the patch and is re-exec'd at the end."""
    changed = set(changed)
    units: set[str] = set()
    for unit_dir in ("usr/lib/systemd/system", "etc/systemd/system", "lib/systemd/system"):
        directory = root / unit_dir
        if not directory.is_dir():
            continue
        for unit in directory.iterdir():
            if not unit.name.endswith((".service", ".socket", ".timer")) or not unit.is_file():
                continue
            rel = f"{unit_dir}/{unit.name}"
            if rel in changed:
                units.add(unit.name)
                continue
            try:
                text = unit.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if not sep:
                    continue
                key = key.strip()
                if key.startswith("Exec"):
                    binary = value.strip().lstrip("@-:+!").split(" ")[0].lstrip("/")
                    if binary in changed or _resolves_into(root, binary, changed):
                        units.add(unit.name)
                elif key == "X-Hatchery-Restart-On":
                    prefix = value.strip().lstrip("/")
                    if any(p == prefix.rstrip("/") or p.startswith(prefix) for p in changed):
                        units.add(unit.name)
    ordered = sorted(u for u in units if u != AGENT_UNIT)
    return ordered + ([AGENT_UNIT] if AGENT_UNIT in units else [])


def _resolves_into(root: Path, rel: str, changed: set[str]) -> bool:
    """Whether a symlinked binary (``/usr/bin/x`` → ``/opt/...``) points at a changed file."""
    path = root / rel
    for _ in range(8):
        if not path.is_symlink():
            return False
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
        try:
            rel_target = str(path.relative_to(root))
        except ValueError:
            return False
        if rel_target in changed:
            return True
    return False
