"""Build Hatchery's images with mkosi, cached by their inputs and checked against a lock.

``tools/build-images.sh`` (``make images``) runs ``build``. For each image in images/<name>/
(appliance-vm first, it is small; then hypervisor), one after the other:

1. hash the inputs (mkosi.conf, mkosi.extra/, images/<name>/, and for the hypervisor the
   agent's source, pyproject.toml, requirements.lock), plus the image version, mkosi's version
   and the generated apt sources; if build/images/<name>/manifest.json records the same hash
   and every artefact still has its recorded sha256, there is nothing to do;
2. generate mkosi's package-manager tree from this host's own apt configuration under
   .cache/mkosi/pkgmngr (no archive host name is ever written into the repository);
3. for the hypervisor, fill a wheelhouse (.cache/wheelhouse) from requirements.lock and build a
   wheel of this repository: the image installs the agent from them, offline;
4. run ``mkosi -C images/<name> build`` with the package cache in .cache/mkosi/packages (kept
   between builds: after the first sync the repository metadata is reused, which pins the
   package set; ``--refresh`` syncs it again);
5. compare the installed packages with images/<name>/packages.lock (checked in): a difference
   fails the build unless ``--update-lock``; write manifest.json (version, inputs, packages,
   sha256 of every artefact; no timestamps, so it is reproducible too).

``python tools/images.py build --output-dir DIR --force`` builds into another directory: the
reproducibility test builds twice and compares the manifests.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
    roots += [REPO / "tools" / "images.py", REPO / "tools" / "build-images.sh"]
    if name == "hypervisor":
        roots += [REPO / "agent", REPO / "tools" / "rollout", REPO / "pyproject.toml"]
        roots += [REPO / "requirements.lock", REPO / "README.md"]
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
    """deb822 stanzas for ``release`` (and its -updates/-security suites) from this host.

    Backports are left out: the images are built from the stable release only.
    """
    out: list[str] = []
    wanted = {release, f"{release}-updates", f"{release}-security"}
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


def package_manager_tree() -> tuple[Path, str]:
    """mkosi's package-manager tree: etc/apt/sources.list.d/mkosi.sources (mkosi then adds none)."""
    tree = MKOSI_CACHE / "pkgmngr"
    sources = host_apt_sources()
    target = tree / "etc" / "apt" / "sources.list.d" / "mkosi.sources"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != sources:
        target.write_text(sources)
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


# --- the build ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildOptions:
    out: Path
    version: str
    force: bool
    refresh: bool
    update_lock: bool
    incremental: bool
    extra_trees: tuple[Path, ...] = ()  # overlays for the hypervisor image (site files, demos)


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


def check_lock(name: str, packages: dict[str, str], update: bool) -> str:
    lock = REPO / "images" / name / "packages.lock"
    text = (
        f"# Debian packages in the {name} image, checked by every build (tools/images.py).\n"
        "# Regenerate after a deliberate change: make images UPDATE_LOCK=1\n"
        + "".join(f"{pkg} {ver}\n" for pkg, ver in sorted(packages.items()))
    )
    if not lock.exists() or update:
        if not lock.exists() or lock.read_text() != text:
            lock.write_text(text)
            return f"wrote {lock.relative_to(REPO)} ({len(packages)} packages)"
        return "lock unchanged"
    locked = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, ver = line.split()
            locked[pkg] = ver
    if locked != packages:
        diff = [
            f"  {pkg}: locked {locked.get(pkg, '-')}, built {packages.get(pkg, '-')}"
            for pkg in sorted(set(locked) | set(packages))
            if locked.get(pkg) != packages.get(pkg)
        ]
        raise BuildError(
            f"{name}: the packages differ from {lock.relative_to(REPO)}:\n"
            + "\n".join(diff[:40])
            + "\nif intended (new packages, security updates): make images UPDATE_LOCK=1"
        )
    return f"packages match the lock ({len(packages)})"


