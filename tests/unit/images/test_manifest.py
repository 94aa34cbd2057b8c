"""The signed manifest: canonical bytes, strict parsing of untrusted documents, fuzzing."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.images.manifest import (
    ManifestError,
    Role,
    SignedManifest,
    canonical_json,
    check_version,
    compare_versions,
    from_build_dir,
    parse_signed,
)
from hatchery.images.signing import generate_key, load_private_key, sign
from tests.support.synthetic_images import make_build


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("manifest")
    build = make_build(root, "1.2.3", kernel_size=100, initrd_size=200)
    key = generate_key(root / "keys")
    signed = sign(from_build_dir(build), load_private_key(key.private))
    doc: dict[str, Any] = json.loads(signed.to_bytes())
    return doc


def _raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_a_build_directory_becomes_a_manifest(tmp_path: Path) -> None:
    build = make_build(tmp_path, "2025.1", kernel_size=10, initrd_size=20)
    manifest = from_build_dir(build)
    assert manifest.image == "hypervisor" and manifest.version == "2025.1"
    assert set(manifest.artefacts) == {Role.KERNEL, Role.INITRD}
    assert manifest.artefacts[Role.KERNEL].name == "hypervisor.vmlinuz"
    assert manifest.artefacts[Role.INITRD].size == 20
    assert manifest.build["packages"]["systemd"] == "252.36-1"
    assert "artefacts" not in manifest.build


def test_a_changed_artefact_is_not_signed(tmp_path: Path) -> None:
    build = make_build(tmp_path, "1", kernel_size=10, initrd_size=20)
    (build / "hypervisor.vmlinuz").write_bytes(b"changed after the build")
    with pytest.raises(ManifestError, match="does not match the build"):
        from_build_dir(build)


def test_round_trip_and_canonical_bytes(document: dict[str, Any]) -> None:
    signed = parse_signed(_raw(document))
    again = parse_signed(signed.to_bytes())
    assert again == signed
    # The signed bytes do not depend on how the JSON was laid out.
    reordered = json.dumps(document, indent=7).encode()
    assert parse_signed(reordered).manifest.canonical() == signed.manifest.canonical()
    assert canonical_json({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()
BAD: list[tuple[str, Any, str]] = [
    ("format", 2, "format"),
    ("format", True, "format"),
    ("manifest.version", "../../etc", "version"),
    ("manifest.version", "a/b", "version"),
    ("manifest.version", ".hidden", "version"),
    ("manifest.version", "1..2", "version"),
    ("manifest.version", "", "version"),
    ("manifest.version", "x" * 65, "version"),
    ("manifest.version", 3, "version"),
    ("manifest.image", "a/b", "image"),
    ("manifest.artefacts.kernel.sha256", "ABC", "sha256"),
    ("manifest.artefacts.kernel.sha256", "A" * 64, "sha256"),
    ("manifest.artefacts.kernel.size", -1, "size"),
    ("manifest.artefacts.kernel.size", True, "size"),
    ("manifest.artefacts.kernel.size", 1.5, "size"),
    ("manifest.artefacts.kernel.size", 1 << 41, "size"),
    ("manifest.artefacts.kernel.name", "../vmlinuz", "name"),
    ("manifest.artefacts.kernel.extra", 1, "extra"),
    ("manifest.artefacts.kernel", _DELETE, "kernel is required"),
    ("manifest.artefacts.rootfs", {"name": "x", "sha256": "0" * 64, "size": 1}, "role"),
    ("manifest.build", [], "build"),
    ("manifest.build.ratio", 0.5, "build.ratio"),
    ("manifest.extra", 1, "extra"),
    ("signature.key", "zz", "signature.key"),
    ("signature.ed25519", "not base64!", "base64"),
    ("signature.ed25519", "AAAA", "64 bytes"),
    ("signature", _DELETE, "signature is required"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD)
def test_malformed_documents_are_refused_naming_the_field(
    document: dict[str, Any], path: str, value: Any, message: str
) -> None:
    with pytest.raises(ManifestError, match=message.replace(".", r"\.")):
        parse_signed(_raw(_set(document, path, value)))


def test_oversized_non_json_and_deep_documents_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match="larger"):
        parse_signed(b" " * (5 * 1024 * 1024))
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_signed(b"\xff\xfe")
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_signed(b"[" * 100_000)
    with pytest.raises(ManifestError, match="nested deeper"):
        deep: Any = "x"
        for _ in range(10):
            deep = [deep]
        parse_signed(_raw(_set(document, "manifest.build.d", deep)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_arbitrary_json_never_crashes(value: Any) -> None:
    try:
        parse_signed(json.dumps(value).encode())
    except ManifestError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [
            "format",
            "manifest",
            "manifest.image",
            "manifest.version",
            "manifest.artefacts",
            "manifest.artefacts.kernel",
            "manifest.artefacts.initrd.sha256",
            "manifest.artefacts.initrd.size",
            "manifest.artefacts.kernel.name",
            "manifest.build",
            "signature",
            "signature.key",
            "signature.ed25519",
        ]  # fmt: skip
    ),
    json_values,
)
def test_fuzz_mutated_documents_parse_or_are_refused(
    document: dict[str, Any], path: str, value: Any
) -> None:
    try:
        signed = parse_signed(_raw(_set(document, path, value)))
    except ManifestError:
        return
    # What parses is well-formed: it survives its own round trip and its version is safe.
    assert isinstance(signed, SignedManifest)
    assert parse_signed(signed.to_bytes()) == signed
    assert "/" not in signed.manifest.version and ".." not in signed.manifest.version


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_never_crash(raw: bytes) -> None:
    try:
        parse_signed(raw)
    except ManifestError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=70))
def test_accepted_versions_are_safe_file_names(text: str) -> None:
    try:
        version = check_version(text)
    except ManifestError:
        return
    root = Path("/store/images")
    assert (root / f"{version}.json").resolve().parent == root
    assert not version.startswith(".") and "/" not in version and "\x00" not in version


@pytest.mark.parametrize(
    ("older", "newer"),
    [("v1", "v2"), ("v9", "v10"), ("0.1.9", "0.1.10"), ("1.0~rc1", "1.0"), ("1.0", "1.0+fix1"),
     ("1.0", "1.0a"), ("2026.01.5", "2026.01.12"), ("0.1.0", "0.2.0"), ("1.0~", "1.0~a")],
)  # fmt: skip
def test_versions_are_ordered_like_debian_versions(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1
    assert compare_versions(newer, newer) == 0
