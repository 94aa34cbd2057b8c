"""A container image's signed reference: name, tag and the archive's sha256, signed with the
image keys (``images.signing``), so the agent stores only archives an operator vouched for.

The document (``<archive>.signed.json`` next to the archive)::

    {"format": 1,
     "container": {"name": "web", "tag": "1", "archive": {"sha256": ..., "size": ...}},
     "signature": {"key": <key id>, "ed25519": <base64>}}

The signature covers the canonical JSON of ``container`` (as image manifests do). The
archive's digest covers every blob in it, so nothing of the image can change unsigned.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatchery.errors import HatcheryError
from hatchery.images.manifest import canonical_json, sha256_file
from hatchery.images.signing import TrustedKeys, key_id, load_private_key
from hatchery.state import write_atomic

FORMAT = 1
MAX_DOCUMENT = 64 * 1024
SUFFIX = ".signed.json"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ReferenceError(HatcheryError):
    """A signed container reference is malformed or not trusted."""


def check_name(name: object, tag: object) -> tuple[str, str]:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ReferenceError(f"container image name {name!r}: 1-64 of a-z 0-9 . _ - "
                             "(starting with a letter or digit)")  # fmt: skip
    if not isinstance(tag, str) or not TAG.fullmatch(tag) or ".." in tag:
        raise ReferenceError(f"container image tag {tag!r}: 1-128 of letters, digits . _ -")
    return name, tag


@dataclass(frozen=True, slots=True)
class ContainerRef:
    name: str
    tag: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tag": self.tag,
                "archive": {"sha256": self.sha256, "size": self.size}}  # fmt: skip

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True, slots=True)
class SignedRef:
    ref: ContainerRef
    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "container": self.ref.to_json(),
            "signature": {"key": self.key_id,
                          "ed25519": base64.b64encode(self.signature).decode()},
        }, indent=2, sort_keys=True).encode() + b"\n"  # fmt: skip

    def verify(self, keys: TrustedKeys) -> None:
        """:raise VerificationError: not signed by a key in ``keys`` (``TrustedKeys``)."""
        keys.verify_bytes(f"container {self.ref}", self.key_id, self.signature,
                          canonical_json(self.ref.to_json()), "the reference")  # fmt: skip


def parse(raw: bytes) -> SignedRef:
    """A signed reference from untrusted bytes (its signature is checked by ``verify``)."""
    if len(raw) > MAX_DOCUMENT:
        raise ReferenceError(f"the signed reference is larger than {MAX_DOCUMENT} bytes")
    try:
        data = json.loads(raw)
        container = data["container"]
        archive = container["archive"]
        sig = data["signature"]
        name, tag = check_name(container["name"], container["tag"])
        sha, size = archive["sha256"], archive["size"]
        signature = base64.b64decode(sig["ed25519"], validate=True)
        key = sig["key"]
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise ReferenceError(f"the signed reference is malformed: {exc!r}"[:200]) from None
    if data.get("format") != FORMAT or set(data) != {"format", "container", "signature"}:
        raise ReferenceError(f"the signed reference must be format {FORMAT}, with nothing else")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ReferenceError("container.archive.sha256 must be 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 40:
        raise ReferenceError("container.archive.size must be a positive number of bytes")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{32}", key) or len(signature) != 64:
        raise ReferenceError("signature.key must be a key id and ed25519 64 bytes")
    return SignedRef(ContainerRef(name, tag, sha, size), key, signature)


def sign_archive(archive: Path, name: str, tag: str, key_path: Path) -> Path:
    """Sign ``archive`` as ``name:tag``: writes ``<archive>.signed.json`` next to it."""
    name, tag = check_name(name, tag)
    key = load_private_key(key_path)
    digest, size = sha256_file(archive)
    ref = ContainerRef(name, tag, digest, size)
    signed = SignedRef(ref, key_id(key.public_key()), key.sign(canonical_json(ref.to_json())))
    out = archive.with_name(archive.name + SUFFIX)
    write_atomic(out, signed.to_bytes(), mode=0o644)
    return out
