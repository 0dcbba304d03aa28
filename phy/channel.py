"""Radio channel model for the sim link: what a transmit setting is, path loss, fading, noise, and frame loss.

Beyond the nominal model (path loss, block Rayleigh fading, thermal noise) SimChannel applies the bench's
impairments: Rician fading, per-device shadowing, fading correlated across rounds and bursty interference. The
controller is never told them (config ChannelConfig.nominal); the sim link may also draw losses from a true PER
curve that differs from the controller's (PerCurve.for_sim_link vs PerCurve.for_bench).

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
_SHADOWING_STREAM = 0x5AD0
_INTERFERENCE_STREAM = 0x1F7E


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

    @classmethod
    def for_sim_link(cls, bench: BenchConfig) -> PerCurve:
        """The curve the sim link draws losses from: channel.true_per_curve's table if the bench has one (a world
        the controller is not told about), else the controller's own (for_bench)."""
        table = bench.channel.true_per_curve_table
        return cls.for_bench(bench) if table is None else cls(table)

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


def thermal_noise_dbm(channel: ChannelConfig, bandwidth_hz: float) -> float:
    """The receiver's thermal noise over a bandwidth as the bench states it: PSD + noise figure + 10 log10(B)."""
    if not bandwidth_hz > 0:
        raise ValueError(f"bandwidth_hz must be > 0, got {bandwidth_hz}")
    return channel.noise_psd_dbm_hz + 10.0 * math.log10(bandwidth_hz) + channel.noise_figure_db


