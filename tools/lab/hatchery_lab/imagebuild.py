"""Build Hatchery's images with mkosi, cached by their inputs and checked against a lock.

``make images`` (tools/build-images.sh) runs ``python -m hatchery_lab.imagebuild build``. For
each image in images/<name>/ (appliance-vm first, it is small; then hypervisor), in turn:

1. hash the inputs (mkosi.conf, mkosi.extra/, images/<name>/, and for the hypervisor the
   agent's source, pyproject.toml, requirements.lock), plus the image version, mkosi's version
   and the generated apt sources; if build/images/<name>/manifest.json records the same hash
   and every artefact still has its recorded sha256, there is nothing to do;
2. generate mkosi's package-manager tree from this host's own apt configuration under
   .cache/mkosi/pkgmngr (no archive host name is ever written into the repository);
3. for the hypervisor, fill a wheelhouse (.cache/wheelhouse) from requirements.lock and build a
   wheel of this repository: the image installs the agent from them, offline;
4. decide whether to sync the package metadata (older than a bound, 24 h by default, or
   ``--refresh``): a sync also drops the image's incremental cache, whose packages came from
   the older metadata, so a warm machine and a fresh one build the same versions on a day;
5. run ``mkosi -C images/<name> build`` with the package cache in .cache/mkosi/packages;
6. write manifest.json (version, inputs, the exact packages built, sha256 of every artefact;
   no timestamps, so it is reproducible too) and compare the packages with
   images/<name>/packages.lock (checked in): by default every difference is one warning line
   and the build succeeds; ``--locked`` fails on any difference, naming each package;
   ``--update-lock`` rewrites the lock. The comparison runs for up-to-date images too.

``python -m hatchery_lab.imagebuild build --output-dir DIR --force`` builds into another
directory: the reproducibility test builds twice and compares the manifests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from hatchery.qemu.kernel import write_vmlinux
from hatchery_lab import REPO, appliance_initrd, appliance_kernel, liveroot

CACHE = REPO / ".cache"
MKOSI_CACHE = CACHE / "mkosi"
DEFAULT_OUT = REPO / "build" / "images"
IMAGES = ("appliance-vm", "hypervisor")
# Files that describe the build host's history rather than the image are never inputs.
_IGNORED = re.compile(r"(^|/)(__pycache__|\.mypy_cache|\.pytest_cache)(/|$)|\.py[co]$")


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(path: Path) -> Iterable[Path]:
    if path.is_file() or path.is_symlink():
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def input_files(name: str) -> list[Path]:
    """Every file whose content goes into image ``name``."""
    roots = [REPO / "mkosi.conf", REPO / "mkosi.extra", REPO / "images" / name]
    roots += [Path(__file__), REPO / "tools" / "build-images.sh"]
    if name == "appliance-vm":
        roots += [
            Path(appliance_kernel.__file__),
            Path(appliance_initrd.__file__),
            REPO / "tools" / "lab" / "hatchery_lab" / "cpio_writer.py",
        ]
    if name == "hypervisor":
        roots += [REPO / "agent", REPO / "tools" / "rollout", REPO / "pyproject.toml"]
        roots += [REPO / "requirements.lock", REPO / "README.md"]
        roots += [
            Path(liveroot.__file__),
            REPO / "tools" / "lab" / "hatchery_lab" / "cpio_writer.py",
        ]
    files = [
        p
        for root in roots
        if root.exists()
        for p in _walk(root)
        if not _IGNORED.search(p.relative_to(REPO).as_posix())
        and p.name != "packages.lock"  # an output checked against, not an input
    ]
    return sorted(set(files))


def inputs_digest(name: str, extra: dict[str, str]) -> tuple[str, dict[str, str]]:
    files = {}
    for path in input_files(name):
        rel = path.relative_to(REPO).as_posix()
        files[rel] = "link:" + os.readlink(path) if path.is_symlink() else sha256_file(path)
    everything = {"files": files, **extra}
    blob = json.dumps(everything, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), files


# --- apt sources from the build host ---------------------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line.startswith("#"):
            continue
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            current[key] = value.strip()
    return stanzas


def host_apt_sources(release: str = "bookworm") -> str:
    """deb822 stanzas for ``release`` (and its -updates, -security and -backports suites) from
    this host.

    Backports are there for one package only, the kernel of ``--kernel backports`` builds, which
    pin it (``KERNEL_PIN``); apt never takes anything else from them (NotAutomatic: their
    priority is 100, below the release's 500).
    """
    out: list[str] = []
    wanted = {release, f"{release}-updates", f"{release}-security", f"{release}-backports"}
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text()):
            if stanza.get("Enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("Types", "").split():
                continue
            suites = [s for s in stanza.get("Suites", "").split() if s in wanted]
            if not suites or not stanza.get("URIs"):
                continue
            lines = ["Types: deb", f"URIs: {stanza['URIs']}", f"Suites: {' '.join(suites)}"]
            lines.append(f"Components: {stanza.get('Components', 'main')}")
            if stanza.get("Signed-By"):
                lines.append(f"Signed-By: {stanza['Signed-By']}")
            out.append("\n".join(lines))
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 4 or words[0] != "deb":
                continue
            if words[1].startswith("["):
                words = [w for w in words if not (w.startswith("[") or w.endswith("]"))]
            uri, suite, components = words[1], words[2], words[3:]
            if suite in wanted:
                out.append(
                    f"Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: {' '.join(components)}"
                    "\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg"
                )
    if not out:
        raise BuildError(
            f"no {release} apt source on this host (/etc/apt/sources.list.d/*.sources or "
            "/etc/apt/sources.list); mkosi needs one to install packages"
        )
    return "\n\n".join(out) + "\n"


class KernelSource(StrEnum):
    """Where the hypervisor's kernel comes from: ``stable`` (the release's, the default) or
    ``backports`` (the release's backports: a newer kernel, e.g. 6.12 against 6.1, for images
    that upgrade a node across a kernel change)."""

    STABLE = "stable"
    BACKPORTS = "backports"


#: apt preferences of ``--kernel backports``: the kernel packages from backports, nothing else.
KERNEL_PIN = """Package: linux-image-amd64 linux-image-*-amd64
Pin: release n=bookworm-backports
Pin-Priority: 990
"""


def package_manager_tree(kernel: KernelSource = KernelSource.STABLE) -> tuple[Path, str]:
    """mkosi's package-manager tree: etc/apt/sources.list.d/mkosi.sources (mkosi then adds
    none) and, for a backports kernel, the pin that takes it (one tree per kernel source)."""
    tree = MKOSI_CACHE / ("pkgmngr" if kernel is KernelSource.STABLE else f"pkgmngr-{kernel}")
    sources = host_apt_sources()
    target = tree / "etc" / "apt" / "sources.list.d" / "mkosi.sources"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != sources:
        target.write_text(sources)
    pin = tree / "etc" / "apt" / "preferences.d" / "hatchery-kernel.pref"
    if kernel is KernelSource.BACKPORTS:
        pin.parent.mkdir(parents=True, exist_ok=True)
        pin.write_text(KERNEL_PIN)
        sources += KERNEL_PIN
    else:
        pin.unlink(missing_ok=True)
    return tree, sources


# --- the agent's wheels ------------------------------------------------------------------------


def _runtime_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _pip(venv_python: Path, *args: str) -> None:
    cmd = [str(venv_python), "-m", "pip", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:6])} ... failed:\n{result.stderr.strip()}")


def wheelhouse(venv_python: Path) -> Path:
    """Runtime dependencies as wheels, pinned by requirements.lock; filled once per lock."""
    lock = REPO / "requirements.lock"
    pip_version = subprocess.run(
        [str(venv_python), "-c", "import pip; print(pip.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    key = hashlib.sha256(
        lock.read_bytes() + json.dumps(_runtime_requirements()).encode() + pip_version.encode()
    ).hexdigest()[:16]
    house = CACHE / "wheelhouse" / key
    if (house / ".complete").exists():
        return house
    log(f"filling the wheelhouse {house.relative_to(REPO)} from requirements.lock")
    tmp = house.with_name(house.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _pip(venv_python, "download", "--only-binary=:all:", "-d", str(tmp), "-c", str(lock),
         *_runtime_requirements())  # fmt: skip
    # pip itself, run from its wheel inside the image: the image needs no pip of its own.
    _pip(venv_python, "download", "--only-binary=:all:", "--no-deps", "-d", str(tmp),
         f"pip=={pip_version}")  # fmt: skip
    (tmp / ".complete").write_text(key + "\n")
    shutil.rmtree(house, ignore_errors=True)
    tmp.rename(house)
    return house


def project_wheel(venv_python: Path, dest: Path) -> Path:
    """A wheel of this repository, built from a clean copy of its sources (no egg-info litter)."""
    with tempfile.TemporaryDirectory(prefix="hatchery-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for rel in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / rel, src / rel)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(REPO / "agent", src / "agent", ignore=ignore)
        shutil.copytree(REPO / "tools" / "rollout", src / "tools" / "rollout", ignore=ignore)
        env = {**os.environ, "SOURCE_DATE_EPOCH": "1735689600"}
        cmd = [str(venv_python), "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
               "--no-deps", "-w", str(dest), str(src)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise BuildError(f"building the project wheel failed:\n{result.stderr.strip()}")
    wheels = sorted(dest.glob("hatchery-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one hatchery wheel in {dest}, found {len(wheels)}")
    return wheels[0]


# --- package metadata: how fresh -----------------------------------------------------------

METADATA_MAX_AGE_HOURS = 24.0


@dataclass(frozen=True, slots=True)
class MetadataPlan:
    """Whether this build syncs the package metadata, and why (one line for the log).

    ``generation`` names the metadata the build will use: the incremental cache of an image
    is reused only if it was made from the same generation (its packages came from it).
    """

    sync: bool
    reason: str
    generation: str

    @property
    def cache_only(self) -> str:
        # mkosi: "never" always syncs the metadata; "metadata" reuses it and only downloads
        # packages it lacks. ("auto" would skip the sync whenever an incremental tree exists.)
        return "never" if self.sync else "metadata"


class PackageMetadata:
    """The package cache's repository metadata: when it was synced, when to sync it again.

    The archive serves only the newest version of each package, so metadata kept for days
    builds a package set no fresh machine can build any more. A stamp in the package cache
    records the last sync (its content is the generation); older than ``max_age_hours`` or
    ``refresh`` means sync now.
    """

    def __init__(
        self, packages_cache: Path, max_age_hours: float = METADATA_MAX_AGE_HOURS, sources: str = ""
    ) -> None:
        self.cache = packages_cache
        self.max_age_hours = max_age_hours
        self.stamp = packages_cache / ".hatchery-synced"
        # the apt sources the metadata was synced from: other sources, other metadata
        self.sources_stamp = packages_cache / ".hatchery-sources"
        self.sources_digest = hashlib.sha256(sources.encode()).hexdigest()

    def plan(self, refresh: bool, now: float | None = None) -> MetadataPlan:
        now = time.time() if now is None else now
        new_generation = f"synced-{int(now)}"
        try:
            synced_at = self.stamp.stat().st_mtime
            generation = self.stamp.read_text().strip() or "synced-unknown"
        except FileNotFoundError:
            return MetadataPlan(True, "no package metadata yet: syncing", new_generation)
        age_hours = max(0.0, now - synced_at) / 3600
        if refresh:
            return MetadataPlan(True, "REFRESH asked for: syncing", new_generation)
        try:
            same_sources = self.sources_stamp.read_text().strip() == self.sources_digest
        except FileNotFoundError:
            same_sources = False
        if not same_sources:
            return MetadataPlan(True, "the apt sources changed since the last sync: syncing",
                                new_generation)  # fmt: skip
        if age_hours > self.max_age_hours:
            return MetadataPlan(
                True,
                f"synced {age_hours:.0f} h ago, more than {self.max_age_hours:g} h: syncing",
                new_generation,
            )
        return MetadataPlan(
            False,
            f"reusing the metadata synced {age_hours:.1f} h ago (syncs again after "
            f"{self.max_age_hours:g} h, or REFRESH=1)",
            generation,
        )

    def prepare_incremental(self, incremental: Path, plan: MetadataPlan) -> bool:
        """Empty ``incremental`` unless it was made from ``plan``'s metadata; True if kept."""
        marker = incremental / ".hatchery-metadata"
        kept = not plan.sync and marker.exists() and marker.read_text().strip() == plan.generation
        if not kept:
            shutil.rmtree(incremental, ignore_errors=True)
        incremental.mkdir(parents=True, exist_ok=True)
        return kept

    def record(self, incremental: Path, plan: MetadataPlan) -> None:
        """After a successful build: the stamp (if synced) and the incremental tree's origin."""
        if plan.sync:
            self.cache.mkdir(parents=True, exist_ok=True)
            self.stamp.write_text(plan.generation + "\n")
            self.sources_stamp.write_text(self.sources_digest + "\n")
        (incremental / ".hatchery-metadata").write_text(plan.generation + "\n")


