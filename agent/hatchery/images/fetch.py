"""Fetch an image from a peer agent over HTTPS with mutual TLS, resuming where a cut left off.

Order of trust:

1. ``GET /v1/images/<version>``: the signed manifest. Its form is checked and its signature
   verified against the trusted keys *before anything else is downloaded*; a manifest for
   another version is refused too.
2. ``GET /v1/objects/<sha256>`` for each object the store lacks. The peer serves the object
   as it stores it: a zstd file, or the content itself when it was already compressed (we
   say we accept both; its ``Content-Type`` tells which). It is written to
   ``partial/<sha256>.zst.part`` (or ``.raw.part``) and a cut download is resumed with an
   HTTP Range request from the bytes already there (the partial file is kept across
   attempts and across calls). A complete download is hashed (decompressed first if zstd):
   only content whose sha256 and size are the manifest's enters the store, in the form it
   came in; anything else is deleted.
3. The image is added to the store, which checks the signature and every object once more.

A refused manifest, signature or object changes nothing in the store's images.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from hatchery.client import agent_url
from hatchery.errors import HatcheryError
from hatchery.images.manifest import (
    MAX_DOCUMENT,
    Artefact,
    ManifestError,
    check_version,
    parse_signed,
)
from hatchery.images.signing import KeySource, VerificationError
from hatchery.images.store import CorruptObject, ImageConflict, ImageStore, compressed_bound

#: What we ask an object in: the content as is, or a zstd file (``api.images``).
RAW_TYPE, ZSTD_TYPE = "application/octet-stream", "application/zstd"
ACCEPT = f"{RAW_TYPE}, {ZSTD_TYPE}"

log = logging.getLogger(__name__)
CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def content_range(header: str | None) -> tuple[int, int] | None:
    """The first and last byte a ``Content-Range`` header says an answer holds; None when
    there is none or it is not one range of bytes. Peers' answers to Range requests are
    checked against what was asked with it."""
    match = _CONTENT_RANGE.fullmatch(header or "")
    return (int(match[1]), int(match[2])) if match else None


class FetchError(HatcheryError):
    """An image could not be fetched from a peer (the store's images are unchanged)."""


@dataclass(frozen=True, slots=True)
class FetchReport:
    version: str
    peer: str
    fetched_objects: int
    present_objects: int
    downloaded_bytes: int
    resumed_bytes: int
    added: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "peer": self.peer,
            "fetched_objects": self.fetched_objects,
            "present_objects": self.present_objects,
            "downloaded_bytes": self.downloaded_bytes,
            "resumed_bytes": self.resumed_bytes,
            "added": self.added,
        }


@dataclass
class _Progress:
    downloaded: int = 0
    resumed: int = 0


