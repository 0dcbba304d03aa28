"""The link budget of a bring-up test (phy/bringup.py): the SNR a cable and attenuator should give, the power to
aim at, and the share a device gets. The same noise model as the sim (phy.channel.thermal_noise_dbm)."""

from __future__ import annotations

from typing import Any

from phy.channel import thermal_noise_dbm

__all__ = ["expected_snr_db", "link_share_hz", "link_tx_power_dbm", "noise_dbm"]


def noise_dbm(bench: Any, bandwidth_hz: float) -> float:
    """Receiver noise over a device's share, as the bench states it (the sim's noise model)."""
    return thermal_noise_dbm(bench.channel, bandwidth_hz)


def expected_snr_db(bench: Any, tx_power_dbm: float, attenuation_db: float, bandwidth_hz: float) -> float:
    """SNR the modem should measure through the cable (its convention: signal over noise in the share)."""
    return tx_power_dbm - attenuation_db - noise_dbm(bench, bandwidth_hz)


def link_share_hz(bench: Any, device_count: int) -> float:
    """The share a device gets at equal shares: fdma B / K, tdma the whole band."""
    return bench.radio.total_bandwidth_hz / (1 if bench.rf.access == "tdma" else device_count)


def link_tx_power_dbm(bench: Any, attenuation_db: float, bandwidth_hz: float, target_snr_db: float) -> float:
    """The power that gives target_snr_db through this attenuation, within the bench's TX power range."""
    wanted = target_snr_db + attenuation_db + noise_dbm(bench, bandwidth_hz)
    return float(min(max(wanted, bench.radio.min_tx_power_dbm), bench.radio.max_tx_power_dbm))