# --- the package lock ---------------------------------------------------------------------------


class LockMode(StrEnum):
    REPORT = "report"  # default: one warning line per difference, never a failure
    LOCKED = "locked"  # release pipelines: any difference fails the build
    UPDATE = "update"  # rewrite the lock with what was built


def lock_text(name: str, packages: dict[str, str]) -> str:
    return (
        f"# Debian packages in the {name} image, compared by every build (make images).\n"
        "# A difference is a warning; `make images LOCKED=1` fails on it.\n"
        "# Rewrite after a deliberate change: make images UPDATE_LOCK=1\n"
        + "".join(f"{pkg} {ver}\n" for pkg, ver in sorted(packages.items()))
    )


def read_lock(path: Path) -> dict[str, str]:
    locked: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 2:
            raise BuildError(f"{path}:{number}: expected 'package version', got {line!r}")
        locked[words[0]] = words[1]
    return locked


def lock_drift(locked: dict[str, str], built: dict[str, str]) -> list[str]:
    """One line per package whose version differs, sorted by name."""
    return [
        f"{pkg}: locked {locked.get(pkg, '-')}, built {built.get(pkg, '-')}"
        for pkg in sorted(set(locked) | set(built))
        if locked.get(pkg) != built.get(pkg)
    ]


def reconcile_lock(name: str, packages: dict[str, str], mode: LockMode, lock: Path) -> str:
    """Compare what was built with ``lock``; warn, fail or rewrite by ``mode``; return a note."""
    if mode is LockMode.UPDATE or (mode is LockMode.REPORT and not lock.exists()):
        text = lock_text(name, packages)
        if lock.exists() and lock.read_text() == text:
            return "lock unchanged"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(text)
        return f"wrote {_show(lock)} ({len(packages)} packages)"
    if not lock.exists():
        raise BuildError(f"{name}: --locked, but there is no {_show(lock)}")
    drift = lock_drift(read_lock(lock), packages)
    if not drift:
        return f"packages match the lock ({len(packages)})"
    if mode is LockMode.LOCKED:
        raise BuildError(
            f"{name}: --locked, and the packages differ from {_show(lock)}:\n  "
            + "\n  ".join(drift)
            + "\nhint: build without LOCKED=1 to accept today's archive, or pin a package "
            "snapshot (docs/images.md, Reproducibility)"
        )
    for line in drift:
        print(f"warning: {name}: {line} ({_show(lock)})", file=sys.stderr, flush=True)
    return f"{len(drift)} packages differ from the lock (warned above; UPDATE_LOCK=1 records them)"