def up_to_date(out: Path, digest: str) -> bool:
    manifest = out / "manifest.json"
    if not manifest.exists():
        return False
    try:
        data = json.loads(manifest.read_text())
    except ValueError:
        return False
    if data.get("inputs_sha256") != digest:
        return False
    return all(
        (out / f).exists() and sha256_file(out / f) == meta["sha256"]
        for f, meta in data.get("artefacts", {}).items()
    )


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def build_one(name: str, opts: BuildOptions, step: str) -> Path:
    out = opts.out / name
    venv_python = REPO / ".venv" / "bin" / "python"
    tree, sources = package_manager_tree()
    extra = {
        "version": opts.version,
        "mkosi": mkosi_version(),
        "apt_sources": hashlib.sha256(sources.encode()).hexdigest(),
    }
    wheels: list[Path] = []
    wheel_dir = MKOSI_CACHE / "wheels" / name
    if name == "hypervisor":
        house = wheelhouse(venv_python)
        extra["wheelhouse"] = house.name
        for index, tree in enumerate(opts.extra_trees):
            extra[f"extra_tree_{index}"] = tree_digest(tree)
    digest, files = inputs_digest(name, extra)
    if not opts.force and up_to_date(out, digest):
        log(f"{step} {name}: up to date ({out})")
        return out

    started = time.monotonic()
    mkosi_args: list[str] = []
    if name == "hypervisor":
        shutil.rmtree(wheel_dir, ignore_errors=True)
        wheel_dir.mkdir(parents=True)
        for whl in sorted(house.glob("*.whl")):
            shutil.copy2(whl, wheel_dir / whl.name)
        project_wheel(venv_python, wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))
        mkosi_args += ["--build-sources", f"{wheel_dir}:wheels"]
        for tree in opts.extra_trees:
            mkosi_args += ["--extra-tree", str(tree)]

    packages_cache = MKOSI_CACHE / "packages"
    packages_cache.mkdir(parents=True, exist_ok=True)
    synced = packages_cache / ".hatchery-synced"
    cache_only = "metadata" if synced.exists() and not opts.refresh else "auto"
    staging = opts.out / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # One incremental cache per image: mkosi names its cached tree by distribution only, so
    # a shared folder lets one image's cached packages stand in for another's.
    incremental = MKOSI_CACHE / "incremental" / name
    incremental.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mkosi", "-C", str(REPO / "images" / name), "--force",
        "--package-manager-tree", f"{tree}:/",
        "--package-cache-dir", str(packages_cache),
        "--cache-dir", str(incremental),
        "--incremental", "yes" if opts.incremental else "no",
        "--cache-only", cache_only,
        "--output-dir", str(staging),
        "--image-version", opts.version,
        *mkosi_args,
        "build",
    ]  # fmt: skip
    log(f"{step} {name}: mkosi build (version {opts.version}, package metadata: "
        f"{'cached' if cache_only == 'metadata' else 'sync'})")  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO / "images" / name, check=False)
    if result.returncode != 0:
        raise BuildError(f"{name}: mkosi failed with exit status {result.returncode}")
    synced.touch()

    # Canonical artefact names, whatever suffix mkosi chose (it may append the version).
    artefacts: dict[str, Path] = {}
    for path in sorted(staging.iterdir()):
        if path.name.endswith(".cpio.zst"):
            artefacts[f"{name}.cpio.zst"] = path
        elif path.name.endswith(".vmlinuz"):
            artefacts[f"{name}.vmlinuz"] = path
        elif path.name.endswith(".manifest"):
            artefacts["mkosi.manifest"] = path
    for want in (f"{name}.cpio.zst", f"{name}.vmlinuz", "mkosi.manifest"):
        if want not in artefacts:
            raise BuildError(f"{name}: mkosi produced no {want} (got {os.listdir(staging)})")
    packages = read_packages(artefacts.pop("mkosi.manifest"))
    lock_note = check_lock(name, packages, opts.update_lock)

    final = opts.out / f".{name}.new"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    for canonical, path in artefacts.items():
        path.rename(final / canonical)
    if name == "appliance-vm":
        sys.path.insert(0, str(REPO / "agent"))
        from hatchery.qemu.kernel import write_vmlinux

        write_vmlinux(final / f"{name}.vmlinuz", final / f"{name}.vmlinux")
    manifest = {
        "image": name,
        "version": opts.version,
        "inputs_sha256": digest,
        "inputs": {"files": files, **extra},
        "mkosi_version": extra["mkosi"],
        "packages": packages,
        "python_wheels": [w.name for w in wheels],
        "artefacts": {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(final.iterdir())
        },
    }
    _write_json(final / "manifest.json", manifest)
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    sizes = ", ".join(
        f"{f} {meta['bytes'] / 1e6:.1f} MB" for f, meta in manifest["artefacts"].items()
    )
    log(f"{step} {name}: built in {time.monotonic() - started:.0f} s: {sizes}; {lock_note}")
    return out


def default_version() -> str:
    for var in ("HATCHERY_IMAGE_VERSION", "VERSION"):
        if os.environ.get(var):
            return os.environ[var]
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in {"1", "yes", "true"}


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
                       help="sync the package metadata again (env REFRESH=1)")  # fmt: skip
    build.add_argument("--update-lock", action="store_true",
                       default=_truthy(os.environ.get("UPDATE_LOCK")),
                       help="rewrite images/<name>/packages.lock (env UPDATE_LOCK=1)")  # fmt: skip
    build.add_argument("--no-incremental", dest="incremental", action="store_false",
                       help="do not reuse mkosi's cached package-installed trees")  # fmt: skip
    build.add_argument("--extra-tree", action="append", type=Path, default=[],
                       help="a folder overlaid on the hypervisor image (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("build-images: run as root (mkosi needs it here)", file=sys.stderr)
        return 1
    unknown = sorted(set(args.images) - set(IMAGES))
    if unknown:
        print(f"build-images: unknown image {unknown[0]!r}; known: {', '.join(IMAGES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [n for n in IMAGES if n in (args.images or IMAGES)]
    opts = BuildOptions(
        out=args.output_dir.resolve(),
        version=args.version,
        force=args.force,
        refresh=args.refresh,
        update_lock=args.update_lock,
        incremental=args.incremental,
        extra_trees=tuple(t.resolve() for t in args.extra_tree),
    )
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        for index, name in enumerate(names, 1):
            build_one(name, opts, f"[{index}/{len(names)}]")
    except BuildError as exc:
        print(f"build-images: {exc}", file=sys.stderr)
        return 1
    log(f"images ready in {opts.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
