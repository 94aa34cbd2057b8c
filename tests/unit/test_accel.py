from __future__ import annotations

import pytest

from hatchery.errors import ConfigError
from hatchery.qemu.accel import Accel, HostFacts, decide

BARE_METAL = HostFacts(kvm_device_usable=True, paravirtual_nested_kvm=False)
PVM_NESTED = HostFacts(kvm_device_usable=True, paravirtual_nested_kvm=True)
NO_KVM = HostFacts(kvm_device_usable=False, paravirtual_nested_kvm=False)


@pytest.mark.parametrize(
    ("setting", "facts", "expected"),
    [
        ("auto", BARE_METAL, Accel.KVM),
        ("auto", PVM_NESTED, Accel.TCG),
        ("auto", NO_KVM, Accel.TCG),
        ("tcg", BARE_METAL, Accel.TCG),
        ("kvm", PVM_NESTED, Accel.KVM),
        (" KVM ", BARE_METAL, Accel.KVM),
    ],
)
def test_decide(setting: str, facts: HostFacts, expected: Accel) -> None:
    assert decide(setting, facts).accel is expected


def test_auto_explains_why_it_fell_back() -> None:
    assert "kvm_pvm" in decide("auto", PVM_NESTED).reason


def test_kvm_forced_without_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="/dev/kvm"):
        decide("kvm", NO_KVM)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="'xen'"):
        decide("xen", BARE_METAL)


def test_qemu_args_pick_cpu_model_per_accelerator() -> None:
    assert decide("auto", BARE_METAL).qemu_args() == ["-accel", "kvm", "-cpu", "host"]
    assert decide("tcg", BARE_METAL).qemu_args()[:2] == ["-accel", "tcg,tb-size=256"]


def test_one_vcpu_under_tcg_skips_the_apic_timer_calibration() -> None:
    tcg, kvm = decide("tcg", BARE_METAL), decide("auto", BARE_METAL)
    assert tcg.kernel_args(1) == ("no_timer_check", "noapictimer")
    assert tcg.kernel_args(2) == ("no_timer_check",)  # a broadcast tick would cost every vCPU
    assert kvm.kernel_args(1) == ()  # KVM's TSC-deadline timer is not calibrated


def test_direct_boot_command_line_gets_the_hint_once() -> None:
    from pathlib import Path

    from hatchery.qemu.cmdline import DirectKernel, GuestSpec, build_argv

    def append(cmdline: str, vcpus: int = 1) -> str:
        spec = GuestSpec("g", decide("tcg", BARE_METAL), vcpus=vcpus,
                         boot=DirectKernel(Path("k"), None, cmdline))  # fmt: skip
        argv = build_argv(spec)
        return argv[argv.index("-append") + 1]

    assert append("console=ttyS0") == "console=ttyS0 no_timer_check noapictimer"
    assert append("noapictimer console=ttyS0") == "noapictimer console=ttyS0 no_timer_check"
    assert append("console=ttyS0", vcpus=2) == "console=ttyS0 no_timer_check"
