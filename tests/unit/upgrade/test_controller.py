"""The upgrade controller on a directory standing in for the running root."""

from __future__ import annotations

from pathlib import Path

import pytest
import zstandard

from hatchery.state import write_json
from hatchery.upgrade.controller import UpgradeError, Upgrader
from hatchery.upgrade.model import Mode, Phase
from tests.support.upgrade_roots import RELEASE, DirImages, root_image, unpack, wait_done


def version_of(root: Path) -> str:
    text = (root / "usr/lib/os-release").read_text()
    return text.strip().split("=", 1)[1]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, DirImages, Path]:
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    unpack(root_image("v1"), root)
    images = DirImages(tmp_path / "images")
    images.add("v1", root_image("v1"))
    images.add("v2", root_image("v2"))
    images.add("v3", root_image("v3", "6.12.0-new-amd64"), kernel=b"kernel-2")
    return root, images, state


def make(setup: tuple[Path, DirImages, Path]) -> Upgrader:
    root, images, state = setup
    return Upgrader(state, images, root, version=lambda: version_of(root), kernel_release=RELEASE)


async def test_live_upgrade(setup: tuple[Path, DirImages, Path]) -> None:
    root, images, state = setup
    upgrader = make(setup)
    code, answer = await upgrader.request("v2", Mode.LIVE)
    assert code == 202 and answer.state is Phase.RUNNING
    again, _ = await upgrader.request("v2", Mode.LIVE)
    assert again == 202, "the same upgrade asked twice must be accepted, not started twice"
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.DONE, upgrader.status
    assert version_of(root) == "v2" and images.current == "v2"
    assert (root / "usr/lib/payload").read_bytes() == b"payload v2"
    # Persisted: a restarted agent reports the same.
    assert make(setup).status.state is Phase.DONE
    code, answer = await make(setup).request("v2", Mode.LIVE)
    assert code == 200 and answer.detail and "nothing to do" in answer.detail


async def test_refusals(setup: tuple[Path, DirImages, Path]) -> None:
    root, images, state = setup
    images.add("v4", b"not a zstd cpio")
    upgrader = make(setup)
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v4", Mode.LIVE)
    assert err.value.status == 422 and "cannot be read" in err.value.message
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v9", Mode.LIVE)
    assert err.value.status == 404 and "not in this node's store" in err.value.message
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v3", Mode.LIVE)
    assert err.value.status == 422 and "kernel" in err.value.message
    assert upgrader.status.state is Phase.IDLE
    await upgrader.request("v2", Mode.LIVE)
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v1", Mode.LIVE)
    assert err.value.status == 409
    await wait_done(upgrader)


async def test_failure_is_reported_and_rolled_back(setup: tuple[Path, DirImages, Path]) -> None:
    root, images, state = setup
    cut = root_image("v2", extra=b"x" * 5000)[:-3000]  # the modules are read, then it ends
    (images.folder / "v2" / "initrd").write_bytes(zstandard.ZstdCompressor().compress(cut))
    upgrader = make(setup)
    await upgrader.request("v2", Mode.LIVE)
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.FAILED and upgrader.status.error
    assert version_of(root) == "v1"
    assert not [p for p in root.rglob("*") if ".hatchery-" in p.name]


def test_a_restarted_agent_finishes_the_live_patch_keeping_its_detail(
    setup: tuple[Path, DirImages, Path],
) -> None:
    _, _, state = setup
    write_json(state / "upgrade.json", {"state": "running", "target": "v1", "mode": "live",
                                        "detail": "1 replace; restarted: ssh.service"})  # fmt: skip
    upgrader = make(setup)  # the node runs v1: the patch to v1 went through
    assert upgrader.status.state is Phase.DONE
    assert upgrader.status.detail == "1 replace; restarted: ssh.service; the agent came back on v1"


async def test_a_downgrade_is_refused_unless_allowed(setup: tuple[Path, DirImages, Path]) -> None:
    root, images, _ = setup
    upgrader = make(setup)
    await upgrader.request("v2", Mode.LIVE)
    await wait_done(upgrader)
    assert version_of(root) == "v2"
    with pytest.raises(UpgradeError) as err:
        await upgrader.request("v1", Mode.LIVE)
    assert err.value.status == 409
    assert "v1 is older than the running v2" in err.value.message
    assert err.value.hint is not None and "allow_downgrade" in err.value.hint
    assert upgrader.status.target == "v2" and version_of(root) == "v2"
    code, _ = await upgrader.request("v1", Mode.LIVE, allow_downgrade=True)
    assert code == 202
    await wait_done(upgrader)
    assert upgrader.status.state is Phase.DONE and version_of(root) == "v1"
