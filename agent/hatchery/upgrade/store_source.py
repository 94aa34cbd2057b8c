"""The image store as the upgrade controller's ``ImageSource``, re-verified at every use.

The store verified an image when it was added, but an upgrade comes later: a key may have
been removed from the trusted image keys since (a retired or leaked key must stop its
images at once), or an object on /data may have changed. So every use checks again: the
manifest's signature against the keys trusted *now* (``KeySource``, read at each call), and
each artefact's sha256 and size while it is read (``ImageStore.read_object``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from hatchery.images.manifest import Artefact, Manifest, Role
from hatchery.images.signing import KeySource
from hatchery.images.store import ImageStore, StoreError


class StoreImages:
    def __init__(self, store: ImageStore, keys: KeySource) -> None:
        self._store = store
        self._keys = keys

    def has(self, version: str) -> bool:
        try:
            return version in self._store.versions()
        except StoreError:
            return False

    def _manifest(self, version: str) -> Manifest:
        """The stored manifest, its signature checked against the keys trusted now.

        :raise StoreError: it cannot be read. :raise VerificationError: it is not trusted.
        """
        signed = self._store.manifest(version)
        self._keys.trusted().verify(signed)
        return signed.manifest

    def _artefact(self, version: str, role: str) -> Artefact:
        """The artefact as the manifest signs it (the signature checked now).

        :raise StoreError: the image has no such artefact.
        """
        artefact = self._manifest(version).artefacts.get(Role(role))
        if artefact is None:
            raise StoreError(f"image {version} has no {role}")
        return artefact

    def _checked_path(self, artefact: Artefact) -> Path | None:
        path = self._store.raw_path(artefact.sha256)
        if path is not None:
            self._store.verify_object(artefact.sha256, artefact.size)  # cached while unchanged
        return path

    def verify(self, version: str) -> None:
        """Signature, then every artefact checked against what the manifest signs
        (``CorruptObject`` if one does not match; the store sets it aside). An object this
        agent checked and whose file has not changed since is not read again: an emulated node
        spent tens of seconds of each live patch hashing the same two 100 MB roots."""
        for artefact in self._manifest(version).artefacts.values():
            self._store.verify_object(artefact.sha256, artefact.size)

    def open_artefact(self, version: str, role: str) -> BinaryIO:
        """The file itself when the store keeps the artefact as built (checked first, see
        ``checked_file``: a live root's image in it is then mounted where it lies); else the
        content, checked while it is read."""
        artefact = self._artefact(version, role)
        path = self._checked_path(artefact)
        if path is not None:
            return path.open("rb")
        chunks = self._store.read_object(artefact.sha256, artefact.size)
        return cast(BinaryIO, io.BufferedReader(_ChunkStream(chunks), 1 << 20))

    def checked_file(self, version: str, role: str) -> Path | None:
        return self._checked_path(self._artefact(version, role))

    def artefact_digest(self, version: str, role: str) -> str | None:
        artefact = self._manifest(version).artefacts.get(Role(role))
        return artefact.sha256 if artefact is not None else None

    def set_current(self, version: str) -> None:
        self._store.set_current(version)


class _ChunkStream(io.RawIOBase):
    """A verified chunk iterator as a readable stream: the iterator's own check (a
    ``CorruptObject`` when the content ends and does not match) reaches the reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            try:
                self._rest = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n

    def close(self) -> None:
        """Close the object file now, not when the generator is collected."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()
