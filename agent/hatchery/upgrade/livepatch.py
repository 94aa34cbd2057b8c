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
   Each staged file and made directory is logged (``staging.jsonl`` in the work folder)
   before it is made, so a crash while staging can be cleaned up.
2. **apply**: the journal (``journal.json`` in the work folder: the target version and every
   planned step with its backup) is written atomically *before the first file is replaced*;
   then each staged file is renamed over its destination (atomic per file), the old one kept
   as a hard link in the work folder on the same file system; deletions move the file there
   too. If anything fails, every step is undone from the journal and the staged files are
   removed. ``commit`` drops the work folder.

If the agent dies between the two (or during either), the work folder tells the next agent
what happened: ``recover`` (called by the controller at start-up, before the API answers)
finishes the patch only if every step is verified in place, and otherwise rolls every file
back from its backup. Either way the work folder is gone afterwards and the root is exactly
the old or exactly the new image's; the controller records which, honestly.

A kernel change cannot be live-patched; the caller checks for it (``ImageStore`` manifests)
and refuses with "reboot needed".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from hatchery import state
from hatchery.errors import HatcheryError
from hatchery.host import AGENT_UNIT
from hatchery.upgrade.archive import RootEntry, iter_entries
from hatchery.upgrade.fingerprint import Fingerprint, of_path

log = logging.getLogger(__name__)

NEVER = ("data", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log", "var/cache",
         "var/lib/systemd", "etc/machine-id", "etc/hostname", "etc/resolv.conf",
         "etc/adjtime", "etc/mtab")  # fmt: skip
BACKUP_DIR = ".hatchery-livepatch"  # the work folder: journal, staging log, backups
STAGED_PREFIX = ".hatchery-new."
JOURNAL = "journal.json"
STAGING_LOG = "staging.jsonl"
JOURNAL_FORMAT = 1


class LivePatchError(HatcheryError):
    """The live patch cannot be applied; nothing was changed (or everything was restored)."""


class Interrupt(Protocol):
    """A failure point: called before each step of a phase (``stage``: each staged path;
    ``apply``: each swap, and once more with ``step == len(changes)`` when all are in place).
    It may raise (the patch rolls back) or end the process (a crash, which ``recover``
    settles at the next start). Tests pass one; the agent passes none."""

    def __call__(self, phase: str, step: int) -> None: ...


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


@dataclass(frozen=True, slots=True)
class Recovery:
    """What ``recover`` found and did about a live patch the previous agent left unfinished.

    ``phase``: ``staging`` (nothing visible had changed: the staged files were removed),
    ``completed`` (every step was verified in place: the patch is done) or ``rolled-back``
    (``restored`` steps were undone from their backups). ``changed``: the journal's paths.
    """

    phase: str
    target: str | None
    changed: tuple[str, ...] = ()
    restored: int = 0

    @property
    def completed(self) -> bool:
        return self.phase == "completed"


def _excluded(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in NEVER) or path.startswith(
        (BACKUP_DIR, STAGED_PREFIX)
    )


def _under_persistent_link(root: Path, path: str, seen: dict[str, bool]) -> bool:
    """Whether ``path`` or one of its parents is, on the running node, a symlink into /data.

    ``seen`` keeps the answer for each path asked (a whole root's 9 000 paths share their
    parents: without it each parent is looked at again for every path below it).
    """
    if path in seen:
        return seen[path]
    parent, _, _ = path.rpartition("/")
    found = bool(parent) and _under_persistent_link(root, parent, seen)
    if not found:
        current = root / path
        if current.is_symlink():
            target = os.readlink(current)
            found = target == "/data" or target.startswith("/data/")
    seen[path] = found
    return found


def _same(running: Fingerprint | None, wanted: Fingerprint) -> bool:
    if running is None or running.kind != wanted.kind:
        return False
    if wanted.kind == "dir":
        return True  # directory permissions are not patched live
    if wanted.kind == "symlink":
        return running.digest == wanted.digest
    return running == wanted


