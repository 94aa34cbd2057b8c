"""Issue 14's connection flood against a real ``hatchery-agent``, on loopback.

One client opens 2 000 idle connections to the API; a second client's ``/healthz`` must still
be answered, the connections over the per-client cap must be closed by the agent, and the
agent's log must stay quiet (before the fix: a timed-out request and ~500k log lines). How
fast the second client is answered is a performance goal, measured by ``bench/flood.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchery.config import ConnectionLimits
from hatchery_lab import flood
from hatchery_lab.agent import AgentProcess

HELD = 2000


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess.bare(tmp_path) as proc:
        yield proc


def test_idle_connections_from_one_client_do_not_starve_another(agent: AgentProcess) -> None:
    flood.timed_healthz(agent.port, agent.pki)  # answered before the flood
    lines_before = len(agent.log_path.read_text().splitlines())
    with flood.holding(agent.port, HELD) as held:
        closed = flood.closed_by_server(held, wait=5.0)
        flood.timed_healthz(agent.port, agent.pki)  # a second client is still answered
        lines_during = agent.log_path.read_text().splitlines()[lines_before:]
    assert closed >= HELD - ConnectionLimits().per_client
    # At most a summary line or two, not a line per connection (the agent runs with --debug).
    assert len(lines_during) <= 5, lines_during
