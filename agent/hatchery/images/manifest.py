"""The signed image manifest: what an image is made of, in a form that can be signed.

A manifest names the image and its version and lists its artefacts by role (``kernel``,
``initrd``, optionally ``vmlinux``), each with the sha256 and size of its content. What the
build recorded (packages, inputs) is carried along under ``build``. The signature covers the
*canonical* JSON bytes of the manifest (keys sorted, no spaces, ASCII only), so any encoding
of the same manifest verifies and what is verified is exactly what is used.

The document on disk and on the wire::

    {"format": 1,
     "manifest": {"image": ..., "version": ..., "artefacts": {role: {...}}, "build": {...}},
     "signature": {"key": <key id>, "ed25519": <base64 of 64 bytes>}}

Everything parsed here may come from the network: every field is checked for type, size and
form, and anything unexpected is refused with a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hatchery.errors import HatcheryError

FORMAT = 1
SIGNED_NAME = "manifest.signed.json"
BUILD_MANIFEST = "manifest.json"
MAX_DOCUMENT = 4 * 1024 * 1024
MAX_ARTEFACT_SIZE = 1 << 40
MAX_BUILD_DEPTH = 6
SIGNATURE_BYTES = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class ManifestError(HatcheryError):
    """A manifest is malformed; the message names the field."""


class Role(StrEnum):
    KERNEL = "kernel"
    INITRD = "initrd"
    VMLINUX = "vmlinux"


REQUIRED_ROLES = frozenset({Role.KERNEL, Role.INITRD})
# How ``make images`` names its artefacts (tools/lab/hatchery_lab/imagebuild.py): <image>.<suffix>.
BUILD_SUFFIXES: dict[str, Role] = {
    ".vmlinuz": Role.KERNEL,
    ".cpio.zst": Role.INITRD,
    ".cpio.lz4": Role.INITRD,  # the appliance's (hatchery_lab.appliance_initrd says why)
    ".vmlinux": Role.VMLINUX,
}


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def check_version(value: object, where: str = "version") -> str:
    """A version string that is safe as a file name: no ``/``, no ``..``, no leading dot."""
    if not isinstance(value, str) or _VERSION.fullmatch(value) is None or ".." in value:
        raise ManifestError(
            f"{where} must be 1-64 characters of letters, digits and . _ + ~ - "
            f"(not starting with a dot, no '..'), got {_show(value)}"
        )
    return value


def _order(char: str) -> int:
    """dpkg's weight of a non-digit character: ``~`` before the end, the end before
    letters, letters before everything else."""
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _split_digits(text: str) -> tuple[str, str]:
    end = 0
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[:end], text[end:]


def compare_versions(a: str, b: str) -> int:
    """Order two image versions: -1 if ``a`` is older, 0 if equal, 1 if newer.

    Debian's version order (dpkg's ``verrevcmp``), which the version grammar above allows:
    runs of digits compare as numbers, other characters by dpkg's weights, so ``v9 < v10``,
    ``0.1.9 < 0.1.10``, ``1.0~rc1 < 1.0 < 1.0+hotfix1``. This is what "older" means for a
    downgrade (the manifests carry no build time: SourceDateEpoch is fixed for
    reproducibility, the same for every build).
    """
    while a or b:
        head_a, head_b = a, b
        while head_a and not head_a[0].isdigit() or head_b and not head_b[0].isdigit():
            ca = _order(head_a[0]) if head_a and not head_a[0].isdigit() else 0
            cb = _order(head_b[0]) if head_b and not head_b[0].isdigit() else 0
            if ca != cb:
                return -1 if ca < cb else 1
            head_a = head_a[1:] if head_a and not head_a[0].isdigit() else head_a
            head_b = head_b[1:] if head_b and not head_b[0].isdigit() else head_b
        digits_a, a = _split_digits(head_a)
        digits_b, b = _split_digits(head_b)
        na, nb = int(digits_a or "0"), int(digits_b or "0")
        if na != nb:
            return -1 if na < nb else 1
    return 0


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that is signed: sorted keys, no spaces, ASCII."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class Artefact:
    role: Role
    name: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True, slots=True)
class Manifest:
    image: str
    version: str
    artefacts: Mapping[Role, Artefact]
    build: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "version": self.version,
            "artefacts": {str(r): a.to_json() for r, a in sorted(self.artefacts.items())},
            "build": dict(self.build),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    def objects(self) -> set[str]:
        """The sha256 of every object this image needs."""
        return {a.sha256 for a in self.artefacts.values()}

    def size(self) -> int:
        return sum(a.size for a in self.artefacts.values())


@dataclass(frozen=True, slots=True)
class SignedManifest:
    manifest: Manifest
    key_id: str
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "manifest": self.manifest.to_json(),
            "signature": {
                "key": self.key_id,
                "ed25519": base64.b64encode(self.signature).decode(),
            },
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"


# --- strict parsing of untrusted documents ---------------------------------------------------
def _object(
    value: object, where: str, keys: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(value).__name__}")
    missing = keys - value.keys()
    if missing:
        raise ManifestError(f"{where}.{sorted(missing)[0]} is required")
    extra = value.keys() - keys - optional
    if extra:
        raise ManifestError(f"{where}.{_show(sorted(extra)[0])} is not a known field")
    return value


def _check_json(value: object, where: str, depth: int = 0) -> None:
    """The carried build record: plain JSON (no floats), bounded depth."""
    if depth > MAX_BUILD_DEPTH:
        raise ManifestError(f"{where} is nested deeper than {MAX_BUILD_DEPTH}")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) >= 1 << 63:
            raise ManifestError(f"{where} is an integer out of range")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(item, f"{where}.{key}", depth + 1)
        return
    raise ManifestError(f"{where} must be a string, integer, boolean, list or object")


def _artefact(role: Role, value: object) -> Artefact:
    where = f"manifest.artefacts.{role}"
    data = _object(value, where, frozenset({"name", "sha256", "size"}))
    name, digest, size = data["name"], data["sha256"], data["size"]
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or ".." in name:
        raise ManifestError(f"{where}.name must be a plain file name, got {_show(name)}")
    if not is_sha256(digest):
        raise ManifestError(f"{where}.sha256 must be 64 lowercase hex digits, got {_show(digest)}")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_ARTEFACT_SIZE:
        raise ManifestError(f"{where}.size must be an integer 0..{MAX_ARTEFACT_SIZE}")
    return Artefact(role, name, digest, size)


def parse_manifest(value: object) -> Manifest:
    data = _object(
        value, "manifest", frozenset({"image", "version", "artefacts"}), frozenset({"build"})
    )
    image = data["image"]
    if not isinstance(image, str) or _NAME.fullmatch(image) is None or ".." in image:
        raise ManifestError(f"manifest.image must be a plain name, got {_show(image)}")
    version = check_version(data["version"], "manifest.version")
    raw = data["artefacts"]
    if not isinstance(raw, dict):
        raise ManifestError("manifest.artefacts must be a JSON object")
    artefacts: dict[Role, Artefact] = {}
    for key, item in raw.items():
        try:
            role = Role(key)
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise ManifestError(
                f"manifest.artefacts.{_show(key)} is not a role ({known})"
            ) from None
        artefacts[role] = _artefact(role, item)
    for role in sorted(REQUIRED_ROLES - artefacts.keys()):
        raise ManifestError(f"manifest.artefacts.{role} is required")
    names = [a.name for a in artefacts.values()]
    if len(set(names)) != len(names):
        raise ManifestError("manifest.artefacts: two roles have the same file name")
    build = data.get("build", {})
    if not isinstance(build, dict):
        raise ManifestError("manifest.build must be a JSON object")
    _check_json(build, "manifest.build")
    return Manifest(image, version, artefacts, build)


def parse_signed(raw: bytes) -> SignedManifest:
    """A signed manifest document from untrusted bytes; its signature is *not* checked here."""
    if len(raw) > MAX_DOCUMENT:
        raise ManifestError(f"the signed manifest is larger than {MAX_DOCUMENT} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"the signed manifest is not valid JSON: {exc}") from None
    data = _object(value, "document", frozenset({"format", "manifest", "signature"}))
    if data["format"] != FORMAT or isinstance(data["format"], bool):
        raise ManifestError(f"document.format must be {FORMAT}, got {_show(data['format'])}")
    manifest = parse_manifest(data["manifest"])
    sig = _object(data["signature"], "signature", frozenset({"key", "ed25519"}))
    key_id = sig["key"]
    if not isinstance(key_id, str) or _KEY_ID.fullmatch(key_id) is None:
        raise ManifestError(f"signature.key must be 32 lowercase hex digits, got {_show(key_id)}")
    encoded = sig["ed25519"]
    if not isinstance(encoded, str) or len(encoded) > 200:
        raise ManifestError("signature.ed25519 must be a base64 string")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError("signature.ed25519 is not valid base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise ManifestError(f"signature.ed25519 must be {SIGNATURE_BYTES} bytes")
    return SignedManifest(manifest, key_id, signature)


# --- from a build directory (make images) ----------------------------------------------------
def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def role_of(filename: str, image: str | None = None) -> Role | None:
    """The role of a build's file by its suffix; with ``image``, only ``<image><suffix>``
    counts (the appliance's ``appliance-vm.container.cpio.lz4`` is not its initrd)."""
    for suffix, role in BUILD_SUFFIXES.items():
        if filename.endswith(suffix) and (image is None or filename == image + suffix):
            return role
    return None


def from_build_dir(build_dir: Path) -> Manifest:
    """The manifest of an image built by ``make images`` into ``build_dir``.

    Reads the build's manifest.json and re-hashes every artefact: a file that changed since
    the build is refused rather than signed.
    """
    path = build_dir / BUILD_MANIFEST
    try:
        build = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{path} does not exist", hint="build the image first: make images"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(build, dict) or not isinstance(build.get("artefacts"), dict):
        raise ManifestError(f"{path} has no artefacts table")
    artefacts: dict[Role, Artefact] = {}
    stem = build.get("image") if isinstance(build.get("image"), str) else build_dir.name
    for filename, meta in sorted(build["artefacts"].items()):
        role = role_of(filename, stem)
        if role is None:
            continue
        digest, size = sha256_file(build_dir / filename)
        if not isinstance(meta, dict) or meta.get("sha256") != digest:
            raise ManifestError(
                f"{build_dir / filename} does not match the build's manifest.json "
                "(changed since the build?)"
            )
        artefacts[role] = Artefact(role, filename, digest, size)
    carried = {k: v for k, v in build.items() if k not in ("artefacts", "version")}
    image = build.get("image") or build_dir.name
    manifest = {
        "image": image,
        "version": build.get("version"),
        "artefacts": {str(r): a.to_json() for r, a in artefacts.items()},
        "build": carried,
    }
    try:
        return parse_manifest(manifest)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc.message}") from exc
