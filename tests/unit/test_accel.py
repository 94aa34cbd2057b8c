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
