"""The node's container images: signed OCI archives, kept as uploaded.

Layout under ``root`` (``<data>/containers``)::

    archives/<sha256>.tar      an archive, named by its content
    refs/<name>/<tag>.json     the signed reference naming it (``signed``)
    partial/                   uploads in progress (removed at start)

Publishing checks the signature (a trusted image key), that the upload is the signed
archive (sha256 and size) and that it holds the image the tag names. Every other check of the
image's content (``oci.check_image``) runs when a VM asks for it, as it is served: that is
where the bytes a VM unpacks are read anyway, so nothing stored can go unchecked, even a
file damaged on disk after it was published. A refusal then is written to the VM's record.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hatchery.containers import signed
from hatchery.containers.oci import Archive, find_manifest
from hatchery.containers.signed import ContainerRef, ReferenceError
from hatchery.errors import HatcheryError
from hatchery.images.manifest import sha256_file
from hatchery.images.signing import KeySource
from hatchery.state import write_atomic

log = logging.getLogger(__name__)


class ContainerNotFound(HatcheryError):
    """No such container image in the store."""


@dataclass(frozen=True, slots=True)
class Stored:
    ref: ContainerRef
    path: Path


class ContainerStore:
    def __init__(self, root: Path, keys: KeySource) -> None:
        self.root = root
        self._keys = keys
        for sub in ("archives", "refs", "partial"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(root / "partial", ignore_errors=True)
        (root / "partial").mkdir(mode=0o700, exist_ok=True)

    def partial(self, name: str) -> Path:
        """Where an upload is written before ``publish`` looks at it."""
        return self.root / "partial" / name

    def _ref_path(self, name: str, tag: str) -> Path:
        name, tag = signed.check_name(name, tag)
        return self.root / "refs" / name / f"{tag}.json"

    def publish(self, upload: Path, raw_signed: bytes) -> ContainerRef:
        """Take ``upload`` (an archive, moved into the store) named by the signed reference."""
        doc = signed.parse(raw_signed)
        doc.verify(self._keys.trusted())
        ref = doc.ref
        digest, size = sha256_file(upload)
        if (digest, size) != (ref.sha256, ref.size):
            raise ReferenceError(f"the upload is not the archive signed as {ref} "
                                 f"(sha256 {digest[:12]}, {size} bytes)")  # fmt: skip
        with Archive(upload) as archive:
            find_manifest(archive, ref.tag)
        target = self.root / "archives" / f"{ref.sha256}.tar"
        os.replace(upload, target)
        path = self._ref_path(ref.name, ref.tag)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        write_atomic(path, raw_signed, mode=0o644)
        log.info("container image %s stored (%d bytes, sha256 %s)", ref, ref.size, ref.sha256)
        return ref

    def resolve(self, name: str, tag: str) -> Stored:
        """The archive of ``name:tag``; its signature is checked again (a key removed from the
        trusted directory no longer serves what it signed)."""
        path = self._ref_path(name, tag)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ContainerNotFound(
                f"no container image {name}:{tag} on this node",
                hint="publish it: hatchery container publish",
            ) from None
        doc = signed.parse(raw)
        doc.verify(self._keys.trusted())
        return Stored(doc.ref, self.root / "archives" / f"{doc.ref.sha256}.tar")

    def refs(self) -> list[ContainerRef]:
        out = []
        for path in sorted((self.root / "refs").glob("*/*.json")):
            try:
                out.append(signed.parse(path.read_bytes()).ref)
            except (OSError, ReferenceError) as exc:
                log.warning("container reference %s unreadable: %s", path, exc)
        return out

    def remove(self, name: str, tag: str) -> None:
        """Forget ``name:tag``; its archive goes when no other reference names it."""
        stored = self.resolve(name, tag)
        self._ref_path(name, tag).unlink()
        if all(r.sha256 != stored.ref.sha256 for r in self.refs()):
            stored.path.unlink(missing_ok=True)
