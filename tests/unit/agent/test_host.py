"""The one way to run host commands: its errors name the command and the cause, the async
form keeps the loop free and kills what it cancels; sd_notify over a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from hatchery import host
from hatchery.errors import CommandError

SH = "/bin/sh"


def test_run_gives_the_output() -> None:
    done = host.run([SH, "-c", "echo out; echo err >&2"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    assert host.run([SH, "-c", "exit 3"], check=False).returncode == 3
    assert host.run(["cat"], input="fed\n").stdout == "fed\n"


def test_run_errors_name_the_command_and_the_cause() -> None:
    script = "echo one >&2; echo the reason >&2; exit 4"
    with pytest.raises(CommandError) as err:
        host.run([SH, "-c", script])
    assert err.value.message == f"sh -c {script} exited with 4: one; the reason"
    assert err.value.returncode == 4 and err.value.argv[0] == SH
    with pytest.raises(CommandError, match=r"^no-such-program-here --flag: cannot run: No such"):
        host.run(["no-such-program-here", "--flag"])
    with pytest.raises(CommandError, match=r"^sleep 5: timed out after 0.2s") as err:
        host.run(["sleep", "5"], timeout=0.2)
    assert err.value.returncode is None


async def test_run_async_is_the_same_contract() -> None:
    done = await host.run_async([SH, "-c", "cat; echo err >&2"], input="fed\n")
    assert (done.stdout, done.stderr) == ("fed\n", "err\n")
    with pytest.raises(CommandError, match=r"exited with 2: bad"):
        await host.run_async([SH, "-c", "echo bad >&2; exit 2"])
    with pytest.raises(CommandError, match=r"cannot run"):
        await host.run_async(["no-such-program-here"])
    with pytest.raises(CommandError, match=r"timed out after 0.2s"):
        await host.run_async(["sleep", "5"], timeout=0.2)


async def test_a_cancelled_command_is_killed_and_the_cancel_goes_through(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(host.run_async([SH, "-c", f"echo $$ > {pidfile}; exec sleep 30"]))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped


async def test_failed_units_from_systemctl(tmp_path: Path) -> None:
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        '[ "$*" = "list-units --state=failed --no-legend --plain" ] || exit 9\n'
        "echo 'hatchery-dhcp.service loaded failed failed DHCP'\n"
        "echo 'ssh.service loaded failed failed OpenSSH'\n"
    )
    systemctl.chmod(0o755)
    assert await host.failed_units(str(systemctl)) == ["hatchery-dhcp.service", "ssh.service"]
    systemctl.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    with pytest.raises(CommandError, match="Failed to connect to bus"):
        await host.failed_units(str(systemctl))


def test_notify_sends_one_datagram(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert host.notify("READY=1") is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert host.notify("READY=1") is True
        assert listener.recv(64) == b"READY=1"


_FILL_FDS = """
import errno, os, resource, sys
from hatchery import host
assert host.notify("READY=1")  # the agent opens its notify socket at start
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
for n in range(3):
    assert host.notify(f"WATCHDOG=1 {n}"), "ping lost"
print(len(held))
"""


def test_watchdog_pings_go_out_with_the_fd_table_full(tmp_path: Path) -> None:
    """Issue 14: a flood of connections used up every descriptor and sd_notify, which opened
    a socket per ping, could not ping: systemd killed the agent. Pings need no new fd."""
    import subprocess

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(5)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        done = subprocess.run([sys.executable, "-c", _FILL_FDS], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) > 10  # the table really was filled
        got = [listener.recv(64) for _ in range(4)]
    assert got == [b"READY=1", b"WATCHDOG=1 0", b"WATCHDOG=1 1", b"WATCHDOG=1 2"]


def test_notify_failure_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert host.notify("WATCHDOG=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert host.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert host.watchdog_interval() is None


def test_the_agent_unit_is_named_once() -> None:
    """Modules take the agent's unit from host; only host spells it out."""
    agent = Path(host.__file__).parent
    spelled = [p for p in agent.rglob("*.py") if '"hatchery-agent.service"' in p.read_text()]
    assert spelled == [Path(host.__file__)], spelled
    assert sys.modules["hatchery.host"].AGENT_UNIT == "hatchery-agent.service"


def test_agent_unit_has_room_for_the_connection_caps() -> None:
    """The unit's fd limit holds several listeners' total caps (API, metadata and boot HTTP
    of a few bridges) with room to spare; the default soft limit of 1024 does not."""
    from hatchery.config import ConnectionLimits

    unit = Path(__file__).parents[3] / "images/hypervisor/mkosi.extra/usr/lib/systemd/system"
    text = (unit / host.AGENT_UNIT).read_text()
    limit = next(int(line.split("=", 1)[1]) for line in text.splitlines()
                 if line.startswith("LimitNOFILE="))  # fmt: skip
    assert limit >= 16 * ConnectionLimits().total
