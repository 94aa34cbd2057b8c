"""Bit-identical rebuilds: a second build from scratch gives the same sha256 for every artefact.

The second build goes into its own output folder with ``--force`` (nothing reused from the
first output); it shares the package cache, as CI does, which pins the package set.
"""

from __future__ import annotations

from pathlib import Path

from hatchery_lab.images import build_images, manifest

NAMES = ("appliance-vm", "hypervisor")


def test_rebuild_gives_identical_artefacts(images: Path, tmp_path: Path) -> None:
    for attempt in range(3):
        again = build_images("--force", output_dir=tmp_path / f"again{attempt}")
        if all(manifest(images, n)["inputs_sha256"] == manifest(again, n)["inputs_sha256"]
               for n in NAMES):  # fmt: skip
            break
        # A source file changed while we built (a shared working tree): build both again.
        build_images()
    for name in NAMES:
        first, second = manifest(images, name), manifest(again, name)
        assert first["inputs_sha256"] == second["inputs_sha256"], f"{name}: inputs kept changing"
        assert first["artefacts"] == second["artefacts"], f"{name} differs between builds"
        assert (images / name / "manifest.json").read_bytes() == (
            again / name / "manifest.json"
        ).read_bytes()


def test_manifest_records_inputs_packages_and_artefacts(images: Path) -> None:
    for name in NAMES:
        data = manifest(images, name)
        artefacts = data["artefacts"]
        assert isinstance(artefacts, dict)
        initrd = "appliance-vm.cpio.lz4" if name == "appliance-vm" else f"{name}.cpio.zst"
        assert {initrd, f"{name}.vmlinuz"} <= set(artefacts)
        assert all(len(meta["sha256"]) == 64 for meta in artefacts.values())
        packages = data["packages"]
        # The exact versions built, whatever the lock says (drift is tests/image/test_lock.py's).
        assert isinstance(packages, dict) and packages.get("linux-image-amd64")
        assert all(isinstance(v, str) and v for v in packages.values())
    assert "appliance-vm.vmlinux" in manifest(images, "appliance-vm")["artefacts"]  # type: ignore[operator]
    assert any(w.startswith("hatchery-") for w in manifest(images, "hypervisor")["python_wheels"])  # type: ignore[union-attr]


def test_second_build_is_a_no_op(images: Path) -> None:
    def stamps() -> dict[str, tuple[int, object]]:
        return {
            n: (
                (images / n / "manifest.json").stat().st_mtime_ns,
                manifest(images, n)["inputs_sha256"],
            )
            for n in NAMES
        }

    for _ in range(3):
        build_images()
        before = stamps()
        build_images()
        after = stamps()
        if all(before[n][1] == after[n][1] for n in NAMES):
            break  # else a source file changed in between (a shared working tree): again
    assert before == after, "make images rebuilt although no input changed"
