"""OCI image archives: find an image in one, check every byte of it, and say what it runs.

An archive is a tar of an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``),
as ``skopeo copy ... oci-archive:`` and ``docker save`` (Docker 25 and later) write it. The
image it holds is the tenant's workload, packed by whoever made it: hostile until checked.
``check_image`` is the one gate, run by the agent before a VM is given a byte of it:

- every blob (manifest, config, each layer) hashes to its digest, and has its stated size;
- the manifest and config are small JSON of the expected shape and media types;
- each layer is a tar (plain or gzip) whose entries, applied in order into an empty root,
  stay inside it: no absolute or ``..`` path, no entry written or whited out through a
  symlink (an unpacker follows it, wherever it points), no path that is a symlink replaced
  by another entry without a whiteout, no hard link out of the root or through a symlink, no symlink
  whose target climbs out of the root, no device node, no name with control characters (the
  VM's unpacker reads names a line at a time), bounded entries and bytes.

What passes can be unpacked by the plain busybox ``tar`` in the appliance VM, whiteouts
first (``.wh.NAME`` removes NAME, ``.wh..wh..opq`` empties its folder: the OCI layer spec).
A refusal is an ``ImageRefused`` whose message names the layer and the entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from hatchery.errors import HatcheryError

MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})  # fmt: skip
CONFIG_TYPES = frozenset({
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
})  # fmt: skip
# layer media type -> compression ("gzip" or "none"); zstd layers are refused (the VM's
# busybox cannot read them) with a hint
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_JSON = 1 << 20  # index, manifest and config: 1 MiB each
MAX_LAYERS = 64
MAX_MEMBERS = 4096  # of the archive itself: blobs, index, layout (docker save adds a few per layer)
MAX_ENTRIES = 200_000  # entries over all layers
MAX_UNPACKED = 4 << 30  # bytes of file content over all layers
MAX_NAME = 4096
CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class ImageRefused(HatcheryError):
    """The archive, or the image in it, is malformed or unsafe to unpack."""


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob of the archive: its digest (hex), size and, for layers, compression."""

    sha256: str
    size: int
    compression: str = "none"

    @property
    def member(self) -> str:
        return f"blobs/sha256/{self.sha256}"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What the image asks to run (the ``config`` of the OCI image configuration)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = "/"
    user: str = ""