def _no_interrupt(phase: str, step: int) -> None:
    return None


class LivePatch:
    def __init__(self, root: Path, current: dict[str, Fingerprint] | None) -> None:
        """``current``: the fingerprints of the image the node runs (None: unknown, then only
        files the target changes relative to the running node are patched, none deleted)."""
        self.root = root
        self.current = current
        self.work = root / BACKUP_DIR
        self._log_fd: int | None = None

    # --- phase 1 --------------------------------------------------------------------------
    def stage(
        self, target: BinaryIO, interrupt: Interrupt = _no_interrupt, scratch: Path | None = None
    ) -> Plan:
        """Write every changed file beside its destination; nothing visible changes.

        :raise LivePatchError: the work folder of an unsettled patch is still there, or a
            path changes between a file and a directory.
        :raise CpioError, OSError: the target cannot be read or staged (all staged removed).
        """
        if os.path.lexists(self.work):
            raise LivePatchError(
                f"{self.work} is left from an unfinished live patch",
                hint="restart the agent: it finishes or rolls back that patch at start",
            )
        self.work.mkdir(mode=0o700)
        plan = Plan(self.root)
        seen: set[str] = set()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        self._log_fd = os.open(self.work / STAGING_LOG, flags, 0o600)
        try:
            links: dict[str, bool] = {}
            for entry in iter_entries(target, scratch):
                seen.add(entry.path)
                if _excluded(entry.path) or _under_persistent_link(self.root, entry.path, links):
                    continue
                self._stage_entry(plan, entry, interrupt)
            if self.current is not None:
                for path, fp in sorted(self.current.items(), reverse=True):
                    if path in seen or fp.kind == "dir" or _excluded(path):
                        continue
                    if _under_persistent_link(self.root, path, links):
                        continue
                    if of_path(self.root / path) is not None:
                        plan.changes.append(Change(path, "delete", None))
        except BaseException:
            self.discard(plan)
            raise
        finally:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
        log.info("live patch staged: %s", plan.summary())
        return plan

    def _log(self, kind: str, path: Path) -> None:
        """Record a staged file or made directory before it exists (one JSON line)."""
        assert self._log_fd is not None
        line = json.dumps({kind: str(path.relative_to(self.root))}) + "\n"
        os.write(self._log_fd, line.encode("utf-8", "surrogateescape"))

    def _stage_entry(self, plan: Plan, entry: RootEntry, interrupt: Interrupt) -> None:
        path, wanted = entry.path, entry.fingerprint
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
        interrupt("stage", len(plan.changes))
        destination = self.root / path
        if wanted.kind == "dir":
            self._ensure_dir(plan, destination, wanted.perm)
            plan.changes.append(Change(path, "mkdir", wanted))
            return
        self._ensure_dir(plan, destination.parent, 0o755)
        staged = destination.with_name(STAGED_PREFIX + destination.name)
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        data = entry.read() if wanted.kind == "file" else b""  # only now: most is never read
        self._log("staged", staged)
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
            self._log("dir", d)
            d.mkdir(mode=perm)
            plan.created_dirs.append(d)

    def discard(self, plan: Plan) -> None:
        """Remove everything ``stage`` made, the work folder included; the running root is
        as before."""
        for staged in plan.staged.values():
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        _remove_dirs(plan.created_dirs)
        _remove_work(self.work)

    # --- phase 2 --------------------------------------------------------------------------
    def apply(
        self, plan: Plan, *, version: str | None = None, interrupt: Interrupt = _no_interrupt
    ) -> None:
        """Swap everything in; on any failure restore every file and re-raise.

        The journal is on disk before the first file is replaced, so a crash at any point
        is settled by ``recover`` at the next start. ``version`` is the target's, for it.

        :raise LivePatchError: a step failed; everything was rolled back.
        """
        journal = self._journal(plan, version)
        try:
            state.write_json(self.work / JOURNAL, journal)
            for step, change in enumerate(plan.changes):
                interrupt("apply", step)
                entry = journal["changes"][step]
                if entry is None:
                    continue  # a made directory, or a deletion of a directory (kept)
                destination = self.root / change.path
                if entry["backup"] is not None:
                    os.link(destination, self.work / entry["backup"], follow_symlinks=False)
                if change.action == "delete":
                    os.unlink(destination)
                else:
                    os.replace(plan.staged[change.path], destination)
            interrupt("apply", len(plan.changes))
        except BaseException as exc:
            log.error("live patch failed (%s): rolling back", exc)
            restored = _roll_back(self.root, journal)
            _remove_work(self.work)
            log.error("live patch rolled back: %d steps undone", restored)
            if isinstance(exc, HatcheryError):
                raise
            raise LivePatchError(f"live patch failed and was rolled back: {exc}") from exc

    def _journal(self, plan: Plan, version: str | None) -> dict[str, Any]:
        """What ``recover`` needs to finish or undo every step: where each staged file is,
        which destination had an old file (kept as ``backup``), what the target wants."""
        changes: list[dict[str, Any] | None] = []
        for step, change in enumerate(plan.changes):
            destination = self.root / change.path
            is_dir = destination.is_dir() and not destination.is_symlink()
            if change.action == "mkdir" or (change.action == "delete" and is_dir):
                changes.append(None)
                continue
            existed = os.path.lexists(destination) and not is_dir
            staged = plan.staged.get(change.path)
            changes.append({
                "path": change.path,
                "action": change.action,
                "backup": str(step) if existed else None,
                "staged": str(staged.relative_to(self.root)) if staged is not None else None,
                "target": dataclasses.asdict(change.target) if change.target else None,
            })  # fmt: skip
        return {
            "format": JOURNAL_FORMAT,
            "target": version,
            "changes": changes,
            "mkdirs": [c.path for c in plan.changes if c.action == "mkdir"],
            "created_dirs": [str(d.relative_to(self.root)) for d in plan.created_dirs],
        }

    def commit(self) -> None:
        """The patch is in place for good: drop the journal and the backups."""
        _remove_work(self.work)


