"""Images: build times, sizes, and the hypervisor's boot time.

* Build time of both images: cold (``--force --no-incremental``: every package unpacked and
  configured again, from the kept package cache), warm (``--force``: mkosi's cached
  package-installed tree reused) and no-op (inputs unchanged: nothing is built).
* Sizes of the artefacts, from the build manifests.
* (The appliance VM's boot has its own bench: ``python -m bench appliance``.)
* Hypervisor: QEMU start to the agent active (self-check marker) with a provisioned data disk,
  for the live root (the default) and for the layout before it (``--root-layout cpio``, mkosi's
  whole root unpacked into RAM), booted in turn; with the RAM each root holds and the node's
  available memory after boot, as its self-check reports them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import median, table, write_section
from hatchery import pki
from hatchery.qemu.accel import choose_accel
from hatchery_lab.guest import run_guest
from hatchery_lab.images import (
    build_images,
    hypervisor_argv,
    manifest,
)

HYPERVISOR_RUNS = int(os.environ.get("BENCH_HYPERVISOR_RUNS", "3"))
#: The units on the agent's way whose times the self-check reports (guest clock).
BOOT_UNITS = ("systemd-journald", "hatchery-data", "hatchery-agent")


def _timed_build(*args: str) -> float:
    started = time.monotonic()
    build_images(*args)
    return time.monotonic() - started


def _provisioned_disk(path: Path, workdir: Path) -> None:
    """A data disk as an operator prepares it: GPT, ext4 labelled hatchery-data, TLS files."""
    tree = workdir / "data"
    tls = tree / "etc" / "hatchery" / "tls"
    tls.mkdir(parents=True)
    pki.init_ca(workdir / "ca")
    pair = pki.issue(workdir / "ca", "agent", workdir / "issued", server_names=("localhost",))
    shutil.copy(workdir / "ca" / pki.CA_CERT, tls / "ca.pem")
    shutil.copy(pair.cert, tls / "agent.pem")
    shutil.copy(pair.key, tls / "agent.key")
    subprocess.run(["truncate", "-s", "512M", str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, text=True,
                   input="label: gpt\nstart=2048, type=linux, name=hatchery-data\n")  # fmt: skip
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "hatchery-data", "-E", "offset=1048576",
                    "-d", str(tree), str(path), "500M"], check=True)  # fmt: skip


def _hypervisor_boot(images: Path, disk: Path) -> dict[str, float]:
    """Seconds to the agent active, and MB: the root's RAM (image + writes for the live root,
    the unpacked tree for cpio) and MemAvailable, from the self-check's facts."""
    argv = hypervisor_argv(images, disk, "hatchery.selfcheck=1 hatchery.selfcheck-poweroff=1")
    with run_guest(argv) as guest:
        agent = guest.wait_for(b"HATCHERY-CHECK: agent ", 900)
        guest.wait_for(b"HATCHERY-CHECK-STATUS: ", 300)
        text = bytes(guest.output)
        if b"HATCHERY-CHECK: agent active" not in text:
            raise RuntimeError("agent not active:\n" + text[-3000:].decode(errors="replace"))
        guest.wait_for(b"reboot: Power down", 300)
    root = re.search(rb"HATCHERY-CHECK: root-ram ([^\r\n]*)", text)
    memory = re.search(rb"MemAvailable:=(\d+)MB", text)
    if root is None or memory is None:
        raise RuntimeError("the self-check reported no root-ram or memory fact")
    sizes = [int(n) for n in re.findall(rb"=(\d+)MB", root.group(1))]
    units = re.findall(rb"HATCHERY-CHECK: boot-unit (\S+) start=([\d.]+)s active=([\d.]+)s", text)
    return {
        "agent_marker": agent,
        "root_mb": float(sum(sizes)),
        "available_mb": float(memory.group(1)),
        **{f"unit:{name.decode()}": float(active) for name, _, active in units},
        **{f"start:{name.decode()}": float(start) for name, start, _ in units},
        **_agent_load(text, agent),
    }


