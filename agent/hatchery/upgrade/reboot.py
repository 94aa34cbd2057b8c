"""Reboot mode's steps on disk and on the host: stage, arm the boot guard, load, jump, settle.

Files under ``<state>/boot/``:

* ``<version>/vmlinuz`` and ``<version>/initrd``: the staged images (the running version is
  staged too, as the way back);
* ``pending/``: ``version``, ``previous``, ``guard-seconds`` and ``restore`` (VM names, one a
  line) — plain files so the image's boot guard (a shell script that runs before the agent)
  can read them. If the new version does not write ``pending/good`` within ``guard-seconds``
  of booting, the guard kexecs back into ``previous`` and writes ``pending/fallback`` with
  the reason. The agent, at start, finishes the story either way (``settle``, then
  ``clear``).

Every file here is written durably (temporary file, fsync, rename, fsync of the folder)
before the jump: a direct ``kexec -e`` does not sync, and a staged image cut short by a
crash must never be booted. A staged image already present is reused only if its sha256 is
the one the image's manifest signs; otherwise it is staged again.

These are blocking functions (file copies, kexec) for a worker thread or for start-up. None
of them records the upgrade's status: they return what happened and the controller, the
only writer of the status, records it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from hatchery import host
from hatchery.errors import HatcheryError
from hatchery.state import fsync_dir, write_atomic
from hatchery.upgrade.model import BootOutcome, ImageSource

log = logging.getLogger(__name__)
GUARD_SECONDS = 180


def boot_dir(state_dir: Path) -> Path:
    return state_dir / "boot"


def pending_dir(state_dir: Path) -> Path:
    return boot_dir(state_dir) / "pending"


def armed(state_dir: Path) -> bool:
    """Whether a reboot-mode upgrade armed the boot guard and was not settled yet."""
    return (pending_dir(state_dir) / "version").exists()


CHUNK = 1 << 20


class StagingError(HatcheryError):
    """An artefact copied out of the store is not what the image's manifest signs."""


def stage(images: ImageSource, state_dir: Path, version: str) -> Path:
    """Put ``version``'s kernel and initrd in their boot folder, durably; return it. An
    artefact the store keeps as is (``ImageSource.checked_file``) is hard-linked there: no
    copy of 100 MB; others are copied out of the store (also when the link fails).

    A file staged before is kept only if it is the store's checked file itself (a link made
    before) or its sha256 is the manifest's (a copy cut short by a crash, or changed on /data
    since, is staged again).

    :raise HatcheryError: the store cannot give them, or they do not match the manifest.
    :raise OSError: they cannot be written.
    """
    target = boot_dir(state_dir) / version
    target.mkdir(parents=True, exist_ok=True)
    fsync_dir(target.parent)
    fsync_dir(target.parent.parent)
    for role, name in (("kernel", "vmlinuz"), ("initrd", "initrd")):
        want = images.artefact_digest(version, role)
        if want is None:
            raise StagingError(f"image {version} has no {role}")
        out = target / name
        source = images.checked_file(version, role)
        if out.exists():
            if source is not None and os.path.samefile(source, out):
                continue  # linked before: the very file the store has just checked
            if sha256_of(out) == want:
                continue
            log.warning("staged %s is not image %s's %s (cut short or changed): staging it "
                        "again", out, version, role)  # fmt: skip
        if source is None or not _link(source, out):
            _copy(images, version, role, out, want)
    return target


def _link(source: Path, out: Path) -> bool:
    """``out`` becomes another name of the checked file ``source`` (durably); False if the
    file system will not (another file system, a link limit): then it is copied."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as exc:
        log.info("cannot link %s to %s (%s): copying it", source, out, exc)
        return False
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(images: ImageSource, version: str, role: str, out: Path, want: str) -> None:
    """Write the artefact to ``out`` only once it is whole, checked and on disk."""
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with images.open_artefact(version, role) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if digest.hexdigest() != want:
            raise StagingError(
                f"image {version}'s {role} read from the store hashes to {digest.hexdigest()}, "
                f"not the signed {want} (changed on /data?)"
            )
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(path: Path, text: str) -> None:
    """A small file of ``pending/``, durably (the boot guard reads it after the jump)."""
    write_atomic(path, text.encode(), mode=0o644)


def prepare(
    images: ImageSource,
    state_dir: Path,
    version: str,
    previous: str,
    restore: Sequence[str],
    guard_seconds: int,
) -> Path:
    """Stage ``version`` (and ``previous``, the way back, if the store has it) and arm the
    boot guard; return the staged folder to jump into.

    :raise HatcheryError, OSError: as ``stage``; nothing is armed then.
    """
    staged = stage(images, state_dir, version)
    if images.has(previous):
        stage(images, state_dir, previous)
    pending = pending_dir(state_dir)
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    fsync_dir(pending.parent)
    _write(pending / "restore", "".join(f"{n}\n" for n in restore))
    _write(pending / "previous", previous + "\n")
    _write(pending / "guard-seconds", f"{guard_seconds}\n")
    _write(pending / "version", version + "\n")  # last: its presence arms the guard
    return staged


class Kexec(Protocol):
    """How a reboot leaves for the staged kernel (``HostKexec``; a stand-in in tests).

    Loading is apart from the jump so it happens before the VMs are paused to be saved: it
    reads and hashes ~90 MB (5 s on an emulated vCPU), seconds that were the guests' pause."""

    def load(self, staged: Path) -> bool:
        """Load ``staged``; False (logged) if the kernel refused it."""
        ...

    def unload(self) -> None:
        """Forget a loaded kernel: the upgrade stopped before its jump."""
        ...

    def jump(self, loaded: bool) -> None:
        """Shut down into the loaded kernel; through firmware if nothing is loaded.

        :raise HatcheryError: neither can be done."""
        ...