class SimChannel:
    """Log-distance path loss + shadowing + block fading + thermal noise (+ bursty interference).

    Block fading: one fading gain per (seed, device, round), so a run is reproducible and every retransmission
    within a round sees the same block (ARQ cannot 'wait out' a deep fade inside a round). With the bench's
    defaults it is the nominal model the controller assumes; the impairments (config ChannelConfig) are:

    - scattered component s_r (complex, E|s|^2 = 1): w_r ~ CN(0, 1) drawn per (seed, device, round);
      s_0 = w_0, s_r = rho s_{r-1} + sqrt(1 - rho^2) w_r (AR(1), rho = fading_correlation; rho = 0: s_r = w_r)
    - gain h_r = s_r (rayleigh) or sqrt(K/(K+1)) + sqrt(1/(K+1)) s_r (rician, K = 10^(rician_k_db/10)); E|h|^2 = 1
    - shadowing X_k ~ N(0, shadowing_sigma_db^2) dB, drawn once per (seed, device)
    - interference: a Gilbert-Elliott state per round, shared by every device (it is at the BS receiver): round 0
      is bad with probability q = interference_prob, then P(bad | bad) = interference_persist and
      P(bad | good) = q (1 - persist) / (1 - q), so a long-run fraction q of rounds is bad. A bad round's noise
      floor is N + I with I = INR N, i.e. 10 log10(1 + 10^(interference_inr_db/10)) dB above thermal noise.

    SNR_r = P_tx - PL(d) + X_k + 10 log10 |h_r|^2 - N(bw) - interference rise_r.
    """

    def __init__(self, cfg: ChannelConfig, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.cfg = cfg
        self.seed = seed
        self._scatter: dict[int, list[tuple[float, float]]] = {}  # AR(1) history per device (unit-variance parts)
        self._bad_rounds: list[bool] = []  # Gilbert-Elliott states from round 0

    def path_loss_db(self, distance_m: float) -> float:
        """Log-distance model; distances below ref_distance_m are clamped to it."""
        if not distance_m > 0:
            raise ValueError(f"distance_m must be > 0, got {distance_m}")
        d = max(distance_m, self.cfg.ref_distance_m)
        return self.cfg.ref_loss_db + 10.0 * self.cfg.path_loss_exponent * math.log10(d / self.cfg.ref_distance_m)

    def _innovation(self, device_id: int, round_idx: int) -> tuple[float, float]:
        """Re and Im of a fresh CN(0, 2) draw (unit-variance parts): the nominal Rayleigh block's numbers."""
        rng = np.random.default_rng([self.seed, _FADING_STREAM, device_id, round_idx])
        re, im = rng.standard_normal(2)
        return float(re), float(im)

    def _scattered(self, device_id: int, round_idx: int) -> tuple[float, float]:
        """The AR(1) scattered component (unit-variance parts); without correlation the round's own draw."""
        rho = self.cfg.fading_correlation
        if rho == 0.0:
            return self._innovation(device_id, round_idx)
        history = self._scatter.setdefault(device_id, [])
        innovation_scale = math.sqrt(1.0 - rho * rho)
        while len(history) <= round_idx:
            re, im = self._innovation(device_id, len(history))
            if history:
                prev_re, prev_im = history[-1]
                re, im = rho * prev_re + innovation_scale * re, rho * prev_im + innovation_scale * im
            history.append((re, im))
        return history[round_idx]

    def fading_gain(self, device_id: int, round_idx: int) -> complex:
        """The complex block gain h of a device and round (E|h|^2 = 1); 1 without fading."""
        if self.cfg.fading == "none":
            return 1.0 + 0.0j
        re, im = self._fading_parts(device_id, round_idx)
        return complex(re, im) / math.sqrt(2.0)

    def _fading_parts(self, device_id: int, round_idx: int) -> tuple[float, float]:
        """sqrt(2) h as (re, im): kept unnormalised so the nominal Rayleigh power is bit-for-bit the old draw."""
        if device_id < 0 or round_idx < 0:
            raise ValueError("device_id and round_idx must be >= 0")
        re, im = self._scattered(device_id, round_idx)
        if self.cfg.fading == "rician":
            k_lin = 10.0 ** (self.cfg.rician_k_db / 10.0)
            scatter_amp = math.sqrt(1.0 / (k_lin + 1.0))
            re, im = math.sqrt(2.0 * k_lin / (k_lin + 1.0)) + scatter_amp * re, scatter_amp * im
        return re, im

    def fading_db(self, device_id: int, round_idx: int) -> float:
        """10 log10 |h|^2 (E|h|^2 = 1); 0 dB without fading."""
        if self.cfg.fading == "none":
            return 0.0
        re, im = self._fading_parts(device_id, round_idx)
        power = (re * re + im * im) / 2.0
        return 10.0 * math.log10(max(power, 1e-30))

    def shadowing_db(self, device_id: int) -> float:
        """The device's log-normal shadowing (dB), the same in every round; 0 when shadowing_sigma_db is 0."""
        if device_id < 0:
            raise ValueError("device_id must be >= 0")
        if self.cfg.shadowing_sigma_db == 0.0:
            return 0.0
        rng = np.random.default_rng([self.seed, _SHADOWING_STREAM, device_id])
        return float(rng.standard_normal()) * self.cfg.shadowing_sigma_db

    def interference_active(self, round_idx: int) -> bool:
        """Whether the round is in the Gilbert-Elliott bad state (never without interference)."""
        if round_idx < 0:
            raise ValueError("round_idx must be >= 0")
        cfg = self.cfg
        if cfg.interference == "none" or cfg.interference_prob == 0.0:
            return False
        enter_prob = cfg.interference_prob * (1.0 - cfg.interference_persist) / (1.0 - cfg.interference_prob)
        states = self._bad_rounds
        while len(states) <= round_idx:
            u = np.random.default_rng([self.seed, _INTERFERENCE_STREAM, len(states)]).random()
            threshold = cfg.interference_prob if not states else cfg.interference_persist if states[-1] else enter_prob
            states.append(bool(u < threshold))
        return states[round_idx]

    def interference_rise_db(self, round_idx: int) -> float:
        """How far the noise floor rises in the round: 10 log10(1 + INR) in a bad round, else 0 dB."""
        if not self.interference_active(round_idx):
            return 0.0
        return 10.0 * math.log10(1.0 + 10.0 ** (self.cfg.interference_inr_db / 10.0))

    def noise_dbm(self, bandwidth_hz: float) -> float:
        """Thermal noise over the bandwidth (the nominal noise floor)."""
        return thermal_noise_dbm(self.cfg, bandwidth_hz)

    def noise_floor_dbm(self, bandwidth_hz: float, round_idx: int) -> float:
        """Thermal noise plus the round's interference, over the bandwidth."""
        return self.noise_dbm(bandwidth_hz) + self.interference_rise_db(round_idx)

    def gain_db(self, geometry: DeviceGeometry, round_idx: int) -> float:
        """Channel power gain (negative path loss plus shadowing and fading) of one block."""
        shadowing_db = self.shadowing_db(geometry.device_id)
        return -self.path_loss_db(geometry.distance_m) + shadowing_db + self.fading_db(geometry.device_id, round_idx)

    def snr_db(self, geometry: DeviceGeometry, round_idx: int, setting: TxSetting) -> float:
        """True SNR; a narrower subband collects less noise, so SNR rises by 10log10(ratio)."""
        return self.snr_db_from_gain(self.gain_db(geometry, round_idx), setting) - self.interference_rise_db(round_idx)

    def snr_db_from_gain(self, gain_db: float, setting: TxSetting) -> float:
        """SNR over thermal noise for a known channel gain; inverse: gain_db = snr - tx_power + noise(bw)."""
        return setting.tx_power_dbm + gain_db - self.noise_dbm(setting.bandwidth_hz)

    def gain_db_from_snr(self, snr_db: float, setting: TxSetting) -> float:
        """Channel gain implied by an SNR (measured) under the setting it was sent with (interference reads as
        a lower gain: the controller's estimator cannot tell them apart)."""
        return snr_db - setting.tx_power_dbm + self.noise_dbm(setting.bandwidth_hz)
