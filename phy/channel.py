"""Radio channel model for the sim link, and OFDM airtime.

The numbers mirror the gr-digital OFDM link we calibrate against (64-pt FFT,
CP 16, 48 data carriers, 3 overhead symbols per packet), so the sim link's
airtime and loss are comparable with the real one. PerCurve.default() is a
placeholder from measured 50 % / ~100 % points; calibration replaces it with
a measured table via PerCurve.from_file().
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODULATIONS: dict[str, int] = {"bpsk": 1, "qpsk": 2, "8psk": 3}  # bits per symbol
PHY_CRC_BYTES = 4  # the OFDM PHY's own CRC32 appended to every packet
FADING_MODELS = ("rayleigh", "none")
_FADING_STREAM = 0xFAD1  # separates the fading RNG stream from other users of the same seed


def _check_modulation(modulation: str) -> int:
    try:
        return MODULATIONS[modulation]
    except (KeyError, TypeError):
        raise ValueError(f"unknown modulation {modulation!r}; expected one of {sorted(MODULATIONS)}") from None


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
        return MODULATIONS[self.modulation]


def ofdm_airtime_s(
    payload_bytes: int,
    modulation: str,
    bandwidth_hz: float,
    *,
    fft_len: int = 64,
    cp_len: int = 16,
    data_carriers: int = 48,
    overhead_symbols: int = 3,
    pad_samples: int = 0,
) -> float:
    """Airtime of one OFDM packet carrying payload_bytes (plus the PHY CRC32).

    Sample rate = bandwidth_hz (complex baseband), so halving the subband
    doubles the airtime of the same packet.
    """
    bits = _check_modulation(modulation)
    if payload_bytes < 0:
        raise ValueError(f"payload_bytes must be >= 0, got {payload_bytes}")
    if not bandwidth_hz > 0:
        raise ValueError(f"bandwidth_hz must be > 0, got {bandwidth_hz}")
    if fft_len <= 0 or cp_len < 0 or data_carriers <= 0 or overhead_symbols < 0 or pad_samples < 0:
        raise ValueError("OFDM parameters must be positive (cp/overhead/pad non-negative)")
    payload_symbols = math.ceil((payload_bytes + PHY_CRC_BYTES) * 8 / (data_carriers * bits))
    samples = (payload_symbols + overhead_symbols) * (fft_len + cp_len) + pad_samples
    return samples / bandwidth_hz


class PerCurve:
    """Packet error rate vs SNR per modulation for a reference frame size.

    PER is linearly interpolated in the SNR(dB) domain from a table whose PER
    must be non-increasing in SNR (so the controller can invert it), clamped
    to the end points outside the table, and scaled to other frame sizes as
    1 - (1 - PER_ref) ** (bytes / ref_bytes) (independent bit errors).
    """

    def __init__(self, table: Mapping[str, Sequence[tuple[float, float]]], ref_frame_bytes: int = 1000) -> None:
        if isinstance(ref_frame_bytes, bool) or not isinstance(ref_frame_bytes, int) or ref_frame_bytes <= 0:
            raise ValueError(f"ref_frame_bytes must be a positive int, got {ref_frame_bytes!r}")
        if not table:
            raise ValueError("PER table is empty")
        self.ref_frame_bytes = ref_frame_bytes
        self._snr: dict[str, np.ndarray] = {}
        self._per: dict[str, np.ndarray] = {}
        for mod, points in table.items():
            _check_modulation(mod)
            snr, per = _validate_points(mod, points)
            self._snr[mod] = snr
            self._per[mod] = per

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
        return cls(table, ref_frame_bytes=1000)

    @classmethod
    def from_file(cls, path: str | Path) -> PerCurve:
        """Load {ref_frame_bytes: int, curves: {mod: [[snr_db, per], ...]}} from YAML or JSON."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read PER curve file: {exc}") from exc
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(text)
            else:
                import yaml  # YAML is a superset of JSON, so this also reads .json-in-disguise

                doc = yaml.safe_load(text)
        except Exception as exc:  # parser errors differ between json and yaml
            raise ValueError(f"{path}: cannot parse PER curve file: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: top level must be a mapping with 'curves', got {type(doc).__name__}")
        unknown = set(doc) - {"ref_frame_bytes", "curves"}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        ref = doc.get("ref_frame_bytes", 1000)
        if isinstance(ref, bool) or not isinstance(ref, int) or ref <= 0:
            raise ValueError(f"{path}: field 'ref_frame_bytes' must be a positive integer, got {ref!r}")
        curves = doc.get("curves")
        if not isinstance(curves, dict) or not curves:
            raise ValueError(f"{path}: field 'curves' must be a non-empty mapping modulation -> [[snr_db, per], ...]")
        table: dict[str, list[tuple[float, float]]] = {}
        for mod, points in curves.items():
            field = f"curves.{mod}"
            if mod not in MODULATIONS:
                raise ValueError(f"{path}: field '{field}': unknown modulation; expected one of {sorted(MODULATIONS)}")
            if not isinstance(points, list):
                raise ValueError(f"{path}: field '{field}' must be a list of [snr_db, per] pairs")
            pairs = []
            for i, pt in enumerate(points):
                if (
                    not isinstance(pt, (list, tuple))
                    or len(pt) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pt)
                ):
                    raise ValueError(f"{path}: field '{field}[{i}]' must be [snr_db, per] numbers, got {pt!r}")
                pairs.append((float(pt[0]), float(pt[1])))
            table[mod] = pairs
        try:
            return cls(table, ref_frame_bytes=ref)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

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


def _validate_points(mod: str, points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"curve {mod!r}: points must be (snr_db, per) pairs: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise ValueError(f"curve {mod!r}: need a non-empty list of (snr_db, per) pairs")
    snr, per = arr[:, 0], arr[:, 1]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"curve {mod!r}: SNR and PER must be finite")
    if np.any(np.diff(snr) <= 0):
        raise ValueError(f"curve {mod!r}: SNR points must be strictly increasing")
    if np.any((per < 0) | (per > 1)):
        raise ValueError(f"curve {mod!r}: PER must be in [0, 1]")
    if np.any(np.diff(per) > 0):
        raise ValueError(
            f"curve {mod!r}: PER must be non-increasing in SNR "
            "(smooth measured points first, e.g. np.minimum.accumulate)"
        )
    return snr.copy(), per.copy()


def _scale_per(per_ref: float, size_ratio: float) -> float:
    if per_ref >= 1.0:
        return 1.0 if size_ratio > 0 else 0.0
    return float(-math.expm1(size_ratio * math.log1p(-per_ref)))


@dataclass(frozen=True)
class ChannelConfig:
    noise_psd_dbm_hz: float = -174.0
    noise_figure_db: float = 9.0
    ref_loss_db: float = 40.0
    ref_distance_m: float = 1.0
    path_loss_exponent: float = 3.5
    fading: str = "rayleigh"  # or "none"
    snr_est_sigma_db: float = 1.5  # the receiver's per-frame SNR estimation error (std)

    def __post_init__(self) -> None:
        if self.fading not in FADING_MODELS:
            raise ValueError(f"fading must be one of {FADING_MODELS}, got {self.fading!r}")
        if not self.ref_distance_m > 0:
            raise ValueError(f"ref_distance_m must be > 0, got {self.ref_distance_m}")
        if self.path_loss_exponent < 0:
            raise ValueError(f"path_loss_exponent must be >= 0, got {self.path_loss_exponent}")
        if not self.snr_est_sigma_db >= 0:
            raise ValueError(f"snr_est_sigma_db must be >= 0, got {self.snr_est_sigma_db}")


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
