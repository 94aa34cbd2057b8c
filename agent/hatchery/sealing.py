"""Sealed seeds: a seed crosses the boot network encrypted to a key the newborn just made.

A seed holds a node's private key. It travels over plain HTTP on the boot segment (firmware
and iPXE speak no TLS we could pin), so it is sealed to the receiving machine instead:

1. the newborn makes an X25519 key pair in memory (``SeedKey``) and sends the public half
   with its single-use birth token (``POST /seed/TOKEN``, 32 raw bytes);
2. the peer seals the seed to it (``seal``): a fresh ephemeral X25519 key of its own, the
   shared secret through HKDF-SHA256 (salt: both public keys; info: ``INFO``) into a
   ChaCha20-Poly1305 key used once (so a fixed nonce is safe), the format's magic as
   associated data;
3. the newborn opens it (``SeedKey.open``); a changed byte anywhere fails the tag.

A passive listener on the boot segment (a mirror port, a compromised switch) sees the token,
two public keys and ciphertext: never the key inside. An active attacker who can answer in
the peer's place could hand the newborn a seed of their own making (the boot segment is
trusted not to do that, as it is trusted with the kernel itself; see docs/security.md), but
cannot read the real one: the token is burnt by the first request from the leased address.

Wire format: ``MAGIC`` (8 bytes) || ephemeral public key (32) || ciphertext with its tag.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hatchery.errors import HatcheryError

MAGIC = b"HSEALv1\n"
INFO = b"hatchery sealed seed v1"
KEY_SIZE = 32
NONCE = bytes(12)  # every key seals exactly one message
OVERHEAD = len(MAGIC) + KEY_SIZE + 16  # what sealing adds to the plaintext


class SealError(HatcheryError):
    """A sealed seed or a public key that cannot be used."""


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead(shared: bytes, sender: bytes, recipient: bytes) -> ChaCha20Poly1305:
    key = HKDF(hashes.SHA256(), 32, salt=sender + recipient, info=INFO).derive(shared)
    return ChaCha20Poly1305(key)


def public_key(raw: bytes) -> X25519PublicKey:
    """A recipient's public key from its 32 raw bytes (a low-order point is refused when
    sealing, where the exchange sees it).

    :raise SealError: not 32 bytes.
    """
    if len(raw) != KEY_SIZE:
        raise SealError(f"a public key is {KEY_SIZE} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def seal(plain: bytes, recipient: X25519PublicKey) -> bytes:
    """``plain`` encrypted to ``recipient``: only its private key opens it.

    :raise SealError: ``recipient`` is a low-order point.
    """
    ephemeral = X25519PrivateKey.generate()
    sender = _raw(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError as exc:  # the all-zero shared secret of a low-order point
        raise SealError(f"unusable public key: {exc}") from exc
    sealed = _aead(shared, sender, _raw(recipient)).encrypt(NONCE, plain, MAGIC)
    return MAGIC + sender + sealed


class SeedKey:
    """The newborn's key pair for one seed: made in memory, never written anywhere."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = _raw(self._private.public_key())

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of ``sealed``.

        :raise SealError: not a sealed seed, not sealed to this key, or changed on the way.
        """
        head = len(MAGIC) + KEY_SIZE
        if len(sealed) < OVERHEAD or not sealed.startswith(MAGIC):
            raise SealError("not a sealed seed (no header): was it served by an older agent?")
        sender = sealed[len(MAGIC) : head]
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(sender))
            aead = _aead(shared, sender, self.public)
            return aead.decrypt(NONCE, sealed[head:], MAGIC)
        except (ValueError, InvalidTag) as exc:
            raise SealError("the sealed seed does not open with this machine's key") from exc