def _agent_load(text: bytes, agent_marker: float) -> dict[str, float]:
    """The agent's loading on this boot (its own log line, as the self-check reports it) and
    the time from QEMU's start to the kernel's (the host's time of the self-check's marker
    less the kernel's stamp on that line): what a boot cannot be shorter than while loading
    the agent is the longest way to ready."""
    load = re.search(rb"HATCHERY-CHECK: agent-load in ([\d.]+) s \(([\d.]+) s of CPU", text)
    stamp = re.search(rb"\[\s*([\d.]+)\] selfcheck\[\d+\]: HATCHERY-CHECK: agent active", text)
    if load is None or stamp is None:
        return {}
    return {"agent_load_s": float(load.group(1)), "agent_load_cpu_s": float(load.group(2)),
            "before_kernel_s": agent_marker - float(stamp.group(1))}  # fmt: skip


def _floor(boots: list[dict[str, float]]) -> str:
    """The boot's two floors: while the agent's loading is its longest way (QEMU start →
    kernel, kernel → the agent's unit started, and the loading's own CPU, as if it had a vCPU
    to itself and nothing after it took time), and the boot the agent waits for (QEMU start →
    kernel, then networkd active)."""
    keys = ("before_kernel_s", "start:hatchery-agent", "agent_load_cpu_s")
    if not boots or not all(k in b for b in boots for k in (*keys, "unit:systemd-networkd")):
        return ""
    parts = [median([b[k] for b in boots]) for k in keys]
    networkd = median([b["unit:systemd-networkd"] for b in boots])
    return (f"Of that, {parts[0]:.1f} s passed before the kernel started (the firmware, the "
            f"kernel unpacking itself), the agent's unit started {parts[1]:.1f} s into the "
            f"kernel's time, and loading the agent took {parts[2]:.1f} s of its own CPU "
            f"(medians): a boot cannot reach the agent sooner than {sum(parts):.1f} s while "
            "that loading is its longest way. The other way, the boot the agent waits for, "
            f"had networkd (its gate's last step) active at {networkd:.1f} s of the kernel's "
            f"time, {parts[0] + networkd:.1f} s after QEMU's start.")  # fmt: skip


