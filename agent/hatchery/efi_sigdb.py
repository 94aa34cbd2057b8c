"""EFI signature lists (UEFI 2.10 section 32.4.1) of X.509 certificates: the fleet CA for
firmware HTTPS boot.

OVMF trusts the CA certificates it reads from fw_cfg ``etc/edk2/https/cacerts`` (and real
firmware from its ``TlsCaCertificate`` variable) in this format. Each certificate gets its own
``EFI_SIGNATURE_LIST``, because a list's entries all have one size and DER certificates
differ in length::

    EFI_SIGNATURE_LIST                  EFI_SIGNATURE_DATA (SignatureSize bytes each)
      SignatureType        GUID  16       SignatureOwner  GUID  16
      SignatureListSize    UINT32  4      SignatureData   the DER certificate
      SignatureHeaderSize  UINT32  4 (0)
      SignatureSize        UINT32  4 (16 + DER length)
      header, then the signatures

GUIDs are in UEFI's byte order: the first three fields little-endian (``uuid.bytes_le``).
"""

from __future__ import annotations

import struct
import uuid

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hatchery.errors import HatcheryError

EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
#: SignatureType, SignatureListSize, SignatureHeaderSize, SignatureSize.
LIST_HEADER = struct.Struct("<16sIII")
GUID_SIZE = 16
#: The owner GUID Hatchery writes unless told otherwise: firmware ignores it for trust, it
#: only tells people whose entry a list is.
HATCHERY_OWNER = uuid.UUID("b9faad36-01b0-4577-88e3-d4f6360ce427")


class SigDbError(HatcheryError, ValueError):
    """The input is not a valid signature list, or holds no certificate."""


def cacerts_esl(certs_pem: bytes, owner: uuid.UUID) -> bytes:
    """One signature list per PEM certificate in ``certs_pem``, each owned by ``owner``.

    :raise SigDbError: ``certs_pem`` holds no certificate or one that does not parse.
    """
    try:
        certs = x509.load_pem_x509_certificates(certs_pem)
    except ValueError as exc:
        raise SigDbError(f"no usable PEM certificate: {exc}") from exc
    out = bytearray()
    for cert in certs:
        der = cert.public_bytes(Encoding.DER)
        size = GUID_SIZE + len(der)
        out += LIST_HEADER.pack(EFI_CERT_X509_GUID.bytes_le, LIST_HEADER.size + size, 0, size)
        out += owner.bytes_le + der
    return bytes(out)


def parse_esl(data: bytes) -> list[tuple[uuid.UUID, uuid.UUID, bytes]]:
    """Every signature in a sequence of signature lists: ``(type, owner, data)``.

    The lists' headers (``SignatureHeaderSize`` bytes, unused by X.509 lists) are skipped.

    :raise SigDbError: a list is truncated or its sizes are inconsistent (any bytes at all:
        this is fuzzed).
    """
    found: list[tuple[uuid.UUID, uuid.UUID, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < LIST_HEADER.size:
            raise SigDbError(f"truncated signature list header at offset {offset}")
        kind, list_size, header_size, sig_size = LIST_HEADER.unpack_from(data, offset)
        end = offset + list_size
        body = offset + LIST_HEADER.size + header_size
        if list_size < LIST_HEADER.size or end > len(data):
            raise SigDbError(f"signature list at offset {offset}: size {list_size} out of bounds")
        if body > end:
            raise SigDbError(
                f"signature list at offset {offset}: header of {header_size} bytes overflows it"
            )
        if sig_size < GUID_SIZE or (end - body) % sig_size:
            raise SigDbError(
                f"signature list at offset {offset}: {end - body} bytes of signatures are not "
                f"a whole number of {sig_size}-byte entries"
            )
        signature_type = uuid.UUID(bytes_le=data[offset : offset + GUID_SIZE])
        for at in range(body, end, sig_size):
            owner = uuid.UUID(bytes_le=data[at : at + GUID_SIZE])
            found.append((signature_type, owner, data[at + GUID_SIZE : at + sig_size]))
        offset = end
    return found