def _show(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --- the build ---------------------------------------------------------------------------------


class RootLayout(StrEnum):
    """How the hypervisor's initrd carries its root: ``squashfs`` (the default), the live root
    kept compressed in RAM with a tmpfs overlay on top (hatchery_lab.liveroot); ``cpio``,
    mkosi's whole root unpacked into RAM at boot, kept for side-by-side benchmarks."""

    SQUASHFS = "squashfs"
    CPIO = "cpio"


@dataclass(frozen=True, slots=True)
class BuildOptions:
    out: Path
    version: str
    force: bool
    refresh: bool
    lock_mode: LockMode
    incremental: bool
    extra_trees: tuple[Path, ...] = ()  # overlays for the hypervisor image (site files, demos)
    root_layout: RootLayout = RootLayout.SQUASHFS  # the hypervisor's initrd: hatchery_lab.liveroot
    kernel: KernelSource = KernelSource.STABLE  # the hypervisor's kernel
    locks_dir: Path = REPO / "images"  # <locks_dir>/<name>/packages.lock
    metadata_max_age_hours: float = METADATA_MAX_AGE_HOURS


def tree_digest(tree: Path) -> str:
    """A digest of a folder's files (names, modes, contents): an input of the build."""
    digest = hashlib.sha256()
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if path.is_symlink():
            digest.update(f"{rel} -> {os.readlink(path)}\n".encode())
        elif path.is_file():
            mode = path.stat().st_mode & 0o777
            digest.update(f"{rel} {mode:o} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def mkosi_version() -> str:
    out = subprocess.run(["mkosi", "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError("mkosi is not installed (make setup installs it from bookworm-backports)")
    return out.stdout.split()[-1]


def read_packages(mkosi_manifest: Path) -> dict[str, str]:
    data = json.loads(mkosi_manifest.read_text())
    return {p["name"]: p["version"] for p in data.get("packages", [])}


def mkosi_outputs(staging: Path, name: str) -> dict[str, Path]:
    """mkosi's outputs under canonical names (``<name>.cpio.zst``, ``<name>.vmlinuz``,
    ``mkosi.manifest``), whatever suffix mkosi chose (it may append the version).

    :raise BuildError: one of them is missing.
    """
    suffixes = {".cpio.zst": f"{name}.cpio.zst", ".vmlinuz": f"{name}.vmlinuz",
                ".manifest": "mkosi.manifest"}  # fmt: skip
    found = {
        canonical: path
        for path in sorted(staging.iterdir())
        for suffix, canonical in suffixes.items()
        if path.name.endswith(suffix)
    }
    for want in suffixes.values():
        if want not in found:
            raise BuildError(f"{name}: mkosi produced no {want} (got {os.listdir(staging)})")
    return found


def up_to_date(out: Path, digest: str) -> dict[str, str] | None:
    """The packages recorded by ``out``'s manifest if it was built from ``digest``, intact."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
    except ValueError:
        return None
    if data.get("inputs_sha256") != digest:
        return None
    intact = all(
        (out / f).exists() and sha256_file(out / f) == meta["sha256"]
        for f, meta in data.get("artefacts", {}).items()
    )
    return dict(data.get("packages", {})) if intact else None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class MkosiPaths:
    """Where one image's build reads and writes (all under .cache/ or the output folder)."""

    package_manager_tree: Path
    packages_cache: Path
    incremental: Path
    staging: Path
    wheels: Path | None  # the hypervisor's wheelhouse copy, mounted as build sources


def mkosi_argv(name: str, opts: BuildOptions, paths: MkosiPaths, cache_only: str) -> list[str]:
    """The mkosi command line for image ``name`` (pure: tested without running mkosi)."""
    argv = [
        "mkosi", "-C", str(REPO / "images" / name), "--force",
        "--package-manager-tree", f"{paths.package_manager_tree}:/",
        "--package-cache-dir", str(paths.packages_cache),
        "--cache-dir", str(paths.incremental),
        "--incremental", "yes" if opts.incremental else "no",
        "--cache-only", cache_only,
        "--output-dir", str(paths.staging),
        "--image-version", opts.version,
    ]  # fmt: skip
    if paths.wheels is not None:
        argv += ["--build-sources", f"{paths.wheels}:wheels"]
    if name == "hypervisor":
        for overlay in opts.extra_trees:
            argv += ["--extra-tree", str(overlay)]
    return [*argv, "build"]


def lock_path(locks_dir: Path, name: str, kernel: KernelSource) -> Path:
    """An image's package lock: one per kernel source (a backports kernel is another set)."""
    if kernel is KernelSource.STABLE:
        return locks_dir / name / "packages.lock"
    return locks_dir / name / f"packages.{kernel}-kernel.lock"


def build_one(name: str, opts: BuildOptions, step: str) -> Path:
    out = opts.out / name
    kernel = opts.kernel if name == "hypervisor" else KernelSource.STABLE
    lock = lock_path(opts.locks_dir, name, kernel)
    venv_python = REPO / ".venv" / "bin" / "python"
    pkgmngr_tree, sources = package_manager_tree(kernel)
    extra = {
        "version": opts.version,
        "mkosi": mkosi_version(),
        "apt_sources": hashlib.sha256(sources.encode()).hexdigest(),
    }
    if name == "hypervisor":
        house = wheelhouse(venv_python)
        extra["wheelhouse"] = house.name
        for index, overlay in enumerate(opts.extra_trees):
            extra[f"extra_tree_{index}"] = tree_digest(overlay)
        extra["root_layout"] = opts.root_layout.value
        if kernel is not KernelSource.STABLE:
            extra["kernel"] = kernel.value
    digest, files = inputs_digest(name, extra)
    recorded = None if opts.force else up_to_date(out, digest)
    if recorded is not None:
        lock_note = reconcile_lock(name, recorded, opts.lock_mode, lock)
        log(f"{step} {name}: up to date ({out}); {lock_note}")
        return out

    started = time.monotonic()
    wheels: list[Path] = []
    wheel_dir: Path | None = None
    if name == "hypervisor":
        wheel_dir = MKOSI_CACHE / "wheels" / name
        shutil.rmtree(wheel_dir, ignore_errors=True)
        wheel_dir.mkdir(parents=True)
        for whl in sorted(house.glob("*.whl")):
            shutil.copy2(whl, wheel_dir / whl.name)
        project_wheel(venv_python, wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))

    packages_cache = MKOSI_CACHE / "packages"
    packages_cache.mkdir(parents=True, exist_ok=True)
    metadata = PackageMetadata(packages_cache, opts.metadata_max_age_hours, host_apt_sources())
    plan = metadata.plan(opts.refresh)
    # One incremental cache per image: mkosi names its cached tree by distribution only, so
    # a shared folder lets one image's cached packages stand in for another's.
    suffix = "" if kernel is KernelSource.STABLE else f"-{kernel}-kernel"
    incremental = MKOSI_CACHE / "incremental" / f"{name}{suffix}"
    kept = metadata.prepare_incremental(incremental, plan)
    staging = opts.out / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    paths = MkosiPaths(pkgmngr_tree, packages_cache, incremental, staging, wheel_dir)
    log(f"{step} {name}: package metadata: {plan.reason}"
        + ("" if kept or not opts.incremental else "; incremental cache made from it"))  # fmt: skip
    log(f"{step} {name}: mkosi build (version {opts.version})")
    argv = mkosi_argv(name, opts, paths, plan.cache_only)
    result = subprocess.run(argv, cwd=REPO / "images" / name, check=False)
    if result.returncode != 0:
        raise BuildError(f"{name}: mkosi failed with exit status {result.returncode}")
    metadata.record(incremental, plan)

    artefacts = mkosi_outputs(staging, name)
    packages = read_packages(artefacts.pop("mkosi.manifest"))

    final = opts.out / f".{name}.new"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    for canonical, path in artefacts.items():
        path.rename(final / canonical)
    if name == "appliance-vm":
        # The appliance boots its own kernel (appliance_kernel: tinyconfig, no modules) as
        # appliance-vm.vmlinux; Debian's stock kernel stays beside it, as shipped (vmlinuz)
        # and as its PVH ELF (stock-vmlinux), for the benchmark's side-by-side runs.
        write_vmlinux(final / f"{name}.vmlinuz", final / f"{name}.stock-vmlinux")
        appliance_kernel.build(
            stock_kernel_version(packages), final / f"{name}.vmlinux", lambda m: log(f"{step} {m}")
        )
        # Two LZ4 initrds: with crun for container VMs, without it for the rest
        # (appliance_initrd); mkosi's zstd root is only their source.
        root = final / f"{name}.cpio.zst"
        full = final / f"{name}.container.cpio.lz4"
        dropped = appliance_initrd.write_initrds(root, full, final / f"{name}.cpio.lz4")
        root.unlink()
        log(f"{step} {name}: the container runtime ({dropped} members) only in {full.name}")
    if name == "hypervisor" and opts.root_layout is RootLayout.SQUASHFS:
        initrd = final / f"{name}.cpio.zst"
        liveroot.repack(initrd, initrd, appliance_kernel.source_date_epoch(),
                        lambda m: log(f"{step} {name}: live root: {m}"))  # fmt: skip
    artefact_meta = {p.name: (sha256_file(p), p.stat().st_size) for p in sorted(final.iterdir())}
    manifest = {
        "image": name,
        "version": opts.version,
        "inputs_sha256": digest,
        "inputs": {"files": files, **extra},
        "mkosi_version": extra["mkosi"],
        "packages": packages,
        "python_wheels": [w.name for w in wheels],
        "artefacts": {f: {"sha256": h, "bytes": n} for f, (h, n) in artefact_meta.items()},
    }
    _write_json(final / "manifest.json", manifest)
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    sizes = ", ".join(f"{f} {n / 1e6:.1f} MB" for f, (_, n) in artefact_meta.items())
    log(f"{step} {name}: built in {time.monotonic() - started:.0f} s: {sizes}")
    # After the artefacts are in place: with --locked the build fails, yet what was built
    # stays inspectable (its manifest lists the exact versions).
    lock_note = reconcile_lock(name, packages, opts.lock_mode, lock)
    log(f"{step} {name}: {lock_note}")
    return out


def stock_kernel_version(packages: dict[str, str]) -> str:
    """The Debian version of the kernel an image was built with (``linux-image-amd64``)."""
    version = packages.get("linux-image-amd64")
    if version is None:
        raise BuildError("the image has no linux-image-amd64: which kernel source to build?")
    return version


def default_version() -> str:
    for var in ("HATCHERY_IMAGE_VERSION", "VERSION"):
        if os.environ.get(var):
            return os.environ[var]
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in {"1", "yes", "true"}


def _hours(value: str) -> float:
    hours = float(value)
    if hours < 0:
        raise argparse.ArgumentTypeError("must be 0 or more hours (inf: never)")
    return hours


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build images (default: all), skipping up-to-date ones")
    build.add_argument("images", nargs="*", metavar="IMAGE", help=f"any of {', '.join(IMAGES)}")
    build.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    build.add_argument("--version", default=default_version(),
                       help="image version (os-release IMAGE_VERSION); env VERSION")  # fmt: skip
    build.add_argument("--force", action="store_true", help="build even if up to date")
    build.add_argument("--refresh", action="store_true", default=_truthy(os.environ.get("REFRESH")),
                       help="sync the package metadata now (env REFRESH=1)")  # fmt: skip
    build.add_argument("--metadata-max-age", type=_hours, metavar="HOURS",
                       default=_hours(os.environ.get("METADATA_MAX_AGE")
                                      or str(METADATA_MAX_AGE_HOURS)),
                       help="sync the package metadata when older than this many hours "
                       "(default 24; inf: never; env METADATA_MAX_AGE)")  # fmt: skip
    build.add_argument("--update-lock", action="store_true",
                       default=_truthy(os.environ.get("UPDATE_LOCK")),
                       help="rewrite images/<name>/packages.lock (env UPDATE_LOCK=1)")  # fmt: skip
    build.add_argument("--locked", action="store_true", default=_truthy(os.environ.get("LOCKED")),
                       help="fail if the packages differ from the lock (env LOCKED=1)")  # fmt: skip
    build.add_argument("--locks-dir", type=Path, default=REPO / "images",
                       help="where <name>/packages.lock live (default: images/)")  # fmt: skip
    build.add_argument("--no-incremental", dest="incremental", action="store_false",
                       help="do not reuse mkosi's cached package-installed trees")  # fmt: skip
    build.add_argument("--extra-tree", action="append", type=Path, default=[],
                       help="a folder overlaid on the hypervisor image (repeatable)")  # fmt: skip
    build.add_argument("--root-layout", type=RootLayout, choices=list(RootLayout),
                       default=RootLayout(os.environ.get("ROOT_LAYOUT") or RootLayout.SQUASHFS),
                       help="the hypervisor's root: squashfs (kept compressed in RAM, the "
                       "default) or cpio (unpacked into RAM); env ROOT_LAYOUT")  # fmt: skip
    build.add_argument("--kernel", type=KernelSource, choices=list(KernelSource),
                       default=KernelSource.STABLE,
                       help="the hypervisor's kernel: stable (the release's, the default) or "
                       "backports (a newer one; its own package lock)")  # fmt: skip
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("build-images: run as root (mkosi needs it here)", file=sys.stderr)
        return 1
    unknown = sorted(set(args.images) - set(IMAGES))
    if unknown:
        print(f"build-images: unknown image {unknown[0]!r}; known: {', '.join(IMAGES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.locked and args.update_lock:
        print("build-images: LOCKED=1 and UPDATE_LOCK=1 contradict each other; pick one",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [n for n in IMAGES if n in (args.images or IMAGES)]
    mode = (
        LockMode.UPDATE if args.update_lock else LockMode.LOCKED if args.locked else LockMode.REPORT
    )
    opts = BuildOptions(
        out=args.output_dir.resolve(),
        version=args.version,
        force=args.force,
        refresh=args.refresh,
        lock_mode=mode,
        incremental=args.incremental,
        extra_trees=tuple(t.resolve() for t in args.extra_tree),
        root_layout=args.root_layout,
        kernel=args.kernel,
        locks_dir=args.locks_dir.resolve(),
        metadata_max_age_hours=args.metadata_max_age,
    )
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        for index, name in enumerate(names, 1):
            build_one(name, opts, f"[{index}/{len(names)}]")
    except (BuildError, appliance_kernel.KernelBuildError) as exc:
        print(f"build-images: {exc}", file=sys.stderr)
        return 1
    log(f"images ready in {opts.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
