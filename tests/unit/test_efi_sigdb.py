"""EFI signature lists of CA certificates: byte for byte what efitools (a writer no one here
wrote) makes, read back by its reader, round trips, the CLI, and a fuzzed parser."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatchery import efi_sigdb, pki
from hatchery.cli.main import main
from tests.conftest import FUZZ_EXAMPLES

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
OWNER = uuid.UUID("12345678-9abc-def0-1122-334455667788")


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("cas")
    return [pki.init_ca(base / name, f"Fleet {name}") for name in ("one", "two")]


def der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)


def test_round_trip(two_cas: list[Path]) -> None:
    esl = efi_sigdb.cacerts_esl(b"".join(p.read_bytes() for p in two_cas), OWNER)
    assert efi_sigdb.parse_esl(esl) == [
        (efi_sigdb.EFI_CERT_X509_GUID, OWNER, der(p)) for p in two_cas
    ]
    # The type GUID in UEFI byte order: a5c059a1 little-endian first.
    assert esl[:4] == bytes.fromhex("a1 59 c0 a5")


def test_same_bytes_as_efitools(
    tmp_path: Path, two_cas: list[Path], require_tool: Callable[[str], str]
) -> None:
    writer = require_tool("cert-to-efi-sig-list")
    theirs = b""
    for i, ca in enumerate(two_cas):
        out = tmp_path / f"{i}.esl"
        subprocess.run(
            [writer, "-g", str(OWNER), str(ca), str(out)], check=True, capture_output=True
        )
        theirs += out.read_bytes()
    assert efi_sigdb.cacerts_esl(b"".join(p.read_bytes() for p in two_cas), OWNER) == theirs


def test_efitools_reads_ours(
    tmp_path: Path, two_cas: list[Path], require_tool: Callable[[str], str]
) -> None:
    reader = require_tool("sig-list-to-certs")
    esl = tmp_path / "ca.esl"
    esl.write_bytes(efi_sigdb.cacerts_esl(b"".join(p.read_bytes() for p in two_cas), OWNER))
    result = subprocess.run(
        [reader, str(esl), str(tmp_path / "out")], check=True, capture_output=True, text=True
    )
    assert result.stdout.count(f"Guid {OWNER}") == 2
    assert [(tmp_path / f"out-{i}.der").read_bytes() for i in range(2)] == [der(p) for p in two_cas]


def test_cli_writes_the_ca_dir_cert(
    tmp_path: Path, two_cas: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cacerts.esl"
    assert main(["ca", "cacerts-esl", "--dir", str(two_cas[0].parent), "--out", str(out)]) == 0
    assert efi_sigdb.parse_esl(out.read_bytes()) == [
        (efi_sigdb.EFI_CERT_X509_GUID, efi_sigdb.HATCHERY_OWNER, der(two_cas[0]))
    ]
    assert "etc/edk2/https/cacerts" in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o644


def test_cli_refuses_missing_and_non_certificates(
    tmp_path: Path, two_cas: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.esl"
    assert main(["ca", "cacerts-esl", "--ca", str(tmp_path / "nope.pem"), "--out", str(out)]) == 1
    assert "cannot read" in capsys.readouterr().err
    key = two_cas[0].parent / "ca.key"
    assert key.exists()
    assert main(["ca", "cacerts-esl", "--ca", str(key), "--out", str(out)]) == 1
    assert "no usable PEM certificate" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_no_certificate() -> None:
    with pytest.raises(efi_sigdb.SigDbError):
        efi_sigdb.cacerts_esl(b"", OWNER)
    with pytest.raises(efi_sigdb.SigDbError):
        efi_sigdb.cacerts_esl(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", OWNER
        )


def _list(sig_type: bytes, list_size: int, header: int, sig_size: int, rest: bytes) -> bytes:
    return efi_sigdb.LIST_HEADER.pack(sig_type, list_size, header, sig_size) + rest


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(27), "truncated"),
        (_list(bytes(16), 27, 0, 16, b""), "out of bounds"),
        (_list(bytes(16), 60, 0, 16, bytes(16)), "out of bounds"),
        (_list(bytes(16), 44, 17, 16, bytes(16)), "overflows"),
        (_list(bytes(16), 44, 0, 0, bytes(16)), "whole number"),
        (_list(bytes(16), 44, 0, 15, bytes(16)), "whole number"),
        (_list(bytes(16), 50, 0, 16, bytes(22)), "whole number"),
        (_list(bytes(16), 44, 0, 16, bytes(16)) + bytes(3), "truncated"),
    ],
)
def test_parse_refuses(data: bytes, message: str) -> None:
    with pytest.raises(efi_sigdb.SigDbError, match=message):
        efi_sigdb.parse_esl(data)
    assert issubclass(efi_sigdb.SigDbError, ValueError)


def test_parse_skips_header_and_reads_several_entries() -> None:
    data = _list(
        bytes(16),
        28 + 4 + 2 * 20,
        4,
        20,
        b"HDR!" + OWNER.bytes_le + b"aaaa" + OWNER.bytes_le + b"bbbb",
    )
    assert efi_sigdb.parse_esl(data) == [
        (uuid.UUID(int=0), OWNER, b"aaaa"),
        (uuid.UUID(int=0), OWNER, b"bbbb"),
    ]
    assert efi_sigdb.parse_esl(b"") == []


@FUZZ
@given(st.binary(max_size=512))
def test_parse_random_bytes(data: bytes) -> None:
    try:
        efi_sigdb.parse_esl(data)
    except efi_sigdb.SigDbError:
        pass


@FUZZ
@given(st.data())
def test_parse_mutated_lists(data: st.DataObject) -> None:
    """Valid lists with a few bytes changed or cut: parsed or refused with SigDbError only."""
    esl = bytearray(_list(bytes(16), 28 + 40, 0, 20, bytes(40)) * 2)
    for _ in range(data.draw(st.integers(1, 4))):
        esl[data.draw(st.integers(0, len(esl) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(esl)))
    try:
        for _, _, payload in efi_sigdb.parse_esl(bytes(esl[:cut])):
            assert len(payload) <= cut
    except efi_sigdb.SigDbError:
        pass
