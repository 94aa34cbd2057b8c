"""The image routes on a real ``hatchery-agent``: its store under <state_dir>/images."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery.images.signing import generate_key
from hatchery_lab.agent import AgentProcess
from tests.support.synthetic_images import signed_build


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess.bare(tmp_path) as proc:
        yield proc


def test_the_agent_serves_its_store_and_refuses_untrusted_images(
    agent: AgentProcess, tmp_path: Path
) -> None:
    assert agent.cli_json("image", "list") == {"images": [], "current": None, "previous": None}
    key = generate_key(tmp_path / "signing")
    build, _ = signed_build(tmp_path / "builds", "1.0", key)
    # The node does not trust this key (it is in no /etc/hatchery/image-keys): the objects are
    # uploaded and verified, the manifest is refused, and no image appears.
    refused = agent.cli("image", "publish", str(build), check=False)
    assert refused.returncode == 1 and "does not trust" in refused.stderr
    assert "hint: install its public key" in refused.stderr  # the error body's hint, printed
    store = agent.state_dir / "images"
    assert len(list((store / "objects").glob("*/*.raw"))) == 2  # random content: kept as is
    assert list((store / "images").iterdir()) == []
    listing = json.loads(agent.cli("image", "list", "--json").stdout)
    assert listing["images"] == []