# --- after a crash ----------------------------------------------------------------------------
def recover(root: Path) -> Recovery | None:
    """Settle a live patch the previous agent left unfinished (blocking, at start-up).

    None when there is none. Without a journal the patch was still staging: the staged files
    are removed. With one, the patch is finished if every step is verified in place (each
    replaced path has the target's fingerprint, each deleted one is gone), else every step is
    undone from its backup. The work folder is removed in every case.

    :raise OSError: a file cannot be restored or removed (the work folder stays, so the next
        start tries again).
    """
    work = root / BACKUP_DIR
    if not os.path.lexists(work):
        return None
    journal = _read_journal(work)
    if journal is None:
        staged, dirs = _read_staging_log(work)
        for path in staged:
            (root / path).unlink(missing_ok=True)
        _remove_dirs([root / d for d in dirs])
        _remove_work(work)
        log.warning("an interrupted live patch was still staging: %d staged files removed",
                    len(staged))  # fmt: skip
        return Recovery("staging", None)
    target = journal.get("target") if isinstance(journal.get("target"), str) else None
    entries = [e for e in journal.get("changes", []) if isinstance(e, dict)]
    changed = tuple(str(e["path"]) for e in entries) + tuple(journal.get("mkdirs", []))
    if _complete(root, journal):
        _remove_work(work)
        log.warning("an interrupted live patch to %s was in place: finished it", target)
        return Recovery("completed", target, changed)
    restored = _roll_back(root, journal)
    _remove_work(work)
    log.warning("an interrupted live patch to %s was rolled back: %d steps undone", target,
                restored)  # fmt: skip
    return Recovery("rolled-back", target, changed, restored)


def _read_journal(work: Path) -> dict[str, Any] | None:
    value = state.read_json(work / JOURNAL)
    return value if isinstance(value, dict) and value.get("format") == JOURNAL_FORMAT else None


