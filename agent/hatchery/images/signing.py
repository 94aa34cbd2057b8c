"""Ed25519 keys for image manifests: make a key pair, sign a build, verify against trusted keys.

A key is known by its id: the first 16 bytes of the sha256 of its raw 32-byte public key, in
hex. Private keys are PEM (PKCS#8), written 0600 and never logged; public keys are PEM
(SubjectPublicKeyInfo) files named ``*.pub``. An agent trusts the public keys in one
directory (``/etc/hatchery/image-keys`` by default): a manifest signed by any other key, or
whose signature does not verify, is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hatchery.errors import HatcheryError
from hatchery.images.manifest import SIGNED_NAME, Manifest, SignedManifest, from_build_dir
from hatchery.state import write_atomic, write_private

log = logging.getLogger(__name__)
DEFAULT_KEYS_DIR = Path("/etc/hatchery/image-keys")
DEFAULT_KEY_NAME = "image-signing"


class SigningError(HatcheryError):
    """A key cannot be made, read or used."""


class VerificationError(HatcheryError):
    """A signed manifest is not trusted."""


class UnknownKey(VerificationError):
    """The manifest is signed by a key this node does not trust."""


class BadSignature(VerificationError):
    """The signature does not match the manifest (tampered, or signed by another key)."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_key(out_dir: Path, name: str = DEFAULT_KEY_NAME, *, force: bool = False) -> KeyPair:
    """Write ``out_dir/<name>.key`` (0600) and ``out_dir/<name>.pub``; refuse to overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise SigningError(f"bad key name {name!r}")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private_path.exists() and not force:
        raise SigningError(f"{private_path} already exists", hint="use --force to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private(private_path, pem, force=force)
        write_atomic(public_path, public_pem(key.public_key()), mode=0o644)
    except (OSError, HatcheryError) as exc:
        raise SigningError(f"cannot write the key pair in {out_dir}: {exc}") from exc
    return KeyPair(private_path, public_path, key_id(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"cannot read the signing key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key", hint="make one: hatchery image keygen")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningError(f"cannot read the public key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return key


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    return SignedManifest(manifest, key_id(key.public_key()), key.sign(manifest.canonical()))


def sign_build_dir(build_dir: Path, key_path: Path) -> tuple[Path, SignedManifest]:
    """Sign the image in ``build_dir`` (made by ``make images``): writes manifest.signed.json."""
    key = load_private_key(key_path)
    signed = sign(from_build_dir(build_dir), key)
    target = build_dir / SIGNED_NAME
    write_atomic(target, signed.to_bytes(), mode=0o644)
    return target, signed


class KeySource(Protocol):
    """Where an agent gets the keys it trusts (read again at each verification)."""

    def trusted(self) -> TrustedKeys: ...


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> TrustedKeys:
        return cls({key_id(k): k for k in keys})

    def trusted(self) -> TrustedKeys:
        return self

    def verify(self, signed: SignedManifest) -> None:
        """Return if ``signed`` is signed by a trusted key; raise ``VerificationError`` if not."""
        what = f"image {signed.manifest.image} {signed.manifest.version}"
        self.verify_bytes(what, signed.key_id, signed.signature, signed.manifest.canonical(),
                          "the manifest")  # fmt: skip

    def verify_bytes(self, what: str, key: str, signature: bytes, payload: bytes,
                     signed_part: str) -> None:  # fmt: skip
        """The one check of an Ed25519 signature by a trusted key, for anything signed with
        the image keys (manifests, container references). ``what`` names it in errors.

        :raise UnknownKey: ``key`` is not trusted here.
        :raise BadSignature: the signature does not match ``payload``.
        """
        public = self.keys.get(key)
        if public is None:
            raise UnknownKey(
                f"{what} is signed by key {key}, which this node does not trust",
                hint="install its public key (*.pub) in the trusted image-keys directory",
            )
        try:
            public.verify(signature, payload)
        except InvalidSignature:
            raise BadSignature(
                f"{what}: the signature by key {key} does not match {signed_part} "
                "(tampered, or signed with another key)"
            ) from None


@dataclass(frozen=True, slots=True)
class KeyDirectory:
    """Trusted keys: every ``*.pub`` in a directory, read at each use (no restart to add one)."""

    path: Path = DEFAULT_KEYS_DIR

    def trusted(self) -> TrustedKeys:
        keys: dict[str, Ed25519PublicKey] = {}
        try:
            files = sorted(self.path.glob("*.pub"))
        except OSError as exc:
            log.warning("cannot read trusted image keys in %s: %s", self.path, exc)
            files = []
        for file in files:
            try:
                public = load_public_key(file)
            except SigningError as exc:
                log.warning("ignoring trusted image key: %s", exc.message)
                continue
            keys[key_id(public)] = public
        return TrustedKeys(keys)
