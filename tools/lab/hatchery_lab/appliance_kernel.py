"""The appliance VM's own kernel: Debian's kernel source, ``tinyconfig`` plus a checked-in
fragment, everything built in, no modules; reproducible and cached by its inputs.

The SmallStack paper's appliance boots "a stripped-down kernel (all drivers built into the
kernel, virtio driver), no bootloader, no initrd". Debian's stock kernel spends most of an
appliance's boot on its own start-up (probing, module loading from the initrd); a kernel
that holds only what the appliance uses starts in a fraction of that.

``build(version, out)``:

1. ``apt-get download linux-source-6.1=VERSION`` into ``.cache/appliance-kernel/`` — the
   exact version of the ``linux-image`` package the appliance image was built with (the
   archive serves only the newest version, which is the one mkosi just installed);
2. unpack its tarball into a fixed work folder (the same path on every build);
3. apply ``images/appliance-vm/kernel-patches/*.patch`` in name order (each says why in its
   header; today one: init memory freed without poison, 140 ms under TCG);
4. ``make tinyconfig``, merge ``images/appliance-vm/kernel.config``, ``make olddefconfig``,
   then check every option of the fragment survived (Kconfig silently drops an option whose
   dependencies are missing: that must fail the build, not boot a kernel without virtio);
5. ``make vmlinux`` with the build's identity fixed (``KBUILD_BUILD_TIMESTAMP`` from the
   images' ``SourceDateEpoch``, user, host, build number), so two builds are bit-identical.

The result is cached under ``.cache/appliance-kernel/built/<inputs>/vmlinux``, keyed by the
source package's sha256, the fragment, the patches, ``RECIPE`` (bump it when
``compile_kernel`` changes what it builds) and the compiler's version: an appliance image
rebuilt for a changed init script does not compile the kernel again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from hatchery_lab import REPO

SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT = REPO / "images" / "appliance-vm" / "kernel.config"
PATCHES = REPO / "images" / "appliance-vm" / "kernel-patches"
CACHE = REPO / ".cache" / "appliance-kernel"
#: The build steps' version: part of the cache key (a change elsewhere in this file is not).
RECIPE = 1
_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


class KernelBuildError(Exception):
    """A step of the kernel build failed; the message says which and why."""


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise KernelBuildError(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{tail}")
    return done.stdout


def wanted_options(fragment: Path = FRAGMENT) -> dict[str, str | None]:
    """The fragment's options: ``CONFIG_X`` → its value, or None for ``is not set``."""
    wanted: dict[str, str | None] = {}
    for line in fragment.read_text().splitlines():
        line = line.strip()
        if m := _OPTION.match(line):
            wanted[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            wanted[m.group(1)] = None
    return wanted


def config_mismatches(wanted: dict[str, str | None], config_text: str) -> list[str]:
    """Each option of ``wanted`` that the final ``.config`` does not hold as asked."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        if m := _OPTION.match(line.strip()):
            have[m.group(1)] = m.group(2)
    return [
        f"{name}: wanted {value or 'unset'}, got {have.get(name, 'unset')}"
        for name, value in wanted.items()
        if have.get(name) != value
    ]


def source_deb(version: str) -> Path:
    """Debian's kernel source package of ``version``, downloaded once into the cache."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    name = f"{SOURCE_PACKAGE}_{version.replace(':', '%3a')}_all.deb"
    deb = debs / name
    if not deb.exists():
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(["apt-get", "download", f"{SOURCE_PACKAGE}={version}"], cwd=Path(tmp))
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise KernelBuildError(f"apt-get download gave {len(got)} files, not one")
            got[0].rename(deb)
    return deb


def source_date_epoch() -> int:
    """The images' ``SourceDateEpoch=`` (mkosi.conf): the kernel's build timestamp too."""
    m = re.search(r"^SourceDateEpoch=(\d+)$", (REPO / "mkosi.conf").read_text(), re.M)
    if m is None:
        raise KernelBuildError("mkosi.conf has no SourceDateEpoch=")
    return int(m.group(1))


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def patches(folder: Path | None = None) -> list[Path]:
    """The patches applied to Debian's source (``PATCHES``), in the order they apply (by file
    name)."""
    return sorted((folder or PATCHES).glob("*.patch"))


def inputs_key(deb: Path) -> str:
    """What the kernel depends on: the source, the fragment, the patches, the recipe, the
    compiler."""
    digest = hashlib.sha256()
    for part in (
        _file_sha256(deb),
        FRAGMENT.read_text(),
        *(f"{p.name}\n{p.read_text()}" for p in patches()),
        f"recipe {RECIPE}",
        _run(["gcc", "--version"]).splitlines()[0],
        str(source_date_epoch()),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def compile_kernel(deb: Path, work: Path, log: Callable[[str], None]) -> Path:
    """Unpack ``deb`` into ``work`` (emptied first), configure and build; the vmlinux path."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"appliance kernel: unpacking {deb.name}")
    _run(["dpkg-deb", "-x", str(deb), str(work)])
    _run(["tar", "-xJf", str(work / "usr" / "src" / f"{SOURCE_PACKAGE}.tar.xz"), "-C", str(work)])
    shutil.rmtree(work / "usr")
    src = work / SOURCE_PACKAGE
    for patch in patches():
        log(f"appliance kernel: applying {patch.name}")
        _run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
              "-i", str(patch)], cwd=src)  # fmt: skip
    epoch = source_date_epoch()
    env = {
        **os.environ,
        "KBUILD_BUILD_TIMESTAMP": f"@{epoch}",
        "KBUILD_BUILD_USER": "hatchery",
        "KBUILD_BUILD_HOST": "hatchery",
        "KBUILD_BUILD_VERSION": "1",
        "SOURCE_DATE_EPOCH": str(epoch),
        "LC_ALL": "C",
    }
    log("appliance kernel: tinyconfig + images/appliance-vm/kernel.config")
    _run(["make", "tinyconfig"], cwd=src, env=env)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)], cwd=src, env=env)
    _run(["make", "olddefconfig"], cwd=src, env=env)
    missing = config_mismatches(wanted_options(), (src / ".config").read_text())
    if missing:
        raise KernelBuildError(
            "the kernel configuration dropped options of kernel.config (a dependency is "
            "missing: add it to the fragment):\n  " + "\n  ".join(missing)
        )
    jobs = str(os.cpu_count() or 1)
    log(f"appliance kernel: make vmlinux -j{jobs} (a few minutes)")
    _run(["make", f"-j{jobs}", "vmlinux"], cwd=src, env=env)
    return src / "vmlinux"


def build(version: str, out: Path, log: Callable[[str], None] = print) -> Path:
    """The appliance kernel for Debian kernel package ``version``, copied to ``out``."""
    deb = source_deb(version)
    key = inputs_key(deb)
    cached = CACHE / "built" / key / "vmlinux"
    if cached.exists():
        log(f"appliance kernel: up to date ({cached.parent.name})")
    else:
        built = compile_kernel(deb, CACHE / "work", log)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".new")
        shutil.copyfile(built, tmp)
        tmp.rename(cached)
        shutil.rmtree(CACHE / "work", ignore_errors=True)  # ~1.5 GB of objects
        log(f"appliance kernel: built ({cached.stat().st_size / 1e6:.1f} MB)")
    shutil.copyfile(cached, out)
    return out


def candidate_version() -> str:
    """The version of Debian's kernel apt would install now: the one the next image build
    gets (the archive serves only the newest), so a kernel built for it ahead is reused."""
    out = _run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE])
    for line in out.splitlines():
        if line.startswith("Version: "):
            return line.split(": ", 1)[1].strip()
    raise KernelBuildError(f"apt knows no {SOURCE_PACKAGE} (run make setup)")


def main(argv: list[str] | None = None) -> int:
    """``python -m hatchery_lab.appliance_kernel [VERSION]``: build (or find cached) the kernel
    ahead of ``make images``. ``make test`` starts it in the background, niced, while the
    first tiers run: on a fresh machine the compile then costs the image tier nothing."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        version = args[0] if args else candidate_version()
        with tempfile.TemporaryDirectory() as tmp:
            build(version, Path(tmp) / "vmlinux")
    except KernelBuildError as exc:
        print(f"appliance-kernel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
