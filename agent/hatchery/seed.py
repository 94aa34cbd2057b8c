"""Node provisioning: a seed tarball of files for /etc, handed over by the boot environment.

A freshly born node has a blank /data: no agent configuration, no certificate. The seed is
how the operator (or the peer that births it) gives it those, once, before the agent starts:

* QEMU's firmware config (``-fw_cfg name=opt/hatchery/seed,file=seed.tar``), for VMs and tests;
* ``hatchery.seed=http://…/seed/<token>`` on the kernel command line, served by the peer that
  PXE-booted the node (its boot HTTP service): the token is single-use, short-lived and bound
  to this machine's MAC and birth-lease address, so this fetch is the one that succeeds. The
  node posts a public key it just made and gets the seed sealed to it (``hatchery.sealing``):
  the private key inside never crosses the boot network readable.

Only regular files and directories below ``hatchery/`` and ``systemd/network/`` are taken
(absolute paths, ``..``, links and devices are refused); files are written atomically, keys
0600, and the seeds of the nodes this node will birth (``hatchery/seeds/``, each with a
private key) 0600 in a 0700 folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from hatchery import host
from hatchery.errors import CommandError, HatcheryError
from hatchery.sealing import OVERHEAD, SealError, SeedKey
from hatchery.state import write_atomic, write_private

log = logging.getLogger(__name__)
FW_CFG = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/hatchery/seed/raw")
ALLOWED = ("hatchery/", "systemd/network/")
MAX_SEED = 16 * 1024 * 1024
MAX_FILE = 4 * 1024 * 1024


class SeedError(HatcheryError):
    """The seed is unreadable or holds something it may not."""


SEEDS = "hatchery/seeds/"  # nested seeds: private keys of the nodes this node births
#: A URL seed: tries while the network comes up, the pause between them, and how many
#: refusals (404: a spent, expired or unknown token, or another address) end it sooner. A
#: node rebooted by kexec keeps its first boot's command line and spent token: 30 refusals
#: held its agent back a minute.
FETCH_ATTEMPTS, FETCH_PAUSE, FETCH_REFUSALS = 30, 2.0, 3
#: Written once the seed of this boot was tried (``/run`` is emptied at each boot).
BOOT_MARKER = Path("/run/hatchery/seed-tried")


def _cmdline_url(cmdline: str) -> str | None:
    """The last ``hatchery.seed=`` (the kernel's own rule: a later argument wins)."""
    url = None
    for arg in cmdline.split():
        if arg.startswith("hatchery.seed="):
            url = arg.split("=", 1)[1]
    return url


def birth_origin(cmdline_path: Path = Path("/proc/cmdline")) -> str | None:
    """``http://HOST:PORT`` of the boot service that birthed this node (the origin of its
    ``hatchery.seed=`` URL, never the token); None for a node not born over the network, or
    born over HTTPS (whose boot certificate this node has no CA for)."""
    try:
        url = _cmdline_url(cmdline_path.read_text())
    except OSError:
        return None
    if url is None or not url.startswith("http://"):
        return None
    parts = urllib.parse.urlsplit(url)
    return _origin(url) if parts.hostname and "@" not in parts.netloc else None


def find_seed(cmdline_path: Path = Path("/proc/cmdline"), fw_cfg: Path = FW_CFG) -> bytes | None:
    """The seed from the firmware config or the URL on the kernel command line, or None."""
    if not fw_cfg.exists():
        with contextlib.suppress(CommandError):  # no such module: the seed comes by URL
            host.run(["modprobe", "qemu_fw_cfg"], check=False)
    if fw_cfg.exists():
        raw = fw_cfg.read_bytes()
        log.info("seed: %d bytes from the firmware config", len(raw))
        return raw
    try:
        url = _cmdline_url(cmdline_path.read_text())
    except OSError:
        url = None
    if url is None:
        return None
    if not url.startswith(("http://", "https://")):
        raise SeedError(f"hatchery.seed must be an http(s) URL, not {url!r}")
    data = _fetch_sealed(url)
    log.info("seed: %d bytes from %s, sealed to this boot's key", len(data), _origin(url))
    return data


def _fetch_sealed(url: str) -> bytes:
    """POST a key made for this boot to the peer's ``url``; open the seed sealed to it."""
    sealed: bytes | None = None
    refusals = 0
    key = SeedKey()  # in memory only; a new one for every boot
    for attempt in range(FETCH_ATTEMPTS):  # the network may still be coming up
        kind = {"Content-Type": "application/octet-stream"}
        request = urllib.request.Request(url, data=key.public, method="POST", headers=kind)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (scheme checked)
                sealed = resp.read(MAX_SEED + OVERHEAD + 1)
            break
        except OSError as exc:
            # the URL holds a birth token: log where, never the token
            log.info("seed: %s not available yet (%s), attempt %d", _origin(url), exc,
                     attempt + 1)  # fmt: skip
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                refusals += 1  # the peer is up and will not answer this token from here
                if refusals >= FETCH_REFUSALS:
                    break
            time.sleep(FETCH_PAUSE)
    if sealed is None:
        hint = (
            "a birth token is single-use and short-lived, and answers only the address the "
            "peer's DHCP leased to this machine: boot it from the network again for a fresh one"
        )
        raise SeedError(f"cannot fetch the seed from {_origin(url)}",
                        hint=hint if refusals else None)  # fmt: skip
    if len(sealed) > MAX_SEED + OVERHEAD:
        raise SeedError(f"the seed at {_origin(url)} is larger than {MAX_SEED} bytes")
    try:
        data = key.open(sealed)
    except SealError as exc:
        raise SeedError(f"the seed from {_origin(url)} cannot be opened: {exc.message}") from exc
    return data


def _origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what may be logged of a URL that holds a token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def apply_seed(data: bytes, etc: Path) -> list[str]:
    """Write the seed's files below ``etc``; return their paths. Refuses anything unsafe."""
    written = []
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as exc:
        raise SeedError(f"the seed is not a tar archive: {exc}") from exc
    with archive:
        for member in archive.getmembers():
            name = member.name.lstrip("./") if member.name.startswith("./") else member.name
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not name:
                raise SeedError(f"unsafe path in the seed: {member.name!r}")
            if member.isdir():
                continue
            if not member.isfile():
                raise SeedError(f"the seed may hold files only, not {member.name!r}")
            if not name.startswith(ALLOWED):
                raise SeedError(f"the seed may not write /etc/{name}")
            if member.size > MAX_FILE:
                raise SeedError(f"{name} in the seed is too large")
            source = archive.extractfile(member)
            assert source is not None
            target = etc / name
            nested = name.startswith(SEEDS)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if nested else 0o755)
            if nested:
                target.parent.chmod(0o700)  # also when it was there before
            private = nested or name.endswith((".key", ".private")) or "/tls/" in f"/{name}"
            if private:  # never through a symlink planted there; replaces the last seed's
                write_private(target, source.read(), force=True)
            else:
                write_atomic(target, source.read(), 0o644)
            written.append(str(target))
    return written


