"""Run benchmarks: ``python -m bench`` (all) or ``python -m bench NAME ...``."""

from __future__ import annotations

import importlib
import signal
import sys

# name -> module with a ``run() -> None`` that writes its section of docs/benchmarks.md
BENCHMARKS = {
    "agent-overhead": "bench.agent_overhead",
    "appliance": "bench.appliance",
    "boot-http": "bench.boothttp",
    "container": "bench.container",
    "dhcp": "bench.dhcp",
    "flood": "bench.flood",
    "images": "bench.images",
    "kernel-boot": "bench.kernel_boot",
    "metadata": "bench.metadata",
    "pool": "bench.pool",
    "pxe-chain": "bench.pxe",
    "rollout": "bench.rollout",
    "storm": "bench.storm",
    "tftp": "bench.tftp",
    "upgrade": "bench.upgrade",
    "vm-pause": "bench.vm_pause",
}


def _exit_on_term(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like an error: every bench's context managers remove the namespaces,
    bridges and servers it made (a killed bench once left a namespace and its dnsmasq)."""
    sys.exit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"==> bench {name}", flush=True)
        importlib.import_module(BENCHMARKS[name]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
