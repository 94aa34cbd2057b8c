"""Build the stock cloud-init guest (tests/image/cloud_guest/) with mkosi, cached by its inputs.

The image is Debian 12 with Debian's own cloud-init; tests/image/cloud_guest/mkosi.conf says
what is in it. It is built the way hatchery_lab.imagebuild builds ours, with the same
package-manager tree (apt sources generated from this host's apt configuration, so no archive
host name is written anywhere) and the same package cache, but with an incremental cache and
an output folder of its own: ``.cache/cloud-guest/<inputs sha256>/`` holds ``cloud-guest.vmlinuz``,
``cloud-guest.cpio.zst`` and ``manifest.json``. A rerun with the same inputs builds nothing.

Heavy builds never overlap: a lock file serialises builds of this image, and a build first
waits while any other mkosi process runs on the machine (another engineer's ``make images``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hatchery_lab import REPO
from hatchery_lab import imagebuild as image_tools

CONFIG_DIR = REPO / "tests" / "image" / "cloud_guest"
CACHE = REPO / ".cache" / "cloud-guest"
NAME = "cloud-guest"


class CloudGuestBuildError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class CloudGuestImage:
    kernel: Path
    initrd: Path
    manifest: dict[str, object]
    built_now: bool  # False when the cached build was reused
    build_seconds: float | None

    @property
    def packages(self) -> dict[str, str]:
        packages = self.manifest.get("packages", {})
        assert isinstance(packages, dict)
        return {str(k): str(v) for k, v in packages.items()}


def _inputs() -> tuple[str, dict[str, object]]:
    files: dict[str, str] = {}
    for root, dirs, names in os.walk(CONFIG_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            path = Path(root) / name
            files[path.relative_to(REPO).as_posix()] = image_tools.sha256_file(path)
    files["tools/lab/hatchery_lab/cloud_guest.py"] = image_tools.sha256_file(Path(__file__))
    _, sources = image_tools.package_manager_tree()
    everything: dict[str, object] = {
        "files": files,
        "mkosi": image_tools.mkosi_version(),
        "apt_sources": hashlib.sha256(sources.encode()).hexdigest(),
    }
    blob = json.dumps(everything, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), everything


def _cached(out: Path) -> CloudGuestImage | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    artefacts = manifest.get("artefacts", {})
    for name, meta in artefacts.items():
        path = out / name
        if not path.exists() or path.stat().st_size != meta["bytes"]:
            return None
    return CloudGuestImage(out / f"{NAME}.vmlinuz", out / f"{NAME}.cpio.zst", manifest, False, None)


def _other_mkosi_running() -> bool:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(arg.decode(errors="replace")).name == "mkosi" for arg in argv[:2]):
            return True
    return False


@contextlib.contextmanager
def _build_lock(wait_other_mkosi: float) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + wait_other_mkosi
        while _other_mkosi_running() and time.monotonic() < deadline:
            time.sleep(5)
        yield


def build_cloud_guest(timeout: float = 1800, wait_other_mkosi: float = 1800) -> CloudGuestImage:
    """The cloud-init guest image, built now unless a build of the same inputs is cached."""
    digest, inputs = _inputs()
    out = CACHE / digest
    image = _cached(out)
    if image is not None:
        return image
    with _build_lock(wait_other_mkosi):
        image = _cached(out)  # another session may have built it while this one waited
        if image is not None:
            return image
        return _build(out, digest, inputs, timeout)


def _build(out: Path, digest: str, inputs: dict[str, object], timeout: float) -> CloudGuestImage:
    tree, _ = image_tools.package_manager_tree()
    packages_cache = image_tools.MKOSI_CACHE / "packages"
    packages_cache.mkdir(parents=True, exist_ok=True)
    # Same rule as hatchery_lab.imagebuild: metadata older than a day is synced again, and an
    # incremental tree made from other metadata is dropped.
    metadata = image_tools.PackageMetadata(packages_cache)
    plan = metadata.plan(refresh=False)
    incremental = CACHE / "incremental"  # not shared: mkosi keys it by distribution only
    metadata.prepare_incremental(incremental, plan)
    staging = CACHE / f".{digest}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [
        "mkosi", "-C", str(CONFIG_DIR), "--force",
        "--package-manager-tree", f"{tree}:/",
        "--package-cache-dir", str(packages_cache),
        "--cache-dir", str(incremental),
        "--incremental", "yes",
        "--cache-only", plan.cache_only,
        "--output-dir", str(staging),
        "build",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        cmd, cwd=CONFIG_DIR, capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CloudGuestBuildError(
            f"mkosi build of {CONFIG_DIR} failed ({result.returncode}):\n"
            + result.stdout[-3000:]
            + result.stderr[-5000:]
        )
    metadata.record(incremental, plan)
    try:
        found = image_tools.mkosi_outputs(staging, NAME)
    except image_tools.BuildError as exc:
        raise CloudGuestBuildError(str(exc)) from exc
    packages = image_tools.read_packages(found.pop("mkosi.manifest"))
    final = CACHE / f".{digest}.new"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    for name, path in found.items():
        path.rename(final / name)
    manifest = {
        "image": NAME,
        "inputs_sha256": digest,
        "inputs": inputs,
        "packages": packages,
        "build_seconds": round(seconds, 1),
        "artefacts": {p.name: {"bytes": p.stat().st_size} for p in sorted(final.iterdir())},
    }
    (final / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    # Older builds (other inputs) are dead weight: keep only this one.
    for old in CACHE.iterdir():
        if old.is_dir() and len(old.name) == 64 and old != out:
            shutil.rmtree(old, ignore_errors=True)
    return CloudGuestImage(
        out / f"{NAME}.vmlinuz", out / f"{NAME}.cpio.zst", manifest, True, seconds
    )


if __name__ == "__main__":
    built = build_cloud_guest()
    state = f"built in {built.build_seconds:.0f} s" if built.built_now else "cached"
    sizes = {p.name: p.stat().st_size for p in (built.kernel, built.initrd)}
    print(f"{built.initrd.parent} ({state}): {sizes}")