class ImageFetcher:
    """Fetches images into ``store`` from peers, trusting ``keys``, speaking TLS with ``tls``."""

    def __init__(
        self,
        store: ImageStore,
        keys: KeySource,
        tls: ssl.SSLContext,
        *,
        attempts: int = 3,
        read_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.keys = keys
        self.tls = tls
        self.attempts = max(1, attempts)
        self.read_timeout = read_timeout
        self._object_locks: dict[str, asyncio.Lock] = {}

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.tls), timeout=timeout, auto_decompress=False
        )

    async def fetch(self, peer: str, version: str) -> FetchReport:
        check_version(version)
        base = agent_url(peer)
        progress = _Progress()
        async with self._session() as session:
            raw = await self._get_manifest(session, base, version)
            try:
                signed = parse_signed(raw)
            except ManifestError as exc:
                raise VerificationError(f"{base} sent a malformed manifest: {exc.message}") from exc
            self.keys.trusted().verify(signed)
            manifest = signed.manifest
            if manifest.version != version:
                raise FetchError(
                    f"{base} answered version {manifest.version} when asked for {version}"
                )
            if version in self.store.versions():
                if self.store.manifest(version).manifest.canonical() != manifest.canonical():
                    raise ImageConflict(f"another image {version} is already in the store")
            missing = [
                a
                for _, a in sorted(manifest.artefacts.items())
                if not self.store.has_object(a.sha256)
            ]
            present = len(manifest.objects()) - len({a.sha256 for a in missing})
            done: set[str] = set()
            for artefact in missing:
                if artefact.sha256 not in done:
                    await self._fetch_object(session, base, artefact, progress)
                    done.add(artefact.sha256)
        keys = self.keys.trusted()
        had = version in self.store.versions()
        await asyncio.to_thread(self.store.add_image, raw, keys)
        report = FetchReport(version, base, len(done), present, progress.downloaded,
                             progress.resumed, not had)  # fmt: skip
        log.info("image %s fetched from %s: %d objects downloaded (%d bytes, %d resumed), %d "
                 "already here", version, base, len(done), progress.downloaded, progress.resumed,
                 present)  # fmt: skip
        return report

    async def _get_manifest(self, session: aiohttp.ClientSession, base: str, version: str) -> bytes:
        url = f"{base}/v1/images/{version}"
        try:
            async with session.get(url) as resp:
                if resp.status == 404:
                    raise FetchError(f"{base} has no image {version}")
                if resp.status != 200:
                    raise FetchError(f"{url}: HTTP {resp.status}: {await _error_text(resp)}")
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    raw += chunk
                    if len(raw) > MAX_DOCUMENT:
                        raise FetchError(f"{url}: the manifest is larger than {MAX_DOCUMENT} bytes")
                return bytes(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"cannot get the manifest from {base}: {_describe(exc)}") from exc

    async def _fetch_object(
        self, session: aiohttp.ClientSession, base: str, artefact: Artefact, progress: _Progress
    ) -> None:
        lock = self._object_locks.setdefault(artefact.sha256, asyncio.Lock())
        async with lock:
            if self.store.has_object(artefact.sha256):
                return
            raw = await self._download(
                session, f"{base}/v1/objects/{artefact.sha256}", artefact, progress
            )
            part = self.store.partial_path(artefact.sha256, raw)
            try:
                await asyncio.to_thread(self.store.adopt, artefact.sha256, part, artefact.size, raw)
            except CorruptObject as exc:
                part.unlink(missing_ok=True)
                raise CorruptObject(
                    f"{artefact.role} from {base} refused: {exc.message}; the download is discarded"
                ) from exc

    async def _download(
        self, session: aiohttp.ClientSession, url: str, artefact: Artefact, progress: _Progress
    ) -> bool:
        """Download into the partial file, resuming; return when the peer has sent it all,
        whether it sent the content as is (else a zstd file)."""
        last: BaseException | None = None

        def bound(raw: bool) -> int:  # the most bytes the peer may send in that form
            return artefact.size if raw else compressed_bound(artefact.size)

        for attempt in range(1, self.attempts + 1):
            raw = self.store.partial_path(artefact.sha256, raw=True).exists()
            part = self.store.partial_path(artefact.sha256, raw)
            limit = bound(raw)
            offset = part.stat().st_size if part.exists() else 0
            if offset > limit:
                part.unlink()
                offset = 0
            headers = {"Accept": ACCEPT, **({"Range": f"bytes={offset}-"} if offset else {})}
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status == 416 and offset:
                        return raw  # the partial file already holds every byte: verify it
                    sent_raw = resp.content_type == RAW_TYPE
                    if resp.status in (200, 206) and sent_raw != raw:
                        # Not the form we hold a part of (another peer, or one upgraded
                        # since): that part is of no use.
                        part.unlink(missing_ok=True)
                        raw, offset = sent_raw, 0
                        part = self.store.partial_path(artefact.sha256, raw)
                        limit = bound(raw)
                        if resp.status == 206:
                            log.info("%s: the peer sends another form now; starting afresh", url)
                            continue
                    if resp.status == 206 and offset:
                        answered = content_range(resp.headers.get("Content-Range"))
                        if answered is None or answered[0] != offset:
                            raise FetchError(f"{url}: the peer answered a range we did not ask")
                        mode = "ab"
                        progress.resumed += offset
                        log.info("resuming %s at byte %d (attempt %d)", url, offset, attempt)
                    elif resp.status == 200:
                        mode, offset = "wb", 0
                    else:
                        raise FetchError(f"{url}: HTTP {resp.status}: {await _error_text(resp)}")
                    with part.open(mode) as f:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            offset += len(chunk)
                            if offset > limit:
                                raise CorruptObject(
                                    f"{url}: the peer sent more than {limit} bytes for an object "
                                    f"of {artefact.size}"
                                )
                            f.write(chunk)
                            progress.downloaded += len(chunk)
                return raw
            except CorruptObject:
                part.unlink(missing_ok=True)
                raise
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                last = exc
                log.warning("download of %s cut at byte %d (attempt %d/%d): %s",
                            url, offset, attempt, self.attempts, _describe(exc))  # fmt: skip
        raise FetchError(
            f"cannot download {url} ({self.attempts} attempt{'s' if self.attempts > 1 else ''}):"
            f" {_describe(last)}",
            hint="fetch again: the download resumes where it stopped",
        )


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt"
    return str(exc) or type(exc).__name__


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """The peer's error message: the ``error`` of its error body, else the start of the text."""
    try:
        raw = await resp.content.read(2048)
    except (aiohttp.ClientError, TimeoutError):
        return "no body"
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return str(body["error"])
    return raw.decode(errors="replace").strip() or resp.reason or "no reason"
