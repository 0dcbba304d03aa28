"""Radio channel model for the sim link: what a transmit setting is, path loss, fading, noise, and frame loss.

The sim link's airtime is the OFDM modem's (proto.numerology.packet_airtime_s, the samples the GNU Radio
transmitter really emits) and its loss comes from a PER curve measured on that modem, so the sim is comparable
with the real link. PerCurve.default() is a placeholder from measured 50 % / ~100 % points; calibration replaces
it with a measured table via PerCurve.from_file().
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config import BenchConfig, ChannelConfig, PerCurveTable, read_per_curve, validated
from proto.numerology import BITS_PER_SYMBOL, check_modulation

_FADING_STREAM = 0xFAD1  # separates the fading RNG stream from other users of the same seed


def _check_modulation(modulation: str) -> int:
    """Bits per symbol of a modulation a plan may use (proto.numerology's set); ValueError otherwise."""
    return BITS_PER_SYMBOL[check_modulation(modulation)]


@dataclass(frozen=True)
class TxSetting:
    """What the controller chooses per device and round."""

    tx_power_dbm: float
    bandwidth_hz: float
    modulation: str = "qpsk"

    def __post_init__(self) -> None:
        _check_modulation(self.modulation)
        if not math.isfinite(self.tx_power_dbm):
            raise ValueError(f"tx_power_dbm must be finite, got {self.tx_power_dbm}")
        if not (math.isfinite(self.bandwidth_hz) and self.bandwidth_hz > 0):
            raise ValueError(f"bandwidth_hz must be finite and > 0, got {self.bandwidth_hz}")

    @property
    def bits_per_symbol(self) -> int:
        return BITS_PER_SYMBOL[self.modulation]


class PerCurve:
    """Packet error rate vs SNR per modulation for a reference frame size.

    PER is linearly interpolated in the SNR(dB) domain from a table whose PER
    must be non-increasing in SNR (so the controller can invert it), clamped
    to the end points outside the table, and scaled to other frame sizes as
    1 - (1 - PER_ref) ** (bytes / ref_bytes) (independent bit errors).
    """

    def __init__(self, table: PerCurveTable) -> None:
        """A curve from its checked table: config.per_curve holds the rules (SNR strictly up, PER never up)."""
        self.ref_frame_bytes = table.ref_frame_bytes
        self._snr: dict[str, np.ndarray] = {m: np.array([s for s, _ in pts], float) for m, pts in table.curves.items()}
        self._per: dict[str, np.ndarray] = {m: np.array([p for _, p in pts], float) for m, pts in table.curves.items()}

    @classmethod
    def from_points(cls, curves: Mapping[str, Sequence[tuple[float, float]]], ref_frame_bytes: int = 1000) -> PerCurve:
        """A curve from (snr_db, per) points per modulation, checked by the calibration file's schema."""
        data = {"ref_frame_bytes": ref_frame_bytes, "curves": {m: [list(p) for p in pts] for m, pts in curves.items()}}
        return cls(validated(PerCurveTable, data, "PER curve"))

    @classmethod
    def for_bench(cls, bench: BenchConfig) -> PerCurve:
        """The bench's calibrated curve (its content travels in the bench: no file is opened), or the built-in one."""
        return cls.default() if bench.per_curve_table is None else cls(bench.per_curve_table)

    @property
    def modulations(self) -> list[str]:
        return list(self._snr)

    def points(self, modulation: str) -> list[tuple[float, float]]:
        self._table_for(modulation)
        return list(zip(self._snr[modulation].tolist(), self._per[modulation].tolist()))

    def to_dict(self) -> dict[str, Any]:
        """The from_file() schema, e.g. for saving a calibrated curve."""
        return {
            "ref_frame_bytes": self.ref_frame_bytes,
            "curves": {m: [list(p) for p in self.points(m)] for m in self._snr},
        }

    @classmethod
    def default(cls) -> PerCurve:
        """Logistic curves through the measured GNU Radio points (1000-byte packets).

        50 % success at 12 / 13.5 / 19 dB and ~99 % at 16 / 18 / 22 dB for
        BPSK / QPSK / 8PSK. Placeholder until calibration provides a table.
        """
        anchors = {"bpsk": (12.0, 16.0), "qpsk": (13.5, 18.0), "8psk": (19.0, 22.0)}
        table: dict[str, list[tuple[float, float]]] = {}
        for mod, (snr50_db, snr99_db) in anchors.items():
            scale_db = (snr99_db - snr50_db) / math.log(99.0)  # success(snr99) = 0.99
            grid = np.arange(snr50_db - 8.0, snr50_db + 8.0 + 1e-9, 0.25)
            per = 1.0 / (1.0 + np.exp((grid - snr50_db) / scale_db))
            per[0], per[-1] = 1.0, 0.0
            table[mod] = [(float(s), float(p)) for s, p in zip(grid, per)]
        return cls.from_points(table, ref_frame_bytes=1000)

    @classmethod
    def from_file(cls, path: str | Path) -> PerCurve:
        """Load {ref_frame_bytes: int, curves: {mod: [[snr_db, per], ...]}} from YAML or JSON (config reads it)."""
        return cls.from_table(read_per_curve(path))

    @classmethod
    def from_table(cls, table: PerCurveTable) -> PerCurve:
        """The curve of a calibration file's content, e.g. the table a bench carries (BenchConfig.per_curve_table)."""
        return cls(table)

    def _table_for(self, modulation: str) -> tuple[np.ndarray, np.ndarray]:
        _check_modulation(modulation)
        if modulation not in self._snr:
            raise ValueError(f"PER curve has no table for {modulation!r} (has {self.modulations})")
        return self._snr[modulation], self._per[modulation]

    def per(self, snr_db: float, modulation: str, frame_bytes: int) -> float:
        """Probability that a frame of frame_bytes is lost at snr_db."""
        snr, per_tab = self._table_for(modulation)
        if frame_bytes < 0:
            raise ValueError(f"frame_bytes must be >= 0, got {frame_bytes}")
        if math.isnan(snr_db):
            raise ValueError("snr_db is NaN")
        per_ref = float(np.interp(snr_db, snr, per_tab))
        return _scale_per(per_ref, frame_bytes / self.ref_frame_bytes)

    def min_snr_db(self, modulation: str, frame_bytes: int, max_per: float) -> float:
        """Lowest SNR at which per(...) <= max_per (inf if the table never gets there).

        The inverse the controller needs to pick power/modulation for a target loss.
        """
        snr, per_tab = self._table_for(modulation)
        if not 0.0 <= max_per <= 1.0:
            raise ValueError(f"max_per must be in [0, 1], got {max_per}")
        if frame_bytes <= 0:
            return -math.inf
        # Invert the size scaling, then the piecewise-linear (non-increasing) table.
        target = 1.0 - (1.0 - max_per) ** (self.ref_frame_bytes / frame_bytes)
        if per_tab[0] <= target:
            return -math.inf
        idx = int(np.argmax(per_tab <= target))
        if per_tab[idx] > target:
            return math.inf
        s0, s1, p0, p1 = snr[idx - 1], snr[idx], per_tab[idx - 1], per_tab[idx]
        return float(s0 + (p0 - target) * (s1 - s0) / (p0 - p1))


def _scale_per(per_ref: float, size_ratio: float) -> float:
    if per_ref >= 1.0:
        return 1.0 if size_ratio > 0 else 0.0
    return float(-math.expm1(size_ratio * math.log1p(-per_ref)))


@dataclass(frozen=True)
class DeviceGeometry:
    device_id: int
    distance_m: float

    def __post_init__(self) -> None:
        if not self.distance_m > 0:
            raise ValueError(f"distance_m must be > 0, got {self.distance_m}")


class SimChannel:
    """Log-distance path loss + block fading + thermal noise.

    Block fading: one fading gain per (seed, device, round), so a run is
    reproducible and every retransmission within a round sees the same block
    (ARQ cannot 'wait out' a deep fade inside a round).
    """

    def __init__(self, cfg: ChannelConfig, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.cfg = cfg
        self.seed = seed

    def path_loss_db(self, distance_m: float) -> float:
        """Log-distance model; distances below ref_distance_m are clamped to it."""
        if not distance_m > 0:
            raise ValueError(f"distance_m must be > 0, got {distance_m}")
        d = max(distance_m, self.cfg.ref_distance_m)
        return self.cfg.ref_loss_db + 10.0 * self.cfg.path_loss_exponent * math.log10(d / self.cfg.ref_distance_m)

    def fading_db(self, device_id: int, round_idx: int) -> float:
        """10 log10 |h|^2 with h ~ CN(0, 1) (E|h|^2 = 1); 0 dB without fading."""
        if self.cfg.fading == "none":
            return 0.0
        if device_id < 0 or round_idx < 0:
            raise ValueError("device_id and round_idx must be >= 0")
        rng = np.random.default_rng([self.seed, _FADING_STREAM, device_id, round_idx])
        re, im = rng.standard_normal(2)
        power = (re * re + im * im) / 2.0
        return 10.0 * math.log10(max(power, 1e-30))

    def noise_dbm(self, bandwidth_hz: float) -> float:
        if not bandwidth_hz > 0:
            raise ValueError(f"bandwidth_hz must be > 0, got {bandwidth_hz}")
        return self.cfg.noise_psd_dbm_hz + 10.0 * math.log10(bandwidth_hz) + self.cfg.noise_figure_db

    def gain_db(self, geometry: DeviceGeometry, round_idx: int) -> float:
        """Channel power gain (negative path loss plus fading) of one block."""
        return -self.path_loss_db(geometry.distance_m) + self.fading_db(geometry.device_id, round_idx)

    def snr_db(self, geometry: DeviceGeometry, round_idx: int, setting: TxSetting) -> float:
        """True SNR; a narrower subband collects less noise, so SNR rises by 10log10(ratio)."""
        return self.snr_db_from_gain(self.gain_db(geometry, round_idx), setting)

    def snr_db_from_gain(self, gain_db: float, setting: TxSetting) -> float:
        """SNR for a known channel gain; inverse: gain_db = snr - tx_power + noise(bw)."""
        return setting.tx_power_dbm + gain_db - self.noise_dbm(setting.bandwidth_hz)

    def gain_db_from_snr(self, snr_db: float, setting: TxSetting) -> float:
        """Channel gain implied by an SNR (measured) under the setting it was sent with."""
        return snr_db - setting.tx_power_dbm + self.noise_dbm(setting.bandwidth_hz)
