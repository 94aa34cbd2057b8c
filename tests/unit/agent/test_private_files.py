"""Private keys: 0600 from creation, never written through a symlink, never over an existing
file unless forced (issue 14). On main ``pki`` opened ``<key>.tmp`` with ``O_TRUNC`` and
followed a link planted there, and replaced an existing key without asking."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery import pki, state
from hatchery.images.signing import SigningError, generate_key


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_symlink_planted_at_the_key_path_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    pki.init_ca(tmp_path / "ca")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "alice.key").symlink_to(victim)
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue(tmp_path / "ca", "alice", out, groups=("admin",))
    assert victim.read_text() == "precious\n"
    assert (out / "alice.key").is_symlink()


def test_a_dangling_symlink_is_refused_too(tmp_path: Path) -> None:
    """A link to a file that does not exist yet: following it would create the attacker's
    file with the key in it."""
    target = tmp_path / "elsewhere" / "stolen.key"
    target.parent.mkdir()
    (tmp_path / "k.key").symlink_to(target)
    with pytest.raises(state.StateError, match="already exists"):
        state.write_private(tmp_path / "k.key", b"secret")
    assert not target.exists()


def test_forced_write_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "k.key").symlink_to(victim)
    state.write_private(tmp_path / "k.key", b"secret", force=True)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "k.key").is_symlink()
    assert (tmp_path / "k.key").read_bytes() == b"secret" and _mode(tmp_path / "k.key") == 0o600


def test_existing_key_is_kept_unless_forced(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    first = pki.issue(tmp_path / "ca", "bob", tmp_path / "out")
    key = first.key.read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue(tmp_path / "ca", "bob", tmp_path / "out")
    assert first.key.read_bytes() == key
    renewed = pki.issue(tmp_path / "ca", "bob", tmp_path / "out", force=True)
    assert renewed.key.read_bytes() != key and _mode(renewed.key) == 0o600


def test_a_planted_temporary_is_never_written_through(tmp_path: Path) -> None:
    """Temporaries have random names and are opened with O_EXCL|O_NOFOLLOW."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in (".k.key.tmp", "k.key.tmp", f".k.key.tmp-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    state.write_private(tmp_path / "k.key", b"secret")
    state.write_atomic(tmp_path / "k.pem", b"public", 0o644)
    assert victim.read_text() == "precious\n"


@pytest.mark.usefixtures("umask")
def test_mode_is_0600_with_a_permissive_umask(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca")
    pair = pki.issue(tmp_path / "ca", "carol", tmp_path / "out", groups=("admin",))
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600 and _mode(pair.key) == 0o600
    assert _mode(ca) == 0o644 and _mode(pair.cert) == 0o644
    signing = generate_key(tmp_path / "keys")
    assert _mode(signing.private) == 0o600


def test_mode_is_0600_with_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        state.write_private(tmp_path / "k.key", b"secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.key") == 0o600


def test_signing_key_refuses_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "image.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SigningError):
        generate_key(tmp_path / "keys", "image")
    assert not (tmp_path / "nowhere").exists()
