"""The image a node was born with, taken into its own store from the peer that birthed it.

Why: a node PXE-born from a peer runs an image its store does not hold. Yet every node needs
its running image there: it births others from it (``netboot`` exports the store's running
image), a live patch compares against it, and a reboot upgrade keeps it as the way back.
Until now an operator had to publish it into each newborn, 89 MB sent over the network for
the node to hash bytes it already held in RAM.

How, once per boot, in the background after the agent is up:

1. The birth peer is the origin of ``hatchery.seed=`` on the kernel command line: its boot
   HTTP service, which exports the running image's artefacts and its signed manifest
   (public: an image holds no secret) at ``/artefacts/hypervisor/<version>/``.
2. The manifest is read (at most ``MAX_DOCUMENT``), its signature verified against the keys
   this node trusts and its version checked to be the one the node runs, *before anything
   else is downloaded*.
3. Each object the store lacks is fetched: the initrd around the node's own root image (its
   first bytes say where the live layout's root image lies; only the bytes before and after
   it are downloaded, with Range requests, and the root image is read from the loop device
   the node runs on, ``running_root``); anything else, and an initrd that does not hash
   right that way, whole.
4. The store takes an object only if it hashes to the manifest's sha256 within the
   manifest's size, then adds the image (verified once more), as for any publish.

The boot network is hostile: anything on it can answer in the peer's place. It cannot make
the node store what its trusted keys did not sign, nor make it download more than the signed
sizes: every answer is read to a bound, and a Range answer for other bytes than asked is
refused. A failure leaves the store's images as they were and is logged; the operator can
still publish the image as before.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hatchery.errors import HatcheryError
from hatchery.images.fetch import content_range
from hatchery.images.manifest import (
    MAX_DOCUMENT,
    SIGNED_NAME,
    Artefact,
    ManifestError,
    Role,
    check_version,
    parse_signed,
)
from hatchery.images.running_root import CHUNK, MAX_SENT, size_of, write_with_root
from hatchery.images.signing import KeySource
from hatchery.images.store import CorruptObject, ImageStore, ObjectWriter
from hatchery.upgrade.archive import root_image_range

log = logging.getLogger(__name__)

#: The names ``netboot`` exports a version's artefacts under (births' iPXE scripts name
#: them); any other artefact keeps its own name.
EXPORTED_NAMES = {Role.KERNEL: "vmlinuz", Role.INITRD: "initrd"}
#: The bytes read first to find the root image in an initrd: its cpio header and name.
PROBE = 4096
TIMEOUT = 30.0
#: Tries (the peer may be busy birthing a rack) and the pause between them.
ATTEMPTS, PAUSE = 3, 5.0


class BootedImageError(HatcheryError):
    """The booted image could not be taken from the birth peer (the store is unchanged)."""


def exported_name(role: Role, name: str) -> str:
    """The file name ``role``'s artefact (``name`` in its build) is exported under."""
    return EXPORTED_NAMES.get(role, name)


@dataclass(frozen=True, slots=True)
class Adopted:
    """What adopting the booted image took: bytes downloaded, and those of the running root
    image that did not need to be."""

    downloaded: int
    from_running_root: int
    seconds: float


