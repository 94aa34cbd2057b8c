"""``make demo``: Hatchery's main job, grown one capability at a time.

Today it shows what exists: the accelerator choice, the agent starting and stopping cleanly,
and a direct-kernel-boot guest. Each step prints its duration; the summary table at the end
is what docs/demo.md quotes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hatchery.qemu.accel import choose_accel  # noqa: E402
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, build_argv  # noqa: E402
from tests.support.guest import (  # noqa: E402
    INIT_PRELUDE,
    busybox_initramfs,
    find_guest_kernel,
    run_guest,
)

BIN = Path(sys.executable).parent


def step(title: str, results: list[tuple[str, float, str]], fn: Callable[[], str]) -> None:
    print(f"\n==> {title}", flush=True)
    start = time.monotonic()
    outcome = fn()
    took = time.monotonic() - start
    print(f"    {outcome} ({took:.1f} s)", flush=True)
    results.append((title, took, outcome))


def show_accel() -> str:
    choice = choose_accel()
    return f"{choice.accel}: {choice.reason}"


def agent_start_stop(workdir: Path) -> str:
    config = workdir / "agent.yaml"
    config.write_text(f"state_dir: {workdir / 'state'}\nlisten: 127.0.0.1:16976\n")
    proc = subprocess.Popen(
        [str(BIN / "hatchery-agent"), "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            print(f"    agent: {line.rstrip()}")
            if "agent ready" in line or time.monotonic() > deadline:
                break
        proc.terminate()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise SystemExit(f"demo: the agent exited with {code}")
    return f"agent ready, then stopped cleanly on SIGTERM (pid {proc.pid})"


def boot_guest(workdir: Path) -> str:
    kernel = find_guest_kernel()
    if kernel is None:
        raise SystemExit("demo: no guest kernel (make guest-kernel)")
    initrd = workdir / "initrd"
    initrd.write_bytes(busybox_initramfs(INIT_PRELUDE + 'echo "DEMO-GUEST-UP $(uname -r)"\n'))
    spec = GuestSpec(
        name="demo-guest",
        accel=choose_accel(),
        boot=DirectKernel(kernel.vmlinux(), initrd, "console=ttyS0 panic=-1 quiet"),
        extra=("-no-reboot",),
    )
    with run_guest(build_argv(spec)) as guest:
        seconds = guest.wait_for(b"DEMO-GUEST-UP", timeout=120)
    return f"vmlinux direct boot reached /init in {seconds:.1f} s"


def main() -> int:
    results: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="hatchery-demo-") as tmp:
        workdir = Path(tmp)
        step("1. choose the QEMU accelerator", results, show_accel)
        step("2. start and stop the agent", results, lambda: agent_start_stop(workdir))
        step("3. boot a guest by direct kernel boot", results, lambda: boot_guest(workdir))
    print("\nsummary")
    for title, took, outcome in results:
        print(f"  {title:<42} {took:6.1f} s  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