#: ``kexec``'s two ways to load a kernel, in the order tried. The file-based one first
#: (``-s``: ``kexec_file_load``, the kernel reads the files and hashes them itself): under
#: Secure Boot the kernel is locked down and refuses the other, and loads only a signed
#: kernel this way (Debian's kernels are signed). Then the classic one (``kexec_load``:
#: kexec-tools reads and hashes them), for a kernel built without the first. Both took
#: 4.2–5.5 s for the 89 MB on an emulated node (docs/benchmarks.md, upgrades).
LOAD_WAYS: tuple[tuple[str, ...], ...] = (("-s",), ())


def _kexec_either_way(*args: str) -> tuple[tuple[str, ...] | None, list[str]]:
    """Run ``kexec *args`` each of ``LOAD_WAYS`` in turn until one succeeds: the way that did
    (None if none), and the refusals of those that did not."""
    refused: list[str] = []
    for way in LOAD_WAYS:
        try:
            host.run(["kexec", *way, *args])
        except HatcheryError as exc:
            refused.append(exc.message)
            continue
        return way, refused
    return None, refused


class HostKexec:
    """``kexec`` on this host, through systemd (a clean shutdown) where it runs."""

    def load(self, staged: Path) -> bool:
        started = time.monotonic()
        way, refused = _kexec_either_way(
            "-l", str(staged / "vmlinuz"), f"--initrd={staged / 'initrd'}", "--reuse-cmdline"
        )
        if way is None:
            log.error("kexec cannot load %s: %s", staged.name, "; ".join(refused))
            return False
        log.info("kexec: %s loaded in %.1f s (%s)", staged.name, time.monotonic() - started,
                 "file-based" if way else "kexec_load")  # fmt: skip
        return True

    def unload(self) -> None:
        # ``-s -u`` unloads a kernel loaded either way, also where lockdown refuses ``-u``
        way, refused = _kexec_either_way("-u")
        if way is None:
            log.error("kexec cannot unload the staged kernel: %s", "; ".join(refused))

    def jump(self, loaded: bool) -> None:
        why: HatcheryError = HatcheryError("no kernel is loaded for kexec")
        if loaded:
            try:
                log.info("kexec: shutting down into the loaded kernel")
                if not host.systemctl("kexec"):
                    host.run(["kexec", "-e"])
                return
            except HatcheryError as exc:
                why = exc
        if not host.systemd_running():  # no firmware reboot without it either
            raise why if loaded else HatcheryError(f"{why.message} and there is no systemd to "
                                                   "reboot through")  # fmt: skip
        log.error("%s: rebooting through firmware instead", why.message)
        host.systemctl("reboot")


HOST_KEXEC = HostKexec()


def settle(state_dir: Path, running: str) -> BootOutcome | None:
    """How a reboot-mode upgrade ended, decided before the agent answers anyone: None if none
    was pending; else the outcome, with the boot marked good (``pending/good``, which stops
    the guard) when ``running`` is the version the upgrade aimed at.

    ``pending/`` stays until ``clear``: a crash before the controller has recorded the
    outcome settles it again at the next start.
    """
    pending = pending_dir(state_dir)
    if not armed(state_dir):
        return None
    version = (pending / "version").read_text().strip()
    previous = _read(pending / "previous")
    restore = tuple(n for n in _read(pending / "restore").split() if n)
    if running == version:
        _write(pending / "good", f"{time.time()}\n")
        return BootOutcome(version, previous, running, restore)
    fallback = pending / "fallback"
    why = fallback.read_text().strip() if fallback.exists() else "booted another version"
    return BootOutcome(version, previous, running, restore, reason=why)


def clear(state_dir: Path) -> None:
    """Forget the settled upgrade (the guard of this boot then stands down too)."""
    shutil.rmtree(pending_dir(state_dir), ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
