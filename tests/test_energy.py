"""Energy meter: compute energy follows CPU time, transmit energy follows power and airtime."""

import pytest

from fedlora.energy import EnergyMeter, dbm_to_w


def test_dbm_to_w():
    assert dbm_to_w(30) == pytest.approx(1.0)
    assert dbm_to_w(0) == pytest.approx(1e-3)


def test_transmit_energy_scales_with_power_and_airtime():
    meter = EnergyMeter(watts_per_core=10.0, pa_efficiency=0.25, radio_on_power_w=0.5)
    e = meter.transmit_energy_j(20.0, 2.0)  # 0.1 W / 0.25 + 0.5 W, for 2 s
    assert e == pytest.approx((0.4 + 0.5) * 2.0)
    assert meter.transmit_energy_j(20.0, 0.0) == 0.0
    assert meter.transmit_energy_j(10.0, 2.0) < e


def test_compute_window_counts_this_process_cpu():
    meter = EnergyMeter(watts_per_core=10.0, pa_efficiency=0.3, radio_on_power_w=0.0)
    with meter.compute() as busy:
        x = 0
        for i in range(3_000_000):
            x += i * i
    with meter.compute() as idle:
        pass
    assert busy.result.cpu_s > idle.result.cpu_s
    assert busy.result.energy_j > 0
    if busy.result.source == "cpu_model":
        assert busy.result.energy_j == pytest.approx(busy.result.cpu_s * 10.0)
