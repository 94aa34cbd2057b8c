"""Issue 4: the whole story, as `make demo` runs it, with each step's observable result."""

from __future__ import annotations

from pathlib import Path

from hatchery_lab.story import run_story


def test_the_whole_story(images: Path, tmp_path: Path) -> None:
    story = run_story(tmp_path / "story")
    facts = story.facts
    assert [s.title[:2] for s in story.steps] == ["1.", "2.", "3.", "4.", "5."]
    assert facts["vm_lease"], "the appliance VM got no DHCP lease from node B's agent"
    assert facts["vm_identity"], "the appliance VM got no identity from the metadata service"
    assert facts["versions"] == ["v2", "v2"]
    before, after = facts["vm"], facts["vm_after"]
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert after["uptime"] > 0
