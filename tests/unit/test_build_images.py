"""The image build driver's decisions (tools/lab/hatchery_lab/imagebuild.py), without running mkosi.

What these guard: the mkosi command line names the generated package-manager tree even when
overlays are given (they once replaced it); the package lock warns by default, fails only
when asked to, and is rewritten only when asked to; package metadata is synced again once
it is older than the bound, and an incremental tree made from other metadata is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hatchery_lab import imagebuild as build

HOUR = 3600.0


def _opts(tmp_path: Path, **changes: object) -> build.BuildOptions:
    fields: dict[str, object] = {
        "out": tmp_path / "out",
        "version": "v9",
        "force": False,
        "refresh": False,
        "lock_mode": build.LockMode.REPORT,
        "incremental": True,
    }
    fields.update(changes)
    return build.BuildOptions(**fields)  # type: ignore[arg-type]


def _paths(tmp_path: Path, wheels: Path | None = None) -> build.MkosiPaths:
    return build.MkosiPaths(
        package_manager_tree=tmp_path / "pkgmngr",
        packages_cache=tmp_path / "packages",
        incremental=tmp_path / "incremental",
        staging=tmp_path / "staging",
        wheels=wheels,
    )


def _option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == option]


def test_extra_tree_build_keeps_the_generated_package_manager_tree(tmp_path: Path) -> None:
    overlays = (tmp_path / "site", tmp_path / "demo-v2")
    opts = _opts(tmp_path, extra_trees=overlays)
    argv = build.mkosi_argv("hypervisor", opts, _paths(tmp_path, tmp_path / "wheels"), "metadata")
    assert _option_values(argv, "--package-manager-tree") == [f"{tmp_path / 'pkgmngr'}:/"]
    assert _option_values(argv, "--extra-tree") == [str(p) for p in overlays]
    assert _option_values(argv, "--build-sources") == [f"{tmp_path / 'wheels'}:wheels"]
    assert _option_values(argv, "--image-version") == ["v9"]
    assert argv[-1] == "build"


def test_appliance_build_takes_no_overlay(tmp_path: Path) -> None:
    opts = _opts(tmp_path, extra_trees=(tmp_path / "site",))
    argv = build.mkosi_argv("appliance-vm", opts, _paths(tmp_path), "never")
    assert "--extra-tree" not in argv and "--build-sources" not in argv
    assert _option_values(argv, "--cache-only") == ["never"]


# --- the lock ----------------------------------------------------------------------------------

BUILT = {"libc6": "2.36-9+deb12u13", "zlib1g": "1:1.2.13.dfsg-1+deb12u1"}


def _lock(tmp_path: Path, packages: dict[str, str]) -> Path:
    lock = tmp_path / "appliance-vm" / "packages.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(build.lock_text("appliance-vm", packages))
    return lock


def test_drift_warns_one_line_per_package_and_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = _lock(tmp_path, {**BUILT, "zlib1g": "1:1.2.13.dfsg-1", "gone": "1.0"})
    before = lock.read_text()
    note = build.reconcile_lock("appliance-vm", BUILT, build.LockMode.REPORT, lock)
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"warning: appliance-vm: gone: locked 1.0, built - ({lock})",
        f"warning: appliance-vm: zlib1g: locked 1:1.2.13.dfsg-1, built 1:1.2.13.dfsg-1+deb12u1 "
        f"({lock})",
    ]
    assert note.startswith("2 packages differ")
    assert lock.read_text() == before  # reported, never rewritten without UPDATE_LOCK


def test_locked_mode_fails_naming_each_package(tmp_path: Path) -> None:
    lock = _lock(tmp_path, {**BUILT, "zlib1g": "1:1.2.13.dfsg-1"})
    with pytest.raises(build.BuildError) as caught:
        build.reconcile_lock("appliance-vm", BUILT, build.LockMode.LOCKED, lock)
    message = str(caught.value)
    assert "zlib1g: locked 1:1.2.13.dfsg-1, built 1:1.2.13.dfsg-1+deb12u1" in message
    assert "libc6" not in message


def test_locked_mode_passes_when_nothing_drifted(tmp_path: Path) -> None:
    lock = _lock(tmp_path, BUILT)
    assert build.reconcile_lock("appliance-vm", BUILT, build.LockMode.LOCKED, lock).startswith(
        "packages match"
    )


def test_locked_mode_without_a_lock_fails(tmp_path: Path) -> None:
    missing = tmp_path / "packages.lock"
    with pytest.raises(build.BuildError, match="no .*packages.lock"):
        build.reconcile_lock("appliance-vm", BUILT, build.LockMode.LOCKED, missing)


def test_update_rewrites_and_a_missing_lock_is_written(tmp_path: Path) -> None:
    lock = _lock(tmp_path, {"zlib1g": "old"})
    build.reconcile_lock("appliance-vm", BUILT, build.LockMode.UPDATE, lock)
    assert build.read_lock(lock) == BUILT
    fresh = tmp_path / "hypervisor" / "packages.lock"
    build.reconcile_lock("hypervisor", BUILT, build.LockMode.REPORT, fresh)
    assert build.read_lock(fresh) == BUILT


def test_a_malformed_lock_line_is_reported_with_its_place(tmp_path: Path) -> None:
    lock = tmp_path / "packages.lock"
    lock.write_text("# comment\nlibc6 2.36 extra\n")
    with pytest.raises(build.BuildError, match=r"packages.lock:2: expected 'package version'"):
        build.read_lock(lock)


# --- package metadata freshness ----------------------------------------------------------------


def _synced(cache: Path, hours_ago: float, now: float) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / ".hatchery-synced"
    stamp.write_text("synced-100\n")
    os.utime(stamp, (now - hours_ago * HOUR, now - hours_ago * HOUR))
    (cache / ".hatchery-sources").write_text(build.PackageMetadata(cache).sources_digest + "\n")


def test_no_metadata_yet_syncs(tmp_path: Path) -> None:
    plan = build.PackageMetadata(tmp_path / "packages").plan(refresh=False, now=1000.0)
    assert plan.sync and plan.cache_only == "never" and plan.generation == "synced-1000"


def test_recent_metadata_is_reused_and_old_metadata_synced(tmp_path: Path) -> None:
    now = 10 * 24 * HOUR
    cache = tmp_path / "packages"
    meta = build.PackageMetadata(cache, max_age_hours=24)
    _synced(cache, 3, now)
    fresh = meta.plan(refresh=False, now=now)
    assert not fresh.sync and fresh.cache_only == "metadata" and fresh.generation == "synced-100"
    assert "3.0 h ago" in fresh.reason
    assert meta.plan(refresh=True, now=now).sync
    _synced(cache, 25, now)
    stale = meta.plan(refresh=False, now=now)
    assert stale.sync and "25 h ago, more than 24 h" in stale.reason


def test_never_refresh_keeps_old_metadata(tmp_path: Path) -> None:
    now = 400 * 24 * HOUR
    cache = tmp_path / "packages"
    _synced(cache, 300 * 24, now)
    assert not build.PackageMetadata(cache, float("inf")).plan(refresh=False, now=now).sync


def test_incremental_tree_from_other_metadata_is_dropped(tmp_path: Path) -> None:
    cache, incremental = tmp_path / "packages", tmp_path / "incremental"
    meta = build.PackageMetadata(cache)
    now = 5 * 24 * HOUR
    first = meta.plan(refresh=False, now=now)  # no metadata: sync
    assert not meta.prepare_incremental(incremental, first)
    (incremental / "tree").write_text("packages from the first sync")
    meta.record(incremental, first)
    again = meta.plan(refresh=False, now=now + HOUR)
    assert not again.sync and again.generation == first.generation
    assert meta.prepare_incremental(incremental, again)  # same metadata: kept
    assert (incremental / "tree").exists()
    resync = meta.plan(refresh=True, now=now + 2 * HOUR)
    assert not meta.prepare_incremental(incremental, resync)  # new metadata: dropped
    assert list(incremental.iterdir()) == []


def test_other_apt_sources_mean_other_metadata(tmp_path: Path) -> None:
    now = 10 * 24 * HOUR
    cache = tmp_path / "packages"
    _synced(cache, 1, now)
    assert not build.PackageMetadata(cache).plan(refresh=False, now=now).sync
    plan = build.PackageMetadata(cache, sources="Suites: bookworm-backports").plan(False, now=now)
    assert plan.sync and "apt sources changed" in plan.reason


def test_a_backports_kernel_is_pinned_in_its_own_tree_and_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "MKOSI_CACHE", tmp_path)
    monkeypatch.setattr(build, "host_apt_sources", lambda: "Types: deb\n")
    stable, stable_sources = build.package_manager_tree()
    backports, backports_sources = build.package_manager_tree(build.KernelSource.BACKPORTS)
    assert stable != backports and stable_sources != backports_sources
    pin = backports / "etc/apt/preferences.d/hatchery-kernel.pref"
    assert "Pin: release n=bookworm-backports" in pin.read_text()
    assert not (stable / "etc/apt/preferences.d/hatchery-kernel.pref").exists()
    locks = tmp_path / "locks"
    assert build.lock_path(locks, "hypervisor", build.KernelSource.STABLE).name == "packages.lock"
    backports_lock = build.lock_path(locks, "hypervisor", build.KernelSource.BACKPORTS)
    assert backports_lock.name == "packages.backports-kernel.lock"


def test_the_demo_versions_are_the_overlay_folders() -> None:
    """demo_images.VERSIONS is what the tests and ``make test``'s builds ahead use: a new
    overlay folder left out of it would be built by neither ahead nor checked."""
    from hatchery_lab.demo_images import OVERLAYS, VERSIONS

    assert sorted(VERSIONS) == sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir())
