"""Ed25519 signing: key pairs, signed builds, trusted keys, unknown keys, bad signatures."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest

from hatchery.cli.main import main as cli
from hatchery.images.manifest import SIGNED_NAME, parse_signed
from hatchery.images.signing import (
    BadSignature,
    KeyDirectory,
    SigningError,
    TrustedKeys,
    UnknownKey,
    generate_key,
    load_private_key,
    load_public_key,
    sign,
    sign_build_dir,
)
from tests.support.synthetic_images import make_build


def test_keygen_writes_a_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    pair = generate_key(tmp_path / "keys")
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert b"PRIVATE" not in pair.public.read_bytes()
    assert len(pair.key_id) == 32
    with pytest.raises(SigningError, match="already exists"):
        generate_key(tmp_path / "keys")
    assert generate_key(tmp_path / "keys", force=True).key_id != pair.key_id


def test_a_signed_build_verifies_with_its_public_key(tmp_path: Path) -> None:
    build = make_build(tmp_path, "7", kernel_size=50, initrd_size=60)
    pair = generate_key(tmp_path / "keys")
    path, signed = sign_build_dir(build, pair.private)
    assert path == build / SIGNED_NAME
    assert parse_signed(path.read_bytes()) == signed
    assert signed.key_id == pair.key_id
    TrustedKeys.of([load_public_key(pair.public)]).verify(signed)


def test_unknown_key_and_bad_signature_are_refused(tmp_path: Path) -> None:
    build = make_build(tmp_path, "7", kernel_size=50, initrd_size=60)
    ours, theirs = generate_key(tmp_path / "a"), generate_key(tmp_path / "b")
    _, signed = sign_build_dir(build, theirs.private)
    trusted = TrustedKeys.of([load_public_key(ours.public)])
    with pytest.raises(UnknownKey, match="does not trust"):
        trusted.verify(signed)
    # Signed by another key but claiming to be ours: the signature does not match.
    forged = dataclasses.replace(signed, key_id=ours.key_id)
    with pytest.raises(BadSignature, match="does not match"):
        trusted.verify(forged)
    # Our signature over a manifest changed afterwards.
    mine = sign(signed.manifest, load_private_key(ours.private))
    doc = json.loads(mine.to_bytes())
    doc["manifest"]["build"]["packages"]["systemd"] = "999"
    with pytest.raises(BadSignature):
        trusted.verify(parse_signed(json.dumps(doc).encode()))


def test_key_directory_reads_every_pub_and_ignores_junk(tmp_path: Path) -> None:
    a, b = generate_key(tmp_path / "a"), generate_key(tmp_path / "b")
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / "a.pub").write_bytes(a.public.read_bytes())
    (trusted_dir / "b.pub").write_bytes(b.public.read_bytes())
    (trusted_dir / "junk.pub").write_text("not a key")
    (trusted_dir / "a.key").write_bytes(a.private.read_bytes())
    assert set(KeyDirectory(trusted_dir).trusted().keys) == {a.key_id, b.key_id}
    assert KeyDirectory(tmp_path / "absent").trusted().keys == {}


def test_a_wrong_key_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("nonsense")
    with pytest.raises(SigningError, match="not an unencrypted PEM"):
        load_private_key(bad)
    with pytest.raises(SigningError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")


def test_cli_keygen_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = make_build(tmp_path, "9", kernel_size=50, initrd_size=60)
    keys = tmp_path / "keys"
    assert cli(["image", "keygen", "--out", str(keys)]) == 0
    assert cli(["image", "sign", "--key", str(keys / "image-signing.key"), str(build)]) == 0
    assert "signed hypervisor 9" in capsys.readouterr().out
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ops.pub").write_bytes((keys / "image-signing.pub").read_bytes())
    assert cli(["image", "verify", "--keys", str(trusted), str(build)]) == 0
    (build / "hypervisor.vmlinuz").write_bytes(b"swapped")
    assert cli(["image", "verify", "--keys", str(trusted), str(build)]) == 1
    assert "not the file that was signed" in capsys.readouterr().err
    assert cli(["image", "verify", "--keys", str(tmp_path / "keys-none"), str(build)]) == 1
    assert "does not trust" in capsys.readouterr().err