def run_seed(etc: Path = Path("/etc")) -> int:
    data = find_seed()
    if data is None:
        log.info("seed: none given (no firmware config, no hatchery.seed=): nothing to do")
        return 0
    stamp = etc / "hatchery" / ".seed-sha256"
    digest = hashlib.sha256(data).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        log.info("seed: already applied")
        return 0
    files = apply_seed(data, etc)
    os.makedirs(stamp.parent, exist_ok=True)
    write_atomic(stamp, (digest + "\n").encode(), 0o644)
    log.info("seed: wrote %s", ", ".join(files))
    if any("/systemd/network/" in f for f in files):
        try:
            host.run(["networkctl", "reload"])
        except CommandError as exc:
            log.warning("seed: %s", exc.message)
    return 0


def run_seed_once(marker: Path = BOOT_MARKER, etc: Path = Path("/etc")) -> None:
    """The agent's start, before it reads its configuration: the seed, tried once per boot.

    Done inside the agent's own process rather than by a unit of its own, because a second
    Python process on the way to the agent cost an emulated node 1.9 s of each boot. Tried
    once per boot, as that unit was: the agent restarts (a crash, a live patch) and a birth
    token answers once. A seed that cannot be had is logged and the agent goes on with the
    configuration it holds, as it did after that unit failed: a node reboots by kexec with
    its first boot's command line, whose token is spent, and its seed is on /data already.
    Without one, reading the configuration then fails and says so.
    """
    if marker.exists():
        log.info("seed: tried earlier in this boot")
        return
    try:
        run_seed(etc)
    except SeedError as exc:
        log.error("seed: %s%s", exc.message, f" ({exc.hint})" if exc.hint else "")
    finally:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
