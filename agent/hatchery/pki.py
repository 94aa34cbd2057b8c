"""A small certificate authority for the agent API's mutual TLS.

Identity comes from the client certificate: the common name is who, each organisational
unit is one group (``OU=admin``, ``OU=ops``). Keys are ECDSA P-256 (every TLS 1.2 and 1.3
stack speaks it); private keys are written 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hatchery.errors import HatcheryError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 397


class PkiError(HatcheryError):
    """The CA or a certificate is missing or unusable."""


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    groups: frozenset[str]


@dataclass(frozen=True, slots=True)
class IssuedPair:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(directory: Path, name: str = "Hatchery CA", *, force: bool = False) -> Path:
    """Create a CA in ``directory``; refuse to overwrite one unless ``force``."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if key_path.exists() and not force:
        raise PkiError(f"a CA already exists in {directory}", hint="use --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {directory}", hint="create one with: hatchery ca init") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the CA key in {directory} is not an ECDSA key")
    return cert, key


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def issue(
    ca_dir: Path,
    name: str,
    out_dir: Path,
    *,
    groups: tuple[str, ...] = (),
    server_names: tuple[str, ...] = (),
    client: bool | None = None,
    days: int = LEAF_DAYS,
) -> IssuedPair:
    """Issue a certificate for ``name``: a server one if ``server_names``, a client one if
    ``client`` (by default: when there are no ``server_names``).

    The extended key usage says which: ``serverAuth`` for a server, ``clientAuth`` for a
    client, and the API takes only a ``clientAuth`` certificate as a caller's identity, so a
    certificate issued to serve (a node's, a test server's) is no client credential unless
    it was issued as both. An agent's is both: it serves the API and is the node's identity
    towards its peers when it fetches images (``client=True``, group ``node``).

    Writes ``out_dir/<name>.pem`` (the certificate) and ``out_dir/<name>.key`` (0600).
    """
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"bad certificate name {name!r}")
    for group in groups:
        if not group or any(c in group for c in ",=*:"):
            raise PkiError(f"bad group name {group!r}")
    if not 1 <= days <= 3650:
        raise PkiError(f"certificate lifetime must be 1..3650 days, not {days}")
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, g) for g in groups]
    if client is None:
        client = not server_names
    if not client and not server_names:
        raise PkiError(f"certificate {name}: neither a client nor a server certificate")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if server_names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    key_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in server_names]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = IssuedPair(out_dir / f"{name}.pem", out_dir / f"{name}.key")
    _write_private(pair.key, _key_pem(key))
    _write_public(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
    return pair


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server that requires a client certificate signed by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(
            f"cannot load TLS files ({ca}, {cert}, {key}): {exc}",
            hint="issue them with: hatchery ca issue --server ...",
        ) from exc
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ client that presents ``cert`` and trusts only agents signed by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(f"cannot load TLS files ({ca}, {cert}, {key}): {exc}") from exc
    return ctx


def is_client_cert(der: bytes) -> bool:
    """Whether the DER certificate ``der`` may act as a client: its extended key usage lists
    ``clientAuth``. One without the extension is refused too (every certificate ``issue``
    makes has one), so a server-only certificate is never a caller's identity."""
    try:
        cert = x509.load_der_x509_certificate(der)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


def identity_from_peercert(
    peercert: dict[str, object] | None, der: bytes | None = None
) -> Identity | None:
    """Who the verified peer is, from ``SSLSocket.getpeercert()``; None without a certificate,
    and None when ``der`` (the same certificate, ``getpeercert(binary_form=True)``) is given
    and is not a client certificate (see ``is_client_cert``)."""
    if not peercert:
        return None
    if der is not None and not is_client_cert(der):
        return None
    name = ""
    groups: set[str] = set()
    subject = peercert.get("subject", ())
    if not isinstance(subject, tuple):
        return None
    for rdn in subject:
        for attr, value in rdn:
            if attr == "commonName":
                name = str(value)
            elif attr == "organizationalUnitName":
                groups.add(str(value))
    return Identity(name, frozenset(groups)) if name else None
