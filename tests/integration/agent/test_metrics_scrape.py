"""``GET /metrics`` of a real agent, checked by promtool and scraped by a real Prometheus.

The agent runs as a subprocess on loopback (no bridges); a client with the ``ops`` group
(``health.read``) makes some traffic, Debian's ``promtool check metrics`` lints the
exposition, and a Prometheus server started here on loopback scrapes the agent over mutual
TLS with its own client certificate and answers queries for the agent's series.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hatchery_lab.agent import AgentProcess, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess.bare(tmp_path) as proc:
        yield proc


def _curl(agent: AgentProcess, path: str, client: str) -> subprocess.CompletedProcess[str]:
    pair = agent.pki.clients[client]
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(agent.pki.ca), "--cert", str(pair.cert), "--key",
         str(pair.key), "-w", "\n%{http_code}", f"https://127.0.0.1:{agent.port}{path}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip


def _status(result: subprocess.CompletedProcess[str]) -> int:
    return int(result.stdout.rsplit("\n", 1)[1])


def test_metrics_pass_promtool_and_count_requests(
    agent: AgentProcess, require_tool: Callable[[str], str]
) -> None:
    promtool = require_tool("promtool")
    agent.pki.client("monitor", "ops")
    agent.pki.client("tenant", "tenant-a")
    for _ in range(3):
        assert _status(_curl(agent, "/healthz", "monitor")) == 200
    assert _status(_curl(agent, "/v1/vms/nope", "monitor")) == 404
    assert _status(_curl(agent, "/no/such/route", "monitor")) == 404
    assert _status(_curl(agent, "/metrics", "tenant")) == 403  # no health.read
    scraped = _curl(agent, "/metrics", "monitor")
    assert _status(scraped) == 200
    text = scraped.stdout.rsplit("\n", 1)[0]
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    lines = text.splitlines()
    api = 'hatchery_http_requests_total{bridge="",route="%s",server="api",status="%d"} %.1f'
    assert api % ("/healthz", 200, 3) in lines
    assert api % ("/v1/vms/{name}", 404, 1) in lines
    assert api % ("/metrics", 403, 1) in lines
    # An unknown path is "other", never the path a client sent: clients cannot make series.
    assert api % ("other", 404, 1) in lines
    assert not any("/no/such/route" in line for line in lines)
    bucket = 'hatchery_http_request_duration_seconds_bucket{le="0.1",route="/healthz",server="api"}'
    assert any(line.startswith(bucket) for line in lines)
    assert 'hatchery_vms{state="running"} 0.0' in lines
    accepted = 'hatchery_http_connections_total{bridge="",outcome="accepted",server="api"}'
    assert any(line.startswith(accepted) for line in lines)


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        answer = json.load(resp)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_a_real_prometheus_scrapes_the_agent(
    agent: AgentProcess, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    scraper = agent.pki.client("prometheus", "ops")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "hatchery",
            "scheme": "https",
            "tls_config": {"ca_file": str(agent.pki.ca), "cert_file": str(scraper.cert),
                           "key_file": str(scraper.key)},
            "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}],
        }],
    }))  # fmt: skip
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                up = _query(port, 'up{job="hatchery"}')
                seen = _query(port, 'hatchery_http_requests_total{route="/metrics",status="200"}')
            except OSError:
                up, seen = [], []
            if up and up[0]["value"][1] == "1" and seen:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"no scrape: up={up}\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            )
        vms = _query(port, 'hatchery_vms{state="running"}')
        assert vms and vms[0]["value"][1] == "0", vms
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
