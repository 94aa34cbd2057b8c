"""Log lines written to the journal carry their priority (``<N>``), not a time and a level.

On main every agent line reached the journal as priority 6 (info), its level only inside
the text: ``journalctl -p warning`` and ``hatchery logs --json``'s ``level`` never showed
an agent warning or error. A real program's stderr, as systemd would connect it: the
journal's stream is recognised by ``JOURNAL_STREAM`` naming stderr's device and inode (the
image tier's demo reads the priorities back from a node's real journal).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import logging
from hatchery.log import setup_logging
setup_logging()
log = logging.getLogger("hatchery.test")
log.info("an info line")
log.warning("a warning")
log.info("a name someone chose: %s", "x\\n<0>forged emergency")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("an error with its traceback")
"""


def _run(stderr_path: Path, journal_stream: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with stderr_path.open("wb") as err:
        if journal_stream == "this file":
            seen = os.fstat(err.fileno())
            journal_stream = f"{seen.st_dev}:{seen.st_ino}"
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=err, env=env, check=True)
    return stderr_path.read_text().splitlines()


def test_lines_to_the_journal_carry_their_priority(tmp_path: Path) -> None:
    lines = _run(tmp_path / "stderr", "this file")
    assert lines[0] == "<6>hatchery.test: an info line"
    assert lines[1] == "<4>hatchery.test: a warning"
    # A newline in a value the agent logs cannot start a line of another priority: the
    # journal reads the first prefix only (an injected <0> would be an emergency, broadcast to
    # every terminal; before, such a line had none of its own, so the injected one counted).
    assert lines[2:4] == ["<6>hatchery.test: a name someone chose: x", "<6><0>forged emergency"]
    assert lines[4] == "<3>hatchery.test: an error with its traceback"
    assert len(lines) > 6 and all(line.startswith("<3>") for line in lines[4:])
    assert lines[-1] == "<3>ValueError: boom"


def test_plain_lines_elsewhere(tmp_path: Path) -> None:
    """Another stream named in JOURNAL_STREAM (a child whose stderr was redirected inherits
    the variable) and no variable at all: a time and a level, no prefix."""
    for stream in ("1:2", None):
        lines = _run(tmp_path / "stderr", stream)
        assert " INFO hatchery.test: an info line" in lines[0]
        assert " WARNING hatchery.test: a warning" in lines[1]
        assert not any(line.startswith(("<3>", "<4>", "<6>")) for line in lines)
