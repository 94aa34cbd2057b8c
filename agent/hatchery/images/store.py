"""A content-addressed store of image artefacts with signed manifests.

Layout under the store's root (the agent uses ``<state_dir>/images``)::

    objects/ab/<sha256>.zst    an artefact, zstd-compressed, named by the sha256 of its content
    objects/ab/<sha256>.raw    an artefact that was already compressed, kept as it is
    images/<version>.json      the signed manifest of an image whose objects are all present
    pointers.json              {"current": version, "previous": version}, set by the upgrade code
    partial/<sha256>.zst.part  a download from a peer in progress (kept for resuming; .raw.part
                               when the peer sent the content as it is)
    tmp/                       temporaries (emptied when the store opens)
    quarantine/                objects found corrupt, kept for a look

Every object is written to a temporary file, checked (the sha256 of the uncompressed content
must be its name, and its size the one expected), fsynced and renamed into place: an object
in ``objects/`` is always complete. Content that is already compressed (a bzImage, an initrd
carrying a squashfs root) is kept as it is (``.raw``): compressing it again gains nothing, and
kept plain it can be used where it lies (``raw_path``) instead of copied out first. An image
enters ``images/`` only when its signature verifies against the trusted keys and every object
it names is present and verifies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import zstandard

from hatchery.errors import HatcheryError
from hatchery.images.manifest import (
    MAX_ARTEFACT_SIZE,
    ManifestError,
    Role,
    SignedManifest,
    check_version,
    is_sha256,
    parse_signed,
)
from hatchery.images.signing import TrustedKeys
from hatchery.state import StateError, fsync_dir, read_json, write_atomic, write_json

log = logging.getLogger(__name__)
CHUNK = 1 << 20
LEVEL = 3
#: The first chunk decides: it must shrink by at least this share at level 1 for the
#: object to be compressed at ``LEVEL``; else it is kept as it is.
WORTH_COMPRESSING = 0.05
ZSTD, RAW = ".zst", ".raw"
POINTERS = "pointers.json"


class StoreError(HatcheryError):
    """The image store refused or failed an operation."""


class ObjectNotFound(StoreError):
    """No object with that sha256 is in the store."""


class ImageNotFound(StoreError):
    """No image with that version is in the store."""


class CorruptObject(StoreError):
    """An object's content does not match its name (or its expected size)."""


