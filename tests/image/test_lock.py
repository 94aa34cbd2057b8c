"""The package lock against a moving archive: drift is a warning by default, a failure with
LOCKED=1 (release pipelines), each differing package named either way.

The lock here is a copy of what was built with one package set back to an older version, as
happens when the archive publishes a security update after the lock was written.
"""

from __future__ import annotations

from pathlib import Path

from hatchery_lab.images import manifest, run_build

OLDER = "0.0~older-1"


def _locks_with_one_older(images: Path, locks: Path) -> tuple[str, str]:
    built = manifest(images, "appliance-vm")["packages"]
    assert isinstance(built, dict)
    package = "zlib1g" if "zlib1g" in built else sorted(built)[0]
    older = {**built, package: OLDER}
    folder = locks / "appliance-vm"
    folder.mkdir(parents=True)
    (folder / "packages.lock").write_text("".join(f"{p} {v}\n" for p, v in sorted(older.items())))
    return package, str(built[package])


def test_drift_warns_by_default_and_fails_when_locked(images: Path, tmp_path: Path) -> None:
    package, version = _locks_with_one_older(images, tmp_path / "locks")
    args = ("appliance-vm", "--locks-dir", str(tmp_path / "locks"))

    default = run_build(*args)
    assert default.returncode == 0, default.stderr[-3000:]
    warning = f"warning: appliance-vm: {package}: locked {OLDER}, built {version}"
    assert warning in default.stderr
    assert default.stderr.count("warning: appliance-vm:") == 1  # only the one that moved

    locked = run_build(*args, env={"LOCKED": "1"})
    assert locked.returncode != 0
    assert f"{package}: locked {OLDER}, built {version}" in locked.stderr
    assert "--locked" in locked.stderr

    # The lock in the repository is untouched by either run.
    assert (tmp_path / "locks" / "appliance-vm" / "packages.lock").read_text().count(OLDER) == 1


def test_lock_matching_the_build_passes_locked(images: Path, tmp_path: Path) -> None:
    built = manifest(images, "appliance-vm")["packages"]
    assert isinstance(built, dict)
    folder = tmp_path / "locks" / "appliance-vm"
    folder.mkdir(parents=True)
    (folder / "packages.lock").write_text("".join(f"{p} {v}\n" for p, v in sorted(built.items())))
    result = run_build("appliance-vm", "--locks-dir", str(tmp_path / "locks"), env={"LOCKED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning:" not in result.stderr