class _Peer:
    """Plain HTTP GETs to the birth peer's boot service, every answer bounded."""

    def __init__(self, base: str) -> None:
        self.base = base
        # the boot network has no proxy: never one from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, name: str, limit: int) -> bytes:
        """The whole file ``name``; refused when larger than ``limit``."""
        with self._opener.open(f"{self.base}/{name}", timeout=TIMEOUT) as resp:
            data: bytes = resp.read(limit + 1)
        if len(data) > limit:
            raise BootedImageError(f"{self.base}/{name} is larger than {limit} bytes")
        return data

    def get_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (inclusive) of ``name``: a 206 answer for exactly that
        range, or refused."""
        request = urllib.request.Request(f"{self.base}/{name}",
                                         headers={"Range": f"bytes={start}-{end}"})  # fmt: skip
        with self._opener.open(request, timeout=TIMEOUT) as resp:
            answered = content_range(resp.headers.get("Content-Range"))
            if resp.status != 206 or answered != (start, end):
                raise BootedImageError(f"{self.base}/{name}: no answer for bytes {start}-{end}")
            data: bytes = resp.read(end - start + 2)
        if len(data) != end - start + 1:
            raise BootedImageError(f"{self.base}/{name}: {len(data)} bytes for {start}-{end}")
        return data

    def stream(self, name: str, writer: ObjectWriter, limit: int, stop: threading.Event) -> int:
        """``name`` whole into ``writer``; refused past ``limit`` bytes, or once ``stop``
        is set (the agent stops)."""
        total = 0
        with self._opener.open(f"{self.base}/{name}", timeout=TIMEOUT) as resp:
            while chunk := resp.read(CHUNK):
                if stop.is_set():
                    raise BootedImageError("the agent is stopping")
                total += len(chunk)
                if total > limit:
                    raise BootedImageError(f"{self.base}/{name} is larger than {limit} bytes")
                writer.write(chunk)
        return total


def adopt_booted_image(
    store: ImageStore,
    keys: KeySource,
    version: str,
    origin: str,
    running_root: Path | None,
    stop: threading.Event,
) -> Adopted | None:
    """Take ``version``, the image this node runs, from the boot service at ``origin``
    into ``store``; None when the store already holds it. Blocking: run it in a thread; it
    gives up between pieces once ``stop`` is set.

    :raise BootedImageError, VerificationError, ManifestError, StoreError, OSError: nothing
        was added (objects that verified may stay, as after any interrupted publish).
    """
    if version in store.versions():
        return None
    check_version(version)
    started = time.monotonic()
    peer = _Peer(f"{origin}/artefacts/hypervisor/{urllib.parse.quote(version, safe='')}")
    raw = peer.get(SIGNED_NAME, MAX_DOCUMENT)
    try:
        signed = parse_signed(raw)
    except ManifestError as exc:
        raise BootedImageError(f"{peer.base} sent a malformed manifest: {exc.message}") from exc
    keys.trusted().verify(signed)
    manifest = signed.manifest
    if manifest.version != version:
        raise BootedImageError(f"{peer.base} has the manifest of {manifest.version}, "
                               f"not of {version}, the version this node runs")  # fmt: skip
    downloaded = around = 0
    done: set[str] = set()
    for role, artefact in sorted(manifest.artefacts.items()):
        if stop.is_set():
            raise BootedImageError("the agent is stopping")
        if artefact.sha256 in done or store.has_object(artefact.sha256):
            continue
        name = exported_name(role, artefact.name)
        took = None
        if role is Role.INITRD and running_root is not None:
            took = _around_running_root(store, peer, name, artefact, running_root)
        if took is not None:
            downloaded, around = downloaded + took[0], around + took[1]
        else:
            downloaded += _whole(store, peer, name, artefact, stop)
        done.add(artefact.sha256)
    store.add_image(raw, keys.trusted())  # read again: a key removed meanwhile stops it
    adopted = Adopted(downloaded, around, time.monotonic() - started)
    log.info("image %s, which this node was born with, taken from %s: %d bytes downloaded, "
             "%d of its running root image not (%.1f s)", version, origin, downloaded, around,
             adopted.seconds)  # fmt: skip
    return adopted


def _whole(
    store: ImageStore, peer: _Peer, name: str, artefact: Artefact, stop: threading.Event
) -> int:
    with store.writer(artefact.sha256, max_size=artefact.size) as writer:
        total = peer.stream(name, writer, artefact.size, stop)
        writer.commit()
    return total


def _around_running_root(
    store: ImageStore, peer: _Peer, name: str, artefact: Artefact, running_root: Path
) -> tuple[int, int] | None:
    """The initrd made of the peer's bytes around the root image and this node's own root
    image: (bytes downloaded, bytes of the root image); None when it is not the live layout
    or not this node's root image (the caller downloads it whole)."""
    head = peer.get_range(name, 0, min(PROBE, artefact.size) - 1)
    where = root_image_range(io.BytesIO(head))
    if where is None:
        return None
    offset, size = where
    if size != size_of(running_root) or offset + size > artefact.size:
        log.info("%s/%s holds another root image than the one this node runs", peer.base, name)
        return None
    if artefact.size - size > MAX_SENT:  # around the root: its framing and /init, a few MB
        return None
    fetched = len(head)
    before = head[:offset]
    if offset > len(head):  # a long first name: the probe did not reach the root image
        before = peer.get_range(name, 0, offset - 1)
        fetched += len(before)
    after = b""
    if offset + size < artefact.size:
        after = peer.get_range(name, offset + size, artefact.size - 1)
        fetched += len(after)
    rest = before + after
    try:
        with store.writer(artefact.sha256, max_size=artefact.size) as writer:
            write_with_root(writer, rest, offset, running_root, size)
            writer.commit()
    except CorruptObject:
        log.info("%s/%s around this node's root image does not hash to %s", peer.base, name,
                 artefact.sha256)  # fmt: skip
        return None
    return fetched, size


def adopt_with_retries(
    adopt: Callable[[], Adopted | None],
    stop: threading.Event,
    attempts: int = ATTEMPTS,
    pause: float = PAUSE,
) -> Adopted | None:
    """``adopt``, tried again after a network failure (the birth peer may be busy birthing a
    rack); a refusal (a signature, a hash, a 404) is not tried again. None on failure:
    logged."""
    for attempt in range(1, attempts + 1):
        try:
            return adopt()
        except urllib.error.HTTPError as exc:  # it answered: no such export there
            log.warning("the image this node was born with is not at its birth peer (%s); "
                        "publish it (hatchery image publish)", exc)  # fmt: skip
            return None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            log.info("the image this node was born with: its birth peer did not answer (%s), "
                     "attempt %d of %d", exc, attempt, attempts)  # fmt: skip
            if attempt < attempts and stop.wait(pause):
                return None
        except (HatcheryError, OSError) as exc:
            log.warning("the image this node was born with cannot be taken from its birth "
                        "peer: %s; publish it (hatchery image publish)", exc)  # fmt: skip
            return None
    return None
