"""Build ahead what the image tier will build, while the earlier tiers run.

``make test`` (tools/test-tiers.sh) starts this in the background, niced, as the lint+unit
and integration tiers begin: they leave a core idle most of the time, and on a fresh machine
the image tier spent about nine minutes building before its first boot (the base images, the
stock cloud-init guest, the demo's four hypervisor versions). The image tier waits for this
to end, then finds every build cached by its inputs.

Each step is the very call the tests make (so nothing is built twice, or differently), in the
order the image tier needs them. A step that fails is reported and the next one still runs:
the test that needs it builds it again and fails there with the build's own words.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

from hatchery_lab import appliance_kernel, cloud_guest
from hatchery_lab.demo_images import VERSIONS, build_version
from hatchery_lab.images import build_images


def _appliance_kernel() -> None:
    if appliance_kernel.main([]) != 0:
        raise RuntimeError("the appliance kernel build failed (its error is above)")


def steps() -> list[tuple[str, Callable[[], object]]]:
    found: list[tuple[str, Callable[[], object]]] = [
        ("appliance kernel", _appliance_kernel),
        ("make images", build_images),
        ("cloud-init guest", cloud_guest.build_cloud_guest),
    ]
    found += [(f"demo {v}", functools.partial(build_version, v)) for v in VERSIONS]
    return found


def main() -> int:
    failed = 0
    for name, step in steps():
        started = time.monotonic()
        print(f"prebuild: {name} ...", flush=True)
        try:
            step()
        except Exception as exc:  # reported; the image tier builds it again
            print(f"prebuild: {name} FAILED: {exc}", flush=True)
            failed += 1
            continue
        print(f"prebuild: {name} done in {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
