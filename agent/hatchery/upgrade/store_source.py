"""The image store as the upgrade controller's ``ImageSource``."""

from __future__ import annotations

from typing import BinaryIO

from hatchery.images.manifest import Role
from hatchery.images.store import ImageStore, StoreError


class StoreImages:
    def __init__(self, store: ImageStore) -> None:
        self._store = store

    def has(self, version: str) -> bool:
        try:
            return version in self._store.versions()
        except StoreError:
            return False

    def _sha(self, version: str, role: str) -> str | None:
        artefact = self._store.manifest(version).manifest.artefacts.get(Role(role))
        return artefact.sha256 if artefact is not None else None

    def open_artefact(self, version: str, role: str) -> BinaryIO:
        sha = self._sha(version, role)
        if sha is None:
            raise StoreError(f"image {version} has no {role}")
        return self._store.open_object(sha)

    def artefact_digest(self, version: str, role: str) -> str | None:
        return self._sha(version, role)

    def set_current(self, version: str) -> None:
        self._store.set_current(version)