@dataclass(frozen=True, slots=True)
class Image:
    """An image found in an archive and checked: its manifest digest, layers and config."""

    manifest: str  # sha256 hex of the manifest blob
    config: ImageConfig
    layers: tuple[Blob, ...]
    entries: int = 0
    unpacked_bytes: int = 0


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _digest(value: object, where: str) -> str:
    match = _DIGEST.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ImageRefused(f"{where}: a digest must be sha256:<64 hex>, got {_show(value)}")
    return match.group(1)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageRefused(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _size(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 40:
        raise ImageRefused(f"{where}: size must be a whole number of bytes, got {_show(value)}")
    return value


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageRefused(f"{where} must be a list of strings")
    return tuple(value)


class Archive:
    """An OCI archive opened for reading; members are looked up by name, never extracted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            self._tar = tarfile.open(path, mode="r:")
            count = 0
            while (m := self._tar.next()) is not None:
                count += 1
                if count > MAX_MEMBERS:
                    self._tar.close()
                    raise ImageRefused(f"{path.name} has more than {MAX_MEMBERS} members")
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isreg():
                    self._members[name] = m
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise ImageRefused(f"{path.name} is not a tar archive: {exc}") from None

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        return name in self._members

    def open(self, name: str) -> IO[bytes]:
        member = self._members.get(name)
        if member is None:
            raise ImageRefused(f"the archive has no {name}")
        stream = self._tar.extractfile(member)
        if stream is None:
            raise ImageRefused(f"the archive's {name} cannot be read")
        return stream

    def size(self, name: str) -> int:
        return self._members[name].size

    def read_json(self, name: str) -> Any:
        if self.has(name) and self.size(name) > MAX_JSON:
            raise ImageRefused(f"{name} is larger than {MAX_JSON} bytes")
        raw = self.open(name).read(MAX_JSON + 1)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ImageRefused(f"{name} is not valid JSON: {exc}") from None

    def blob(self, blob: Blob, what: str) -> Iterator[bytes]:
        """The blob's bytes, checked against its size and digest as they are read: a
        mismatch raises at the end, before the last chunk is handed out."""
        if not self.has(blob.member):
            raise ImageRefused(f"{what}: the archive has no blob sha256:{blob.sha256}")
        if self.size(blob.member) != blob.size:
            raise ImageRefused(
                f"{what}: blob sha256:{blob.sha256[:12]} is {self.size(blob.member)} bytes, "
                f"its descriptor says {blob.size}"
            )
        stream = self.open(blob.member)
        digest = hashlib.sha256()
        pending = b""
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            if pending:
                yield pending
            pending = chunk
        if digest.hexdigest() != blob.sha256:
            raise ImageRefused(
                f"{what}: blob sha256:{blob.sha256[:12]} does not match its digest "
                f"(its content hashes to sha256:{digest.hexdigest()[:12]})"
            )
        if pending:
            yield pending

    def blob_bytes(self, blob: Blob, what: str) -> bytes:
        if blob.size > MAX_JSON:
            raise ImageRefused(f"{what} is larger than {MAX_JSON} bytes")
        return b"".join(self.blob(blob, what))


def find_manifest(archive: Archive, tag: str | None) -> Blob:
    """The manifest the index names ``tag`` (``org.opencontainers.image.ref.name``); an
    archive of one image gives that one whatever it is tagged in the store."""
    if not archive.has("index.json"):
        raise ImageRefused(
            "the archive has no index.json: not an OCI image layout",
            hint="make it with skopeo copy ... oci-archive:FILE:TAG, or docker save (25+)",
        )
    index = _object(archive.read_json("index.json"), "index.json")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageRefused("index.json lists no manifests")
    images: list[tuple[str | None, Blob]] = []
    for i, entry in enumerate(manifests[:256]):
        where = f"index.json manifests[{i}]"
        d = _object(entry, where)
        if d.get("mediaType") not in MANIFEST_TYPES:
            continue
        annotations = d.get("annotations")
        ref = annotations.get(REF_ANNOTATION) if isinstance(annotations, dict) else None
        blob = Blob(_digest(d.get("digest"), where), _size(d.get("size"), where))
        images.append((ref if isinstance(ref, str) else None, blob))
    tagged = [blob for ref, blob in images if ref == tag]
    if len(tagged) == 1:
        return tagged[0]
    if len(images) == 1:
        return images[0][1]
    names = ", ".join(sorted(ref for ref, _ in images if ref)) or "no tags"
    raise ImageRefused(f"the archive holds {len(images)} images and none is tagged {tag!r}",
                       hint=f"its tags: {names}")  # fmt: skip


def _parse_manifest(raw: bytes) -> tuple[Blob, tuple[Blob, ...]]:
    try:
        data = _object(json.loads(raw), "the manifest")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ImageRefused(f"the manifest is not valid JSON: {exc}") from None
    if data.get("schemaVersion") != 2:
        raise ImageRefused(f"the manifest's schemaVersion must be 2, got "
                           f"{_show(data.get('schemaVersion'))}")  # fmt: skip
    config = _object(data.get("config"), "the manifest's config")
    if config.get("mediaType") not in CONFIG_TYPES:
        media = _show(config.get("mediaType"))
        raise ImageRefused(f"the manifest's config has media type {media}, not an image config")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ImageRefused("the manifest's layers must be a list")
    if len(layers) > MAX_LAYERS:
        raise ImageRefused(f"the image has {len(layers)} layers, more than {MAX_LAYERS}")
    out: list[Blob] = []
    for i, entry in enumerate(layers):
        d = _object(entry, f"layer {i}")
        layer_media = d.get("mediaType")
        if not isinstance(layer_media, str) or layer_media not in LAYER_TYPES:
            zstd = isinstance(layer_media, str) and "zstd" in layer_media
            hint = (
                "re-pack it with gzip layers (skopeo --dest-compress-format gzip)" if zstd else None
            )
            raise ImageRefused(f"layer {i} has media type {_show(layer_media)}: only tar and "
                               "tar+gzip layers are unpacked", hint=hint)  # fmt: skip
        out.append(Blob(_digest(d.get("digest"), f"layer {i}"), _size(d.get("size"), f"layer {i}"),
                        LAYER_TYPES[layer_media]))  # fmt: skip
    return Blob(_digest(config.get("digest"), "the manifest's config"),
                _size(config.get("size"), "the manifest's config")), tuple(out)  # fmt: skip


def _parse_config(raw: bytes) -> ImageConfig:
    try:
        data = _object(json.loads(raw), "the image configuration")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ImageRefused(f"the image configuration is not valid JSON: {exc}") from None
    if data.get("os", "linux") != "linux" or data.get("architecture", "amd64") != "amd64":
        raise ImageRefused(f"the image is for {_show(data.get('os'))}/"
                           f"{_show(data.get('architecture'))}, not linux/amd64")  # fmt: skip
    conf = data.get("config") or {}
    conf = _object(conf, "the image configuration's config")
    working_dir = conf.get("WorkingDir") or "/"
    user = conf.get("User") or ""
    if not isinstance(working_dir, str) or not isinstance(user, str):
        raise ImageRefused("WorkingDir and User must be strings")
    return ImageConfig(
        entrypoint=_strings(conf.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(conf.get("Cmd"), "Cmd"),
        env=_strings(conf.get("Env"), "Env"),
        working_dir=working_dir,
        user=user,
    )


@dataclass
class _Tree:
    """What the layers applied so far have made, as far as safety needs: the symlinks."""

    symlinks: set[str] = field(default_factory=set)
    entries: int = 0
    unpacked: int = 0

    def through_symlink(self, path: str) -> str | None:
        """The first folder on ``path``'s way that is a symlink, if any."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                return prefix
        return None

    def remove(self, path: str) -> None:
        """``path`` and everything under it are gone (a whiteout)."""
        self.symlinks = {s for s in self.symlinks if s != path and not s.startswith(path + "/")}


def _entry_path(name: str, what: str) -> str:
    if len(name) > MAX_NAME or _CONTROL.search(name):
        raise ImageRefused(f"{what}: entry {_show(name)} has control characters or is too long")
    if name.startswith("/"):
        raise ImageRefused(f"{what}: entry {_show(name)} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageRefused(f"{what}: entry {_show(name)} climbs out of the root ('..')")
    return "/".join(parts)


def _climbs_out(path: str, target: str) -> bool:
    """Whether a symlink at ``path`` pointing at ``target`` leads above the root. An absolute
    target is taken from the image's root, as the container will see it: it cannot."""
    if target.startswith("/"):
        return False
    depth = len([p for p in posixpath.dirname(path).split("/") if p])
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _check_layer(stream: IO[bytes], layer: int, tree: _Tree) -> None:
    what = f"layer {layer}"
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        members: list[tarfile.TarInfo] = []
        for member in tar:
            tree.entries += 1
            if tree.entries > MAX_ENTRIES:
                raise ImageRefused(f"the image has more than {MAX_ENTRIES} entries")
            if member.isreg():
                tree.unpacked += member.size
                if tree.unpacked > MAX_UNPACKED:
                    raise ImageRefused(f"the image unpacks to more than {MAX_UNPACKED} bytes")
            members.append(member)
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise ImageRefused(f"{what} is not a readable tar: {exc}") from None
    # The VM applies a layer's whiteouts before its entries (as the spec's unpacker does),
    # with ``rm -rf``, which follows a symlink on the way: none may lead through one of the
    # lower layers' symlinks (checked against them all before any whiteout is applied, so
    # the order of the whiteouts in the layer does not matter).
    whiteouts = []
    for member in members:
        path = _entry_path(member.name, what)
        base = posixpath.basename(path)
        if base.startswith(WHITEOUT):
            if base != OPAQUE and base[len(WHITEOUT) :] in ("", ".", ".."):
                raise ImageRefused(f"{what}: whiteout {_show(member.name)} names nothing")
            via = tree.through_symlink(path)
            if via is not None:
                raise ImageRefused(f"{what}: whiteout {_show(member.name)} would remove "
                                   f"through the symlink {via}")  # fmt: skip
            whiteouts.append((posixpath.dirname(path), base))
    for folder, base in whiteouts:
        if base == OPAQUE:
            for s in list(tree.symlinks):
                if folder == "" or s.startswith(folder + "/"):
                    tree.remove(s)
        else:
            tree.remove(posixpath.join(folder, base[len(WHITEOUT) :]))
    for member in members:
        path = _entry_path(member.name, what)
        if path == "":
            continue
        via = tree.through_symlink(path)  # the whiteout files are unpacked too
        if via is not None:
            raise ImageRefused(f"{what}: entry {_show(member.name)} would be written through "
                               f"the symlink {via}")  # fmt: skip
        if posixpath.basename(path).startswith(WHITEOUT):
            continue
        if path in tree.symlinks:
            raise ImageRefused(f"{what}: entry {_show(member.name)} replaces a symlink of a "
                               "lower layer without a whiteout")  # fmt: skip
        if member.ischr() or member.isblk():
            raise ImageRefused(f"{what}: entry {_show(member.name)} is a device node")
        if member.issym():
            if len(member.linkname) > MAX_NAME or _CONTROL.search(member.linkname):
                raise ImageRefused(f"{what}: symlink {_show(member.name)} has a bad target")
            if _climbs_out(path, member.linkname):
                raise ImageRefused(f"{what}: symlink {_show(member.name)} -> "
                                   f"{_show(member.linkname)} leaves the image's root")  # fmt: skip
            tree.symlinks.add(path)
        elif member.islnk():
            target = _entry_path(member.linkname, f"{what}: hard link {_show(member.name)}")
            via = tree.through_symlink(target)
            if target == "" or via is not None:
                raise ImageRefused(f"{what}: hard link {_show(member.name)} -> "
                                   f"{_show(member.linkname)} leads through a symlink")  # fmt: skip
        elif not (member.isreg() or member.isdir() or member.isfifo()):
            raise ImageRefused(f"{what}: entry {_show(member.name)} is of an unsupported "
                               f"type {member.type!r}")  # fmt: skip


class _Reader:
    """A file-like view of a blob's checked chunks (for gzip and tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n
        while want != 0:
            if self._at >= len(self._chunk):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._chunk, self._at = chunk, 0
            end = len(self._chunk) if want < 0 else min(len(self._chunk), self._at + want)
            parts.append(self._chunk[self._at : end])
            if want > 0:
                want -= end - self._at
            self._at = end
        return b"".join(parts)

    def drain(self) -> None:
        """Read to the end, so the digest is checked even past the tar's end marker."""
        for _ in self._chunks:
            pass


def check_image(archive: Archive, tag: str | None) -> Image:
    """The image ``tag`` in ``archive``, every blob and layer entry checked (module doc)."""
    manifest = find_manifest(archive, tag)
    config_blob, layers = _parse_manifest(archive.blob_bytes(manifest, "the manifest"))
    config = _parse_config(archive.blob_bytes(config_blob, "the image configuration"))
    tree = _Tree()
    for i, layer in enumerate(layers):
        reader = _Reader(archive.blob(layer, f"layer {i}"))
        stream = cast(IO[bytes], reader)
        if layer.compression == "gzip":
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
        try:
            _check_layer(stream, i, tree)
            reader.drain()
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageRefused(f"layer {i} is not a readable tar: {exc}") from None
    return Image(manifest.sha256, config, layers, tree.entries, tree.unpacked)


def split_reference(ref: str) -> tuple[str, str]:
    """``NAME[:TAG]`` as (name, tag); the tag is ``latest`` when not given."""
    name, _, tag = ref.partition(":")
    return name, tag or "latest"