def _read_staging_log(work: Path) -> tuple[list[str], list[str]]:
    """The staged files and made directories; a torn last line (a crash while writing it:
    nothing was made for it yet) is skipped."""
    staged: list[str] = []
    dirs: list[str] = []
    try:
        raw = (work / STAGING_LOG).read_bytes()
    except FileNotFoundError:
        return staged, dirs
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            if isinstance(entry.get("staged"), str):
                staged.append(entry["staged"])
            elif isinstance(entry.get("dir"), str):
                dirs.append(entry["dir"])
    return staged, dirs


def _complete(root: Path, journal: dict[str, Any]) -> bool:
    for entry in journal.get("changes", []):
        if not isinstance(entry, dict):
            continue
        destination = root / entry["path"]
        if entry["action"] == "delete":
            if os.path.lexists(destination):
                return False
            continue
        try:
            wanted = Fingerprint(**entry["target"])
        except TypeError:
            return False
        if not _same(of_path(destination), wanted):
            return False
    return all((root / d).is_dir() for d in journal.get("mkdirs", []))


def _roll_back(root: Path, journal: dict[str, Any]) -> int:
    """Undo every step of ``journal`` that took effect, newest first; remove the staged
    files and the directories staging made. Works from what is on disk, so it is right
    whether the patch stopped before, during or after any step. Return the steps undone."""
    work = root / BACKUP_DIR
    undone = 0
    for entry in reversed(journal.get("changes", [])):
        if not isinstance(entry, dict):
            continue
        destination = root / entry["path"]
        staged = root / entry["staged"] if entry.get("staged") else None
        if entry["action"] == "delete":
            took_effect = not os.path.lexists(destination)
        else:
            took_effect = staged is not None and not os.path.lexists(staged)
        backup = work / entry["backup"] if entry.get("backup") else None
        if backup is not None and os.path.lexists(backup):
            os.replace(backup, destination)  # a no-op (same inode) if the step was not taken
        elif took_effect and entry["action"] == "replace":
            os.unlink(destination)  # a new file: there was nothing before it
        if staged is not None:
            staged.unlink(missing_ok=True)
        undone += took_effect
    _remove_dirs([root / d for d in journal.get("created_dirs", [])])
    return undone


def _remove_dirs(dirs: list[Path]) -> None:
    """Remove directories staging made, deepest first; one that holds files is kept."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def _remove_work(work: Path) -> None:
    """Drop the work folder: the staging log first, then the journal (so a crash here leaves
    a folder that ``recover`` reads right), then the backups."""
    for name in (STAGING_LOG, JOURNAL):
        (work / name).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        state.fsync_dir(work.parent)


UNIT_DIRS = ("usr/lib/systemd/system", "etc/systemd/system", "lib/systemd/system")
UNIT_SUFFIXES = (".service", ".socket", ".timer")


def units_to_restart(root: Path, changed: Iterable[str]) -> list[str]:
    """Units whose files changed: the unit file itself, a drop-in of it (``NAME.d/*.conf``
    in any unit folder, also one the target removed), a binary its Exec lines name, or a
    tree it declares with ``X-Hatchery-Restart-On=/path/`` (systemd ignores X- keys); a
    template as the pattern of its instances. ``hatchery-agent.service`` comes last: it
    performs the patch and is re-exec'd at the end."""
    changed = set(changed)
    units: set[str] = set()
    for unit_dir in UNIT_DIRS:
        for path in changed:
            name, sep, _ = path.removeprefix(unit_dir + "/").partition(".d/")
            if path.startswith(unit_dir + "/") and sep and name.endswith(UNIT_SUFFIXES):
                units.add(name)
    for unit_dir in UNIT_DIRS:
        directory = root / unit_dir
        if not directory.is_dir():
            continue
        for unit in directory.iterdir():
            if not unit.name.endswith(UNIT_SUFFIXES) or not unit.is_file():
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
    # A template (``getty@.service``) cannot be restarted by its name: its pattern restarts
    # every instance running (``systemctl try-restart`` takes globs of loaded units).
    ordered = sorted(u.replace("@.", "@*.") for u in units if u != AGENT_UNIT)
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
