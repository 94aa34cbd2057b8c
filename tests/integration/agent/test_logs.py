"""``hatchery logs`` against a real agent over mutual TLS (issue 17).

This machine's PID 1 is not systemd, so the agent serves its own recent lines (the journal
is read where systemd runs: ``hatchery.logs``). A follow sees a line logged after it began;
a unit name that is not one is refused with a 400 before anything runs; a certificate
without ``node.logs.read`` (a reader, whose ``*.read`` does not cover it) gets a 403.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery_lab.agent import BIN, AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess.bare(tmp_path_factory.mktemp("logs")) as running:
        running.pki.client("otto", "ops")
        running.pki.client("rita", "reader")
        yield running


def _argv(agent: AgentProcess, client: str, *args: str) -> list[str]:
    pair = agent.pki.client("admin", "admin") if client == "admin" else agent.pki.clients[client]
    return [str(BIN / "hatchery"), "logs", *args, "--agent", f"127.0.0.1:{agent.port}",
            "--ca", str(agent.pki.ca), "--cert", str(pair.cert),
            "--key", str(pair.key)]  # fmt: skip


def test_logs_show_the_agents_lines(agent: AgentProcess) -> None:
    text = agent.cli("logs", "--lines", "2000").stdout
    assert "agent ready" in text and "hatchery-agent.service" in text
    entries = [json.loads(line) for line in agent.cli("logs", "--json").stdout.splitlines()]
    assert entries and all(e["unit"] == "hatchery-agent.service" for e in entries)
    assert any("reads the node's logs" in e["message"] for e in entries)
    future = agent.cli("logs", "--since", "2099-01-01T00:00:00").stdout
    assert future == ""


def test_follow_sees_a_new_line(agent: AgentProcess, tmp_path: Path) -> None:
    out = tmp_path / "follow.out"
    with out.open("wb") as sink:
        # The last 50 lines hold its own request's line even with --debug lines logged after
        # it (with --lines 1 they can push it out of the first answer, and nothing new comes).
        follower = subprocess.Popen(_argv(agent, "admin", "--follow", "--json", "--lines", "50"),
                                    stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"reads the node's logs" not in out.read_bytes():  # its own request, first
            assert follower.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        agent.cli("logs", "--lines", "1", client="otto")  # ops: logs one more line
        while b"otto reads the node's logs" not in out.read_bytes():
            assert follower.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
    finally:
        os.kill(follower.pid, signal.SIGINT)
        follower.wait(timeout=30)
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
    assert any(e["message"].startswith("otto reads") for e in lines)


def test_a_follow_outlives_the_agents_restart(agent: AgentProcess, tmp_path: Path) -> None:
    """The agent stops at once with a follow open (on main the follow held its stop for two
    minutes, past systemd's patience: a live patch or a reboot waited on an operator's
    terminal), and the follow goes on with the next agent's lines."""
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    with out.open("wb") as sink, err.open("wb") as errors:
        follower = subprocess.Popen(_argv(agent, "admin", "--follow", "--lines", "50"),
                                    stdout=sink, stderr=errors,
                                    start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"reads the node's logs" not in out.read_bytes():
            assert follower.poll() is None, err.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        agent.kill(signal.SIGTERM)  # waits for the agent's exit: 30 s at most
        before = out.read_bytes().count(b"otto reads the node's logs")
        agent.start()
        agent.cli("logs", "--lines", "1", client="otto")  # a line only the new agent logged
        while out.read_bytes().count(b"otto reads the node's logs") == before:
            assert follower.poll() is None, err.read_text()
            assert time.monotonic() < deadline, out.read_text() + err.read_text()
            time.sleep(0.2)
    finally:
        os.kill(follower.pid, signal.SIGINT)
        follower.wait(timeout=30)
    assert follower.returncode == 0, err.read_text()
    assert "asking again every" in err.read_text() and "answers again" in err.read_text()


@pytest.mark.parametrize("unit", ["x;rm", "$(touch /tmp/pwned)", "-f", "a b"])
def test_a_bad_unit_is_refused(agent: AgentProcess, unit: str) -> None:
    result = agent.cli("logs", f"--unit={unit}", check=False)
    assert result.returncode == 1
    assert "HTTP 400" in result.stderr and "not a systemd unit name" in result.stderr
    assert not Path("/tmp/pwned").exists()


def test_a_reader_may_not_read_logs(agent: AgentProcess) -> None:
    result = agent.cli("logs", client="rita", check=False)
    assert result.returncode == 1
    assert "HTTP 403" in result.stderr and "may not node.logs.read" in result.stderr
    assert agent.cli("logs", "--lines", "1", client="otto").returncode == 0


def test_another_unit_needs_a_journal(agent: AgentProcess) -> None:
    result = agent.cli("logs", "--unit", "ssh.service", check=False)
    assert result.returncode == 1 and "no journal" in result.stderr