class MissingObjects(StoreError):
    """An image names objects the store does not hold."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message, hint="upload them first (PUT /v1/objects/<sha256>)")
        self.missing = missing


class ImageConflict(StoreError):
    """A different image with the same version is already in the store."""


@dataclass(frozen=True, slots=True)
class GcReport:
    kept: tuple[str, ...]
    removed_images: tuple[str, ...]
    removed_objects: int
    freed_bytes: int


def check_sha256(value: str) -> str:
    if not is_sha256(value):
        raise StoreError(f"{value[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return value


def compressed_bound(size: int) -> int:
    """The most bytes a zstd file of ``size`` content may take (zstd's bound plus room)."""
    return size + (size >> 7) + 64 * 1024


def content_chunks(path: Path, limit: int, raw: bool) -> Iterator[bytes]:
    """The content of object file ``path`` (``raw``: the content itself, else a zstd file);
    ``CorruptObject`` past ``limit`` bytes or if it is not valid zstd."""
    total = 0
    if raw:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                total += len(chunk)
                if total > limit:
                    raise CorruptObject(f"{path.name} holds more than the {limit} bytes expected")
                yield chunk
        return
    try:
        with (
            path.open("rb") as f,
            zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as reader,
        ):
            while chunk := reader.read(CHUNK):
                total += len(chunk)
                if total > limit:
                    raise CorruptObject(f"{path.name} holds more than the {limit} bytes expected")
                yield chunk
    except zstandard.ZstdError as exc:
        raise CorruptObject(f"{path.name} is not a valid zstd stream: {exc}") from None


def _compressor_for(first: bytes) -> zstandard.ZstdCompressionObj | None:
    """A compressor at ``LEVEL``, or none when ``first`` (the content's first chunk) is
    already compressed: it barely shrinks at zstd's cheapest level, so it is kept as is."""
    if first:
        trial = zstandard.ZstdCompressor(level=1).compress(first)
        if len(trial) > len(first) * (1 - WORTH_COMPRESSING):
            return None
    return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compressobj()


class ObjectWriter:
    """Content in, an object out: compressed (unless it already is) and hashed as it is
    written, checked on commit."""

    def __init__(self, store: ImageStore, expected: str | None, max_size: int) -> None:
        self._store = store
        self._expected = expected
        self._max = max_size
        fd, name = tempfile.mkstemp(dir=store.root / "tmp", prefix="obj-", suffix=".part")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._zstd: zstandard.ZstdCompressionObj | None = None  # made for the first chunk
        self._raw = False  # the first chunk was already compressed: stored as it is
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise CorruptObject(f"the object is larger than {self._max} bytes")
        self._hash.update(chunk)
        if self._zstd is None and not self._raw:
            self._zstd = _compressor_for(chunk)
            self._raw = self._zstd is None
        self._file.write(chunk if self._zstd is None else self._zstd.compress(chunk))

    def commit(self) -> str:
        """Check the content's sha256 and move the object into place; return its sha256."""
        digest = self._hash.hexdigest()
        if self._expected is not None and digest != self._expected:
            self.abort()
            raise CorruptObject(
                f"the content's sha256 is {digest}, not {self._expected} (tampered or truncated)"
            )
        if self._zstd is None and not self._raw:  # empty content: a valid (empty) zstd frame
            self._zstd = _compressor_for(b"")
        if self._zstd is not None:
            self._file.write(self._zstd.flush())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._done = True
        self._store._install(digest, self._tmp, self.size, raw=self._raw)
        return digest

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._file.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class ImageStore:
    def __init__(self, root: Path, max_object: int = MAX_ARTEFACT_SIZE) -> None:
        self.root = root
        self.max_object = max_object
        self._lock = threading.RLock()
        # Objects this process has checked (written or verified), by the identity of their file
        # then: adding an image right after its objects were uploaded does not hash 100 MB
        # again. Any change to the file since (its ctime, which no one can set back) or a new
        # process means a full check.
        self._checked: dict[str, tuple[tuple[int, int, int, int], int]] = {}
        self._listeners: list[Callable[[], None]] = []
        try:
            for sub in ("objects", "images", "partial", "tmp", "quarantine"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            for leftover in (root / "tmp").iterdir():
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open the image store in {root}: {exc}") from exc

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` once an image is added or the current one changes, in the thread
        that changed it (so it must not block); return what removes it. The netboot export
        follows a publish at once: a machine birthed right after it is not refused for an
        image its peer already holds, waiting for a periodic refresh."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail the publish that is done
                log.exception("image store listener %r failed", listener)

    # --- objects ---------------------------------------------------------------------------
    def _form_path(self, sha256: str, raw: bool) -> Path:
        check_sha256(sha256)
        return self.root / "objects" / sha256[:2] / f"{sha256}{RAW if raw else ZSTD}"

    def object_path(self, sha256: str) -> Path:
        """The object's file: ``<sha256>.raw`` (its content as is) if there is one, else
        ``<sha256>.zst`` (which may not exist: see ``has_object``)."""
        raw = self._form_path(sha256, raw=True)
        return raw if raw.is_file() else self._form_path(sha256, raw=False)

    def raw_path(self, sha256: str) -> Path | None:
        """The object's file if it holds the content as is (usable in place), else None."""
        raw = self._form_path(sha256, raw=True)
        return raw if raw.is_file() else None

    def partial_path(self, sha256: str, raw: bool = False) -> Path:
        check_sha256(sha256)
        return self.root / "partial" / f"{sha256}{RAW if raw else ZSTD}.part"

    def has_object(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def objects(self) -> set[str]:
        found: set[str] = set()
        for sub in (self.root / "objects").iterdir():
            for path in sub.iterdir():
                if path.suffix in (ZSTD, RAW) and is_sha256(path.stem):
                    found.add(path.stem)
        return found

    def _install(self, sha256: str, tmp: Path, size: int, raw: bool) -> None:
        """Move a checked object (``size`` bytes of content) into place; the other form of
        it, if any, goes (one file per object)."""
        target = self._form_path(sha256, raw)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        self._form_path(sha256, not raw).unlink(missing_ok=True)
        fsync_dir(target.parent)
        self._remember_checked(sha256, target, size)
        log.debug("object %s stored", sha256)

    @staticmethod
    def _file_identity(path: Path) -> tuple[int, int, int, int]:
        st = path.stat()
        return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)

    def _remember_checked(self, sha256: str, path: Path, size: int) -> None:
        with self._lock:
            self._checked[sha256] = (self._file_identity(path), size)

    def _checked_unchanged(self, sha256: str, path: Path, size: int | None) -> bool:
        with self._lock:
            known = self._checked.get(sha256)
        if known is None or (size is not None and size != known[1]):
            return False
        try:
            return known[0] == self._file_identity(path)
        except FileNotFoundError:
            return False

    def writer(self, expected: str | None = None, max_size: int | None = None) -> ObjectWriter:
        if expected is not None:
            check_sha256(expected)
        return ObjectWriter(self, expected, min(max_size or self.max_object, self.max_object))

    def put(self, chunks: Iterable[bytes], expected: str | None = None) -> str:
        """Store content given in chunks; with ``expected``, refuse content that hashes else."""
        with self.writer(expected) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def put_file(self, path: Path, expected: str | None = None) -> str:
        with path.open("rb") as f:
            return self.put(iter(lambda: f.read(CHUNK), b""), expected)

    def check_file(self, sha256: str, path: Path, size: int, raw: bool) -> None:
        """Raise ``CorruptObject`` unless object file ``path`` (``raw`` or zstd) holds ``size``
        bytes hashing to ``sha256``."""
        digest, total = hashlib.sha256(), 0
        for chunk in content_chunks(path, size, raw):
            digest.update(chunk)
            total += len(chunk)
        if total != size or digest.hexdigest() != sha256:
            raise CorruptObject(
                f"object {sha256}: the content is {total} bytes with sha256 {digest.hexdigest()},"
                f" not {size} bytes with sha256 {sha256} (tampered or corrupt)"
            )

    def adopt(self, sha256: str, path: Path, size: int, raw: bool) -> None:
        """Move a downloaded object file (``raw`` or zstd) into the store once it verifies;
        else raise, unchanged."""
        self.check_file(sha256, path, size, raw)
        with path.open("rb+") as f:
            os.fsync(f.fileno())
        self._install(sha256, path, size, raw)

    def verify_object(self, sha256: str, size: int | None = None) -> None:
        """Check a stored object; a corrupt one is moved to quarantine/ and reported."""
        path = self.object_path(sha256)
        if not path.is_file():
            raise ObjectNotFound(f"object {sha256} is not in the store")
        if self._checked_unchanged(sha256, path, size):
            return
        raw = path.suffix == RAW
        try:
            if size is None:
                digest, total = hashlib.sha256(), 0
                for chunk in content_chunks(path, self.max_object, raw):
                    digest.update(chunk)
                    total += len(chunk)
                if digest.hexdigest() != sha256:
                    raise CorruptObject(f"object {sha256}: its content hashes to something else")
            else:
                self.check_file(sha256, path, size, raw)
                total = size
            self._remember_checked(sha256, path, total)
        except CorruptObject as exc:
            with self._lock:
                self._checked.pop(sha256, None)
            aside = self.root / "quarantine" / f"{path.name}.{int(time.time())}"
            os.replace(path, aside)
            log.error("object %s is corrupt (%s): moved to %s", sha256, exc.message, aside)
            raise

    def open_object(self, sha256: str) -> BinaryIO:
        """The content of an object as a stream (not verified: use ``read_object`` for that)."""
        path = self.object_path(sha256)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {sha256} is not in the store") from None
        if path.suffix == RAW:
            return f
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)

    def read_object(self, sha256: str, size: int | None = None) -> Iterator[bytes]:
        """The content in chunks; raises ``CorruptObject`` at the end if it does not verify."""
        path = self.object_path(sha256)
        if not path.is_file():
            raise ObjectNotFound(f"object {sha256} is not in the store")
        digest, total = hashlib.sha256(), 0
        limit = self.max_object if size is None else size
        for chunk in content_chunks(path, limit, path.suffix == RAW):
            digest.update(chunk)
            total += len(chunk)
            yield chunk
        if digest.hexdigest() != sha256 or (size is not None and total != size):
            raise CorruptObject(f"object {sha256}: its content does not match its name")

    # --- images ----------------------------------------------------------------------------
    def _image_path(self, version: str) -> Path:
        try:
            check_version(version)
        except ManifestError as exc:
            raise ImageNotFound(f"no image {version[:80]!r}: {exc.message}") from None
        return self.root / "images" / f"{version}.json"

    def add_image(self, raw: bytes, keys: TrustedKeys) -> SignedManifest:
        """Add a signed manifest: its signature must verify and all its objects verify.

        Adding the same image again is a no-op; another image with the same version is refused.
        """
        signed = parse_signed(raw)
        keys.verify(signed)
        manifest = signed.manifest
        with self._lock:  # gc must not delete an object between its check and the add
            path = self._image_path(manifest.version)
            if path.exists():
                existing = self.manifest(manifest.version)
                if existing.manifest.canonical() != manifest.canonical():
                    raise ImageConflict(
                        f"another image {manifest.version} is already in the store",
                        hint="versions are immutable: build with a new version",
                    )
                return existing
            missing = sorted(s for s in manifest.objects() if not self.has_object(s))
            if missing:
                raise MissingObjects(
                    f"image {manifest.version}: {len(missing)} object(s) missing: "
                    + ", ".join(missing[:4]),
                    missing,
                )
            for artefact in manifest.artefacts.values():
                self.verify_object(artefact.sha256, artefact.size)
            write_atomic(path, signed.to_bytes(), mode=0o644)
        log.info("image %s %s added (key %s)", manifest.image, manifest.version, signed.key_id)
        self._changed()
        return signed

    def versions(self) -> list[str]:
        return sorted(
            p.name[:-5] for p in (self.root / "images").glob("*.json") if not p.name.startswith(".")
        )

    def manifest_bytes(self, version: str) -> bytes:
        try:
            return self._image_path(version).read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"no image {version} in the store") from None

    def manifest(self, version: str) -> SignedManifest:
        try:
            return parse_signed(self.manifest_bytes(version))
        except ManifestError as exc:
            raise StoreError(f"the stored manifest of {version} is corrupt: {exc.message}") from exc

    # --- current and previous --------------------------------------------------------------
    def _pointers(self) -> dict[str, str | None]:
        data = read_json(self.root / POINTERS)
        result: dict[str, str | None] = {"current": None, "previous": None}
        if isinstance(data, dict):
            for key in result:
                value = data.get(key)
                result[key] = value if isinstance(value, str) else None
        return result

    def current(self) -> str | None:
        return self._pointers()["current"]

    def previous(self) -> str | None:
        return self._pointers()["previous"]

    def set_current(self, version: str) -> None:
        """Make ``version`` current; the old current becomes previous (for the upgrade code)."""
        with self._lock:
            if not self._image_path(version).exists():
                raise ImageNotFound(f"no image {version} in the store")
            pointers = self._pointers()
            if pointers["current"] == version:
                return
            try:
                write_json(
                    self.root / POINTERS,
                    {"current": version, "previous": pointers["current"] or pointers["previous"]},
                )
            except StateError as exc:
                raise StoreError(exc.message) from exc
            log.info("image %s is current (previous: %s)", version, pointers["current"])
        self._changed()

    # --- garbage collection and export -----------------------------------------------------
    def gc(self, keep: Iterable[str] = (), partial_max_age: float = 86400.0) -> GcReport:
        """Delete images other than current, previous and ``keep``, and unreferenced objects.

        Partial downloads older than ``partial_max_age`` seconds go too.
        """
        with self._lock:
            pointers = self._pointers()
            wanted = {v for v in (pointers["current"], pointers["previous"], *keep) if v}
            kept, removed = [], []
            referenced: set[str] = set()
            for version in self.versions():
                if version in wanted:
                    kept.append(version)
                    referenced |= self.manifest(version).manifest.objects()
                else:
                    self._image_path(version).unlink()
                    removed.append(version)
            count = freed = 0
            for sha256 in self.objects() - referenced:
                path = self.object_path(sha256)
                freed += path.stat().st_size
                path.unlink()
                count += 1
            now = time.time()
            for part in (self.root / "partial").iterdir():
                if now - part.stat().st_mtime > partial_max_age:
                    part.unlink(missing_ok=True)
            fsync_dir(self.root / "images")
        log.info("image gc: kept %s, removed images %s and %d objects (%d bytes)",
                 kept, removed, count, freed)  # fmt: skip
        return GcReport(tuple(kept), tuple(removed), count, freed)

    def export(self, version: str, directory: Path) -> dict[Role, Path]:
        """Write the artefacts of ``version``, decompressed and verified, into ``directory``.

        An object kept as is (``.raw``) is hard-linked there once it verifies (cached while
        its file is unchanged: one just stored is not read again), not copied: an emulated
        node took 9 s to copy and hash a 104 MB image for births after each publish, and a
        machine PXE-booted meanwhile was refused its kernel until iPXE tried again. The
        link is read-only in use (served to machines being born); another file system, or a
        link refused, falls back to the copy. Linking (and renaming the link) changes the
        object's ctime, which this store's cache of checked files watches because no one can
        set it back: the next check of that object reads it once more (a live patch checks
        the running version: 4 s for its initrd in an emulated node, against the 9 s the
        copy took at every publish)."""
        manifest = self.manifest(version).manifest
        directory.mkdir(parents=True, exist_ok=True)
        out: dict[Role, Path] = {}
        for role, artefact in sorted(manifest.artefacts.items()):
            target = directory / artefact.name
            fd, name = tempfile.mkstemp(dir=directory, prefix=f".{artefact.name}.")
            tmp = Path(name)
            try:
                os.close(fd)
                if not self._link_raw(artefact.sha256, artefact.size, tmp):
                    with tmp.open("wb") as f:
                        for chunk in self.read_object(artefact.sha256, artefact.size):
                            f.write(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                    os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            out[role] = target
        fsync_dir(directory)
        return out

    def _link_raw(self, sha256: str, size: int, tmp: Path) -> bool:
        """Put a verified link to the object kept as is at ``tmp``; False where there is
        none or it cannot be linked (the caller copies)."""
        raw = self.raw_path(sha256)
        if raw is None:
            return False
        self.verify_object(sha256, size)
        try:
            tmp.unlink()
            os.link(raw, tmp)
            os.chmod(tmp, 0o644)  # the object's mode too: its content is public (births)
        except OSError as exc:
            log.info("object %s: cannot link it for export (%s): copying it", sha256, exc)
            return False
        return True

    def artefact_chunks(self, version: str, artefact: str) -> Iterator[bytes]:
        """The content of one artefact of a stored image, named by role (``kernel``) or file
        name, verified while it is read (``CorruptObject`` at the end if it does not): a VM
        booted from the store boots exactly what was signed."""
        manifest = self.manifest(version).manifest
        for role, found in manifest.artefacts.items():
            if artefact in (str(role), found.name):
                return self.read_object(found.sha256, found.size)
        names = ", ".join(sorted(str(r) for r in manifest.artefacts))
        raise StoreError(f"image {version} has no artefact {artefact[:128]!r} (it has {names})")

    def usage(self) -> int:
        """Bytes the objects take on disk (compressed)."""
        return sum(self.object_path(s).stat().st_size for s in self.objects())