def run() -> None:
    accel = choose_accel()
    print("building (no-op if up to date)...", flush=True)
    images = build_images()
    for _ in range(3):  # a shared working tree: retry if a source file changed meanwhile
        before = {n: manifest(images, n)["inputs_sha256"] for n in ("hypervisor", "appliance-vm")}
        noop = _timed_build()
        if before == {n: manifest(images, n)["inputs_sha256"] for n in before}:
            break
    print("cold build (--force --no-incremental)...", flush=True)
    cold = _timed_build("--force", "--no-incremental")
    names = ("hypervisor", "appliance-vm")
    cold_sums = {n: manifest(images, n)["artefacts"] for n in names}
    cold_inputs = {n: manifest(images, n)["inputs_sha256"] for n in names}
    print("warm build (--force)...", flush=True)
    warm = _timed_build("--force")
    identical = all(manifest(images, n)["artefacts"] == sums for n, sums in cold_sums.items())

    sizes = []
    for name in ("hypervisor", "appliance-vm"):
        for artefact, meta in sorted(manifest(images, name)["artefacts"].items()):  # type: ignore[union-attr]
            sizes.append((name, artefact, f"{meta['bytes'] / 1e6:.1f}"))

    boots: dict[str, list[dict[str, float]]] = {"squashfs": [], "cpio": []}
    with tempfile.TemporaryDirectory() as tmp:
        print("the cpio layout, for comparison (--root-layout cpio)...", flush=True)
        layouts = {"squashfs": images,
                   "cpio": build_images("hypervisor", "--root-layout", "cpio",
                                        output_dir=Path(tmp) / "cpio")}  # fmt: skip
        for index in range(HYPERVISOR_RUNS):
            for layout, built in layouts.items():  # interleaved: the load hits both alike
                disk = Path(tmp) / f"data-{layout}{index}.img"
                _provisioned_disk(disk, Path(tmp) / f"w-{layout}{index}")
                boots[layout].append(_hypervisor_boot(built, disk))
                print(f"hypervisor {layout} run {index + 1}: {boots[layout][-1]}", flush=True)
        initrd_mb = {layout: (built / "hypervisor" / "hypervisor.cpio.zst").stat().st_size / 1e6
                     for layout, built in layouts.items()}  # fmt: skip
    hv_times = [b["agent_marker"] for b in boots["squashfs"]]

    def med(layout: str, key: str) -> float:
        return median([b[key] for b in boots[layout]])

    measures = [
        ("QEMU start → agent active, s", "agent_marker", 1),
        ("RAM held by the root file system, MB", "root_mb", 0),
        ("MemAvailable after boot (2 GiB node), MB", "available_mb", 0),
        *[(f"`{unit}` active, s after the kernel started", f"unit:{unit}", 1)
          for unit in BOOT_UNITS],
        ("the agent's loading, s from its process's start", "agent_load_s", 1),
        ("… of which its own CPU, s", "agent_load_cpu_s", 1),
    ]  # fmt: skip
    layout_rows = [
        (label, f"{med('cpio', key):.{digits}f}", f"{med('squashfs', key):.{digits}f}",
         f"{med('squashfs', key) / med('cpio', key):.2f}")
        for label, key, digits in measures
        if all(key in b for runs in boots.values() for b in runs)  # a self-check may not say
    ]  # fmt: skip
    layout_rows.append(("`hypervisor.cpio.zst`, MB", f"{initrd_mb['cpio']:.1f}",
                        f"{initrd_mb['squashfs']:.1f}",
                        f"{initrd_mb['squashfs'] / initrd_mb['cpio']:.2f}"))  # fmt: skip

    build_table = table(
        ["build", "seconds"],
        [
            ("cold: `--force --no-incremental` (every package installed again)", f"{cold:.0f}"),
            ("warm: `--force` (mkosi's cached package tree reused)", f"{warm:.0f}"),
            ("no-op: inputs unchanged (`make images` again)", f"{noop:.1f}"),
        ],
    )
    same = "the same" if identical else "DIFFERENT"
    if any(manifest(images, n)["inputs_sha256"] != cold_inputs[n] for n in names):
        same = "(not comparable: a source file changed between the two builds)"
    body = f"""Accelerator {accel.accel} ({accel.reason}). The machine is shared: absolute figures
move with its load, the ratios measured side by side are what to compare.

**Builds** (both images, sequential; the package cache in `.cache/mkosi/` kept, as in CI):

{build_table}

The cold and the warm build gave {same} sha256 for every artefact.

**Artefacts**:

{table(["image", "artefact", "MB"], sizes)}

**Appliance VM boot**: see its own section (`python -m bench appliance`).

**Hypervisor boot** with a provisioned data disk (2 vCPUs, 2 GiB), QEMU start to the self-check
reporting the agent active (an upper bound on agent readiness), {HYPERVISOR_RUNS} runs:
median {median(hv_times):.1f} s (min {min(hv_times):.1f}, max {max(hv_times):.1f}).
{_floor(boots["squashfs"])}

**Root layouts side by side** (medians of {HYPERVISOR_RUNS} interleaved boots each): mkosi's
cpio unpacked whole into RAM, against the live root (squashfs image kept in RAM, tmpfs overlay
for writes; docs/images.md, "The live root"):

{table(["measure", "cpio root", "live root", "live / cpio"], layout_rows)}
"""
    write_section("images", "Images: builds, sizes, hypervisor boot", body)
    print(body)
