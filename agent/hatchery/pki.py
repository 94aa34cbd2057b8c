"""A small certificate authority for the agent API's mutual TLS.

Identity comes from the client certificate: the common name is who, each organisational
unit is one group (``OU=admin``, ``OU=ops``). Keys are ECDSA P-256 (every TLS 1.2 and 1.3
stack speaks it, and its handshakes are the cheapest), except in a CA made with ``rsa_keys``:
the boot CA, whose only job is the boot HTTPS service's certificate, pinned in machines'
firmware — Debian's OVMF (edk2 2022.11) has no elliptic-curve TLS, and an ECDSA chain fails
its handshake before any request (measured: docs/netboot.md). Private keys are written 0600
(``state.write_private``: created with ``O_EXCL|O_NOFOLLOW``, never over an existing file
unless forced) and never logged.

Revocation: ``revoke`` adds a serial to ``revoked.json`` beside the CA (the list the CA
keeps; written atomically) and ``issue_crl`` signs ``crl.pem`` from it: an X.509 CRL with a
CRL number one higher than the last and a ``nextUpdate``. Agents load the CRL into their TLS
contexts (``hatchery.revocation``) and refuse a revoked certificate at the handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hatchery.errors import HatcheryError
from hatchery.state import StateError, write_atomic, write_private

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
#: Default lifetime of a leaf certificate: short enough that a lost key stops working on its
#: own within a quarter, long enough to renew by hand (``hatchery ca issue --force``).
LEAF_DAYS = 90
CRL_FILE = "crl.pem"
REVOKED_FILE = "revoked.json"
#: Default time until a CRL's ``nextUpdate``: re-issue (``hatchery ca crl``) well before.
CRL_DAYS = 30
#: How far ``notBefore``/``lastUpdate`` are set back, for peers whose clocks run behind.
BACKDATE = dt.timedelta(minutes=5)
REASONS = {
    flag.name: flag for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
}


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


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_private(path, data, force=force)
    except StateError as exc:
        raise PkiError(exc.message, hint=exc.hint) from exc


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, data, 0o644)
    except StateError as exc:
        raise PkiError(exc.message, hint=exc.hint) from exc


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
RSA_BITS = 3072  # NIST's size for use past 2030; edk2's TLS verifies it


def _new_key(like_rsa: bool) -> PrivateKey:
    if like_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(
    directory: Path, name: str = "Hatchery CA", *, force: bool = False, rsa_keys: bool = False
) -> Path:
    """Create a CA in ``directory``; refuse to overwrite one unless ``force``. ``rsa_keys``: an
    RSA CA, whose certificates are RSA too (the boot CA, for firmware without ECDSA)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if key_path.exists() and not force:
        raise PkiError(f"a CA already exists in {directory}", hint="use --force to replace it")
    key = _new_key(rsa_keys)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
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
    _write_private(key_path, _key_pem(key), force=force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {directory}", hint="create one with: hatchery ca init") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"the CA key in {directory} is neither an ECDSA nor an RSA key")
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
    force: bool = False,
) -> IssuedPair:
    """Issue a certificate for ``name``: a server one if ``server_names``, a client one if
    ``client`` (by default: when there are no ``server_names``).

    The extended key usage says which: ``serverAuth`` for a server, ``clientAuth`` for a
    client, and the API takes only a ``clientAuth`` certificate as a caller's identity, so a
    certificate issued to serve (a node's, a test server's) is no client credential unless
    it was issued as both. An agent's is both: it serves the API and is the node's identity
    towards its peers when it fetches images (``client=True``, group ``node``).

    The key is of the CA's kind: ECDSA P-256, or RSA from an RSA CA (the boot CA).

    Writes ``out_dir/<name>.pem`` (the certificate) and ``out_dir/<name>.key`` (0600); an
    existing key is replaced only with ``force`` (renewal).
    """
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"bad certificate name {name!r}")
    for group in groups:
        if not group or any(c in group for c in ",=*:"):
            raise PkiError(f"bad group name {group!r}")
    if not 1 <= days <= 3650:
        raise PkiError(f"certificate lifetime must be 1..3650 days, not {days}")
    ca_cert, ca_key = _load_ca(ca_dir)
    key = _new_key(isinstance(ca_key, rsa.RSAPrivateKey))
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
        # RSA key exchange (TLS 1.2 without ECDHE, which older firmware may pick) encrypts
        # to the server's key: its certificate must allow that
        digital_signature=True, content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
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
        .not_valid_before(now - BACKDATE)
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
    _write_private(pair.key, _key_pem(key), force=force)
    _write_public(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
    return pair


@dataclass(frozen=True, slots=True)
class Revoked:
    """One entry of the CA's revoked list."""

    serial: int
    reason: str
    date: dt.datetime
    name: str = ""  # the certificate's CN when revoked by file, for people reading the list

    def to_json(self) -> dict[str, str]:
        return {"serial": f"{self.serial:x}", "reason": self.reason,
                "date": self.date.isoformat(), "name": self.name}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RevokedList:
    """``revoked.json``: the serials the CA has revoked, the last CRL number and the last
    ``lastUpdate`` it used (each CRL's is later than the one before: see ``issue_crl``)."""

    crl_number: int = 0
    entries: tuple[Revoked, ...] = ()
    last_update: dt.datetime | None = None

    def serials(self) -> frozenset[int]:
        return frozenset(e.serial for e in self.entries)


def read_revoked(ca_dir: Path) -> RevokedList:
    """The CA's revoked list; empty when there is none yet. A file that does not parse is an
    error, never an empty list: a CRL issued from it would silently un-revoke everything."""
    path = ca_dir / REVOKED_FILE
    try:
        data = json.loads(path.read_bytes())
        entries = tuple(
            Revoked(
                int(e["serial"], 16),
                str(e["reason"]),
                dt.datetime.fromisoformat(e["date"]),
                str(e.get("name", "")),
            )  # fmt: skip
            for e in data["revoked"]
        )
        last = data.get("last_update")
        last_update = dt.datetime.fromisoformat(last) if last else None
        return RevokedList(int(data["crl_number"]), entries, last_update)
    except FileNotFoundError:
        return RevokedList()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = "restore it from a backup; no CRL is issued from it"
        raise PkiError(f"{path} is unreadable or corrupt: {exc}", hint=hint) from exc


def _write_revoked(ca_dir: Path, revoked: RevokedList) -> None:
    doc = {
        "crl_number": revoked.crl_number,
        "last_update": revoked.last_update.isoformat() if revoked.last_update else None,
        "revoked": [e.to_json() for e in revoked.entries],
    }
    _write_public(ca_dir / REVOKED_FILE, (json.dumps(doc, indent=2) + "\n").encode())


def parse_serial(text: str) -> int:
    """A serial as ``openssl x509 -serial`` prints it: hex, optionally ``0x`` or colons."""
    digits = text.strip().lower().removeprefix("serial=").removeprefix("0x").replace(":", "")
    try:
        serial = int(digits, 16)
    except ValueError:
        raise PkiError(f"{text!r} is neither a certificate file nor a hex serial") from None
    if serial <= 0:
        raise PkiError(f"{text!r}: a serial is positive")
    return serial


def revoke(ca_dir: Path, cert_or_serial: str, reason: str = "unspecified",
           *, days: int = CRL_DAYS) -> tuple[Revoked, Path]:  # fmt: skip
    """Add a certificate (a PEM file it signed, or its hex serial) to the CA's revoked list and
    issue a new CRL; return the entry and the CRL's path. Revoking twice keeps the first entry
    and still issues a CRL (harmless, and what an operator retrying expects)."""
    if reason not in REASONS:
        raise PkiError(f"unknown revocation reason {reason!r}",
                       hint="one of: " + ", ".join(sorted(REASONS)))  # fmt: skip
    ca_cert, _ = _load_ca(ca_dir)
    name, path = "", Path(cert_or_serial)
    if path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as exc:
            raise PkiError(f"{path} is not a PEM certificate: {exc}") from exc
        if cert.issuer != ca_cert.subject:
            raise PkiError(f"{path} was not issued by the CA in {ca_dir}")
        serial = cert.serial_number
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(cns[0].value) if cns else ""
    else:
        serial = parse_serial(cert_or_serial)
    revoked = read_revoked(ca_dir)
    entry = next((e for e in revoked.entries if e.serial == serial), None)
    if entry is None:
        entry = Revoked(serial, reason, dt.datetime.now(dt.UTC).replace(microsecond=0), name)
        revoked = RevokedList(revoked.crl_number, (*revoked.entries, entry), revoked.last_update)
        _write_revoked(ca_dir, revoked)
    return entry, issue_crl(ca_dir, days=days)


def issue_crl(ca_dir: Path, *, days: int = CRL_DAYS) -> Path:
    """Sign ``crl.pem`` in ``ca_dir`` from the revoked list, with the next CRL number and a
    ``nextUpdate`` ``days`` ahead; return its path. The number is saved before the CRL is
    written, so two CRLs never share one.

    Each CRL's ``lastUpdate`` is at least a second after the previous one's, even when two
    are issued within a second: OpenSSL, holding several CRLs of one CA, uses the one with
    the latest ``lastUpdate`` (the first of equals), and agents refuse a CRL that is not
    later than theirs (``revocation``)."""
    if not 1 <= days <= 366:
        raise PkiError(f"CRL lifetime must be 1..366 days, not {days}")
    ca_cert, ca_key = _load_ca(ca_dir)
    revoked = read_revoked(ca_dir)
    now = dt.datetime.now(dt.UTC)
    last = (now - BACKDATE).replace(microsecond=0)
    if revoked.last_update is not None and last <= revoked.last_update:
        last = revoked.last_update + dt.timedelta(seconds=1)
    revoked = RevokedList(revoked.crl_number + 1, revoked.entries, last)
    _write_revoked(ca_dir, revoked)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(revoked.crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for e in revoked.entries:
        item = x509.RevokedCertificateBuilder().serial_number(e.serial).revocation_date(e.date)
        if e.reason != "unspecified":
            item = item.add_extension(x509.CRLReason(REASONS[e.reason]), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    path = ca_dir / CRL_FILE
    _write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from PEM or DER bytes; ``PkiError`` if it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"not a CRL (PEM or DER): {exc}") from exc


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def crl_signed_by(crl: x509.CertificateRevocationList, ca_pem: bytes) -> bool:
    """Whether one of the CA certificates in ``ca_pem`` issued and signed ``crl``."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return False
    for ca in cas:
        key = ca.public_key()
        if ca.subject == crl.issuer and isinstance(
            key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey
        ):
            if crl.is_signature_valid(key):
                return True
    return False


def cert_serial(der: bytes) -> int | None:
    try:
        return x509.load_der_x509_certificate(der).serial_number
    except ValueError:
        return None


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
