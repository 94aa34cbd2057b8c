"""Images: build times, sizes, and boot times of the appliance VM and the hypervisor.

* Build time of both images: cold (``--force --no-incremental``: every package unpacked and
  configured again, from the kept package cache), warm (``--force``: mkosi's cached
  package-installed tree reused) and no-op (inputs unchanged: nothing is built).
* Sizes of the artefacts, from the build manifests.
* Appliance VM, QEMU start to its DHCP lease (dnsmasq on a private bridge): ours (uncompressed
  vmlinux through PVH, q35, ``-nodefaults``) against a SmallStack-style baseline (the stock
  bzImage, ``pc`` machine, QEMU's default devices), interleaved, with the guest's own
  breakdown (kernel until /init, modules, DHCP).
* Hypervisor: QEMU start to the agent active (self-check marker) with a provisioned data disk.
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
    LEASE_MARKER,
    appliance_argv,
    appliance_lan,
    build_images,
    hypervisor_argv,
    manifest,
)

APPLIANCE_RUNS = int(os.environ.get("BENCH_APPLIANCE_RUNS", "10"))
HYPERVISOR_RUNS = int(os.environ.get("BENCH_HYPERVISOR_RUNS", "3"))
UPTIME = re.compile(rb"HATCHERY-APPLIANCE: (init|modules|lease) .*?uptime=([0-9.]+)")


def _timed_build(*args: str) -> float:
    started = time.monotonic()
    build_images(*args)
    return time.monotonic() - started


def _appliance_boot(images: Path, lan_factory: object, variant: str) -> dict[str, float]:
    """Seconds from QEMU start to the lease marker, plus the guest's uptime at each step."""
    assert callable(lan_factory)
    with tempfile.TemporaryDirectory() as tmp, lan_factory(Path(tmp)) as lan:
        if variant == "ours":
            argv = appliance_argv(images, lan)
        else:
            argv = appliance_argv(images, lan, kernel="vmlinuz", machine="pc", default_devices=True)
        with run_guest(argv) as guest:
            lease = guest.wait_for(LEASE_MARKER, 300)
            guest.wait_for(b"HATCHERY-APPLIANCE: ready", 300)
            result = {"lease": lease}
            for step, uptime in UPTIME.findall(bytes(guest.output)):
                result[f"uptime_{step.decode()}"] = float(uptime)
    return result


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
    argv = hypervisor_argv(images, disk, "hatchery.selfcheck=1 hatchery.selfcheck-poweroff=1")
    with run_guest(argv) as guest:
        agent = guest.wait_for(b"HATCHERY-CHECK: agent ", 900)
        guest.wait_for(b"HATCHERY-CHECK-STATUS: ", 300)
        text = bytes(guest.output)
        if b"HATCHERY-CHECK: agent active" not in text:
            raise RuntimeError("agent not active:\n" + text[-3000:].decode(errors="replace"))
        started = re.search(rb"Started .{0,20}hatchery-agent\.service", text)
        guest.wait_for(b"reboot: Power down", 300)
    return {"agent_marker": agent, "started_line_seen": float(started is not None)}


def run() -> None:
    accel = choose_accel()
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
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

    def lan_factory(tmp: Path):  # noqa: ANN202
        return appliance_lan(dnsmasq, tmp)

    runs: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
    for index in range(APPLIANCE_RUNS):
        for variant in runs:
            runs[variant].append(_appliance_boot(images, lan_factory, variant))
        print(f"appliance run {index + 1}/{APPLIANCE_RUNS}: "
              f"ours {runs['ours'][-1]['lease']:.2f} s, "
              f"baseline {runs['baseline'][-1]['lease']:.2f} s", flush=True)  # fmt: skip

    def med(variant: str, key: str) -> float:
        return median([r[key] for r in runs[variant] if key in r])

    hv_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(HYPERVISOR_RUNS):
            disk = Path(tmp) / f"data{index}.img"
            _provisioned_disk(disk, Path(tmp) / f"w{index}")
            hv_times.append(_hypervisor_boot(images, disk)["agent_marker"])
            print(f"hypervisor run {index + 1}: agent active {hv_times[-1]:.1f} s", flush=True)

    ours, base = med("ours", "lease"), med("baseline", "lease")
    boot_rows = [
        ("QEMU start → DHCP lease (host clock)", f"{ours:.2f}", f"{base:.2f}",
         f"{base / ours:.2f}x"),
        ("guest uptime at /init's first marker", f"{med('ours', 'uptime_init'):.2f}",
         f"{med('baseline', 'uptime_init'):.2f}", ""),
        ("guest uptime after loading modules", f"{med('ours', 'uptime_modules'):.2f}",
         f"{med('baseline', 'uptime_modules'):.2f}", ""),
        ("guest uptime at the lease", f"{med('ours', 'uptime_lease'):.2f}",
         f"{med('baseline', 'uptime_lease'):.2f}", ""),
        ("min / max lease (host clock)",
         f"{min(r['lease'] for r in runs['ours']):.2f} / "
         f"{max(r['lease'] for r in runs['ours']):.2f}",
         f"{min(r['lease'] for r in runs['baseline']):.2f} / "
         f"{max(r['lease'] for r in runs['baseline']):.2f}", ""),
    ]  # fmt: skip
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

**Appliance VM boot**, median of {APPLIANCE_RUNS} runs each, interleaved. Ours: uncompressed
`vmlinux` (PVH entry), `q35`, `-nodefaults`, virtio-net. Baseline (SmallStack-style): the stock
bzImage, `pc` machine, QEMU's default devices, virtio-net. Same initrd, same dnsmasq.

{table(["seconds", "ours", "baseline", "speed-up"], boot_rows)}

**Hypervisor boot** with a provisioned data disk (2 vCPUs, 2 GiB), QEMU start to the self-check
reporting the agent active (an upper bound on agent readiness), {HYPERVISOR_RUNS} runs:
median {median(hv_times):.1f} s (min {min(hv_times):.1f}, max {max(hv_times):.1f}).
"""
    write_section("images", "Images: builds, sizes, appliance and hypervisor boot", body)
    print(body)
