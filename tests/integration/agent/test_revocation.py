"""Certificate revocation with a real ``hatchery-agent``, the ``hatchery ca`` CLI and curl
(issue 14: no revocation on main, and leaves lived 397 days).

An operator revokes a client certificate, pushes the CRL with ``hatchery ca push-crl``
(``PUT /v1/pki/crl``); from then on the agent refuses that certificate at the TLS
handshake while another still works. The route takes only a newer CRL of the node's CA, and
only from an admin. A CRL copied into place (``tls.crl``) is picked up without a restart.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from hatchery import pki
from hatchery_lab.agent import BIN, AgentProcess, Pki


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess.bare(tmp_path) as proc:
        yield proc


def _serial(pair: pki.IssuedPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def _curl(agent: AgentProcess, pair: pki.IssuedPair, path: str = "/v1/pool") -> str:
    """The HTTP status curl got with ``pair``'s certificate, "000" if the handshake failed."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20",
         "--cacert", str(agent.pki.ca), "--cert", str(pair.cert), "--key", str(pair.key),
         f"https://127.0.0.1:{agent.port}{path}"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert (result.stdout == "000") == (result.returncode != 0), result
    return result.stdout


def _ca(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hatchery"), "ca", *args, "--dir", str(agent.pki.root / "ca")],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip


def _push(
    agent: AgentProcess, client: str, crl: Path | None = None
) -> subprocess.CompletedProcess[str]:
    pair = agent.pki.clients[client]
    extra = ["--crl", str(crl)] if crl is not None else []
    creds = ["--ca", str(agent.pki.ca), "--cert", str(pair.cert), "--key", str(pair.key)]
    return _ca(agent, "push-crl", *extra, "--agent", f"127.0.0.1:{agent.port}", *creds)


def test_a_revoked_certificate_is_refused_at_the_handshake_after_the_push(
    agent: AgentProcess, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    require_tool("curl")
    alice = agent.pki.client("alice", "admin")
    bob = agent.pki.client("bob", "admin")
    tenant = agent.pki.client("tenant", "web")
    agent.pki.client("ops", "ops")
    assert _curl(agent, alice) == "200" and _curl(agent, bob) == "200"
    assert "no CRL at" in agent.log_path.read_text(), "a node without a CRL says so at start"

    revoked = _ca(agent, "revoke", str(alice.cert), "--reason", "key_compromise")
    assert revoked.returncode == 0, revoked.stderr
    crl = agent.pki.root / "ca" / pki.CRL_FILE
    first = tmp_path / "crl-1.pem"
    first.write_bytes(crl.read_bytes())
    assert _curl(agent, alice) == "200", "nothing changes on the node before the push"

    # Not an admin: refused, whatever the body says.
    for who in ("tenant", "ops"):
        refused = _push(agent, who)
        assert refused.returncode != 0 and "HTTP 403" in refused.stderr, refused.stderr
    assert _curl(agent, alice) == "200"
    assert _curl(agent, tenant, "/v1/pki/crl") == "403"  # pki.read: not a tenant's either

    pushed = _push(agent, "bob")
    assert pushed.returncode == 0, pushed.stderr
    assert "CRL number 1 in force (1 revoked" in pushed.stdout
    assert _curl(agent, alice) == "000", "the revoked certificate is refused at the handshake"
    assert _curl(agent, bob) == "200" and _curl(agent, tenant, "/v1/vms") == "200"

    # The same or an older CRL cannot replace the one in force (409).
    assert "HTTP 409" in _push(agent, "bob").stderr
    assert _ca(agent, "crl").returncode == 0
    assert _push(agent, "bob").returncode == 0
    stale = _push(agent, "bob", first)
    assert stale.returncode != 0 and "HTTP 409" in stale.stderr, stale.stderr
    assert _curl(agent, alice) == "000"

    # A CRL signed by another CA, however new: refused (422), nothing changes.
    other = Pki.make(tmp_path / "other")
    for _ in range(5):
        pki.issue_crl(other.root / "ca")
    foreign = _push(agent, "bob", other.root / "ca" / pki.CRL_FILE)
    assert foreign.returncode != 0 and "HTTP 422" in foreign.stderr, foreign.stderr
    assert _curl(agent, alice) == "000" and _curl(agent, bob) == "200"


def test_a_crl_copied_into_place_is_picked_up_without_a_restart(
    agent: AgentProcess, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    require_tool("curl")
    carol = agent.pki.client("carol", "admin")
    dave = agent.pki.client("dave", "admin")
    assert _curl(agent, carol) == "200"
    assert _ca(agent, "revoke", f"{_serial(carol):x}").returncode == 0
    target = tmp_path / "tls" / "crl.pem"  # tls.crl in the lab's config
    target.parent.mkdir(exist_ok=True)
    shutil.copy(agent.pki.root / "ca" / pki.CRL_FILE, target)
    deadline = time.monotonic() + 30
    while _curl(agent, carol) != "000":
        assert time.monotonic() < deadline, "the agent did not reload the CRL"
        time.sleep(0.5)
    assert _curl(agent, dave) == "200"
    assert agent.proc is not None and agent.proc.poll() is None
