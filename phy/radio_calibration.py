"""A radio's measured TX gain -> power table and receiver noise floor (docs/radio-calibration.md has the procedure).

The rf back end needs two numbers the controller cannot know from software: which TX gain setting puts a given
power (dBm) on the antenna port, and how much noise the receiver adds. One YAML file per radio and carrier holds
them; this module loads it with errors that name the file and field, writes it back, and answers the two
questions the link asks (`tx_gain_db_for`, `noise_dbm`) plus the bench fields the numbers feed
(`bench_overrides`: the TX power range and the channel model's noise figure).

File format::

    radio: usrp_b210                  # model (free text, e.g. usrp_b210, hackrf_one)
    serial: "3145ABC"                 # optional: which unit
    center_freq_hz: 2.45e9            # carrier the table was measured at
    sample_rate_hz: 1.0e6             # RX/TX sample rate during the measurement
    tx_level_dbfs: -12.0              # optional: RMS of the baseband waveform sent for the table (dB full scale)
    tx:                               # [gain_db, power_dbm] at the TX port, both strictly increasing
      - [50, -20.1]
      - [60, -10.3]
    rx_gain_db: 40                    # RX gain the noise floor was measured at
    rx_full_scale_dbm: -25.0          # optional: RX port input power that gives 0 dBFS mean power at rx_gain_db
    noise_floor_dbm_hz: -166.0        # receiver noise, referred to the RX port, at rx_gain_db
    measured_on: 2026-11-30           # date (YYYY-MM-DD)
    by: "name"                        # who measured
    notes: "power meter X, 40 dB attenuator, amp off"
    placeholder: false                # true: example numbers, NOT a measurement (needs a bench measurement)
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

THERMAL_NOISE_DBM_HZ = -174.0  # kT at 290 K: the reference a noise figure is quoted against
# A measured floor below thermal noise means a wrong full-scale reference; allow rounding.
_MIN_NOISE_FLOOR_DBM_HZ = THERMAL_NOISE_DBM_HZ - 0.5
_MAX_NOISE_FLOOR_DBM_HZ = -100.0  # > 74 dB noise figure: not a receiver, a unit error

REQUIRED_FIELDS = (
    "radio",
    "center_freq_hz",
    "sample_rate_hz",
    "tx",
    "rx_gain_db",
    "noise_floor_dbm_hz",
    "measured_on",
    "by",
)
OPTIONAL_FIELDS = ("serial", "tx_level_dbfs", "rx_full_scale_dbm", "notes", "placeholder")


class RadioCalibrationError(ValueError):
    """A radio calibration file or value is wrong; the message names the file and field."""


@dataclass(frozen=True)
class RadioCalibration:
    radio: str
    center_freq_hz: float
    sample_rate_hz: float
    tx_table: tuple[tuple[float, float], ...]  # (gain_db, power_dbm), both strictly increasing
    rx_gain_db: float
    noise_floor_dbm_hz: float
    measured_on: str  # ISO date
    by: str
    notes: str = ""
    serial: str | None = None
    tx_level_dbfs: float | None = None
    rx_full_scale_dbm: float | None = None
    placeholder: bool = False
    source: str = field(default="<memory>", compare=False)  # where it was loaded from, for error messages

    def __post_init__(self) -> None:
        table = self.tx_table
        if isinstance(table, (list, tuple)):  # accept [[g, p], ...] lists; the stored form is tuples
            object.__setattr__(self, "tx_table", tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in table))
        if isinstance(self.measured_on, (_dt.date, _dt.datetime)):
            object.__setattr__(self, "measured_on", self.measured_on.isoformat()[:10])
        _validate(self)

    # --------------------------------------------------------------------------- TX
    @property
    def tx_gains_db(self) -> np.ndarray:
        return np.array([g for g, _ in self.tx_table], dtype=float)

    @property
    def tx_powers_dbm(self) -> np.ndarray:
        return np.array([p for _, p in self.tx_table], dtype=float)

    @property
    def tx_power_range_dbm(self) -> tuple[float, float]:
        """Lowest and highest measured TX power: the range the bench may ask of this radio."""
        return float(self.tx_powers_dbm[0]), float(self.tx_powers_dbm[-1])

    def tx_gain_db_for(self, power_dbm: float) -> float:
        """TX gain setting that puts power_dbm on the port (linear interpolation in dB between measured points).

        Outside the measured range the radio's behaviour is unknown (compression at the top, spurs and LO
        leakage at the bottom), so this refuses rather than extrapolates.
        """
        lo, hi = self.tx_power_range_dbm
        if not (isinstance(power_dbm, (int, float)) and math.isfinite(power_dbm)):
            raise RadioCalibrationError(f"{self.source}: tx power must be a finite number of dBm, got {power_dbm!r}")
        if not lo <= power_dbm <= hi:
            raise RadioCalibrationError(
                f"{self.source}: {power_dbm:g} dBm is outside the measured TX table of {self.radio} "
                f"({lo:g} .. {hi:g} dBm at {self.center_freq_hz / 1e6:g} MHz); measure more points or lower "
                f"the bench's radio.max_tx_power_dbm / raise radio.min_tx_power_dbm"
            )
        return float(np.interp(power_dbm, self.tx_powers_dbm, self.tx_gains_db))

    def tx_power_dbm_for(self, gain_db: float) -> float:
        """Measured TX power (dBm) at a gain setting, interpolated; an error outside the table."""
        lo, hi = float(self.tx_gains_db[0]), float(self.tx_gains_db[-1])
        if not (isinstance(gain_db, (int, float)) and math.isfinite(gain_db)):
            raise RadioCalibrationError(f"{self.source}: tx gain must be a finite number of dB, got {gain_db!r}")
        if not lo <= gain_db <= hi:
            raise RadioCalibrationError(
                f"{self.source}: TX gain {gain_db:g} dB is outside the measured table of {self.radio} "
                f"({lo:g} .. {hi:g} dB)"
            )
        return float(np.interp(gain_db, self.tx_gains_db, self.tx_powers_dbm))

    # --------------------------------------------------------------------------- RX
    @property
    def noise_figure_db(self) -> float:
        """Noise figure at rx_gain_db: the floor above kT (290 K)."""
        return self.noise_floor_dbm_hz - THERMAL_NOISE_DBM_HZ

    def noise_dbm(self, bandwidth_hz: float) -> float:
        """Receiver noise power over bandwidth_hz (the sim's noise_dbm with this radio's numbers)."""
        if not (math.isfinite(bandwidth_hz) and bandwidth_hz > 0):
            raise RadioCalibrationError(f"{self.source}: bandwidth_hz must be > 0, got {bandwidth_hz!r}")
        return self.noise_floor_dbm_hz + 10.0 * math.log10(bandwidth_hz)

    # --------------------------------------------------------------------------- bench
    def bench_overrides(self) -> dict[str, float]:
        """Bench fields these measurements set (`--bench-set key=value`): TX power range and noise figure.

        The channel model's noise is noise_psd_dbm_hz + noise_figure_db + 10 log10(B); with the thermal
        reference as the PSD, the noise figure is what this radio adds.
        """
        lo, hi = self.tx_power_range_dbm
        return {
            "radio.min_tx_power_dbm": round(lo, 2),
            "radio.max_tx_power_dbm": round(hi, 2),
            "channel.noise_psd_dbm_hz": THERMAL_NOISE_DBM_HZ,
            "channel.noise_figure_db": round(self.noise_figure_db, 2),
        }

    def to_mapping(self) -> dict[str, Any]:
        """The file's schema (what `write_radio_calibration` writes)."""
        out: dict[str, Any] = {"radio": self.radio}
        if self.serial is not None:
            out["serial"] = self.serial
        out.update({"center_freq_hz": self.center_freq_hz, "sample_rate_hz": self.sample_rate_hz})
        if self.tx_level_dbfs is not None:
            out["tx_level_dbfs"] = self.tx_level_dbfs
        out["tx"] = [[g, p] for g, p in self.tx_table]
        out["rx_gain_db"] = self.rx_gain_db
        if self.rx_full_scale_dbm is not None:
            out["rx_full_scale_dbm"] = self.rx_full_scale_dbm
        out.update(
            {
                "noise_floor_dbm_hz": self.noise_floor_dbm_hz,
                "measured_on": self.measured_on,
                "by": self.by,
                "notes": self.notes,
                "placeholder": self.placeholder,
            }
        )
        return out


# ------------------------------------------------------------------------------- validation
def _fail(where: str, name: str, problem: str) -> RadioCalibrationError:
    return RadioCalibrationError(f"{where}: field '{name}': {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(cal: RadioCalibration) -> None:
    where = cal.source
    if not isinstance(cal.radio, str) or not cal.radio.strip():
        raise _fail(where, "radio", f"must be a non-empty model name (e.g. usrp_b210, hackrf_one), got {cal.radio!r}")
    for name in ("center_freq_hz", "sample_rate_hz"):
        value = getattr(cal, name)
        if not (_is_number(value) and value > 0):
            raise _fail(where, name, f"must be a number > 0 (Hz), got {value!r}")
    for name in ("rx_gain_db", "noise_floor_dbm_hz"):
        if not _is_number(getattr(cal, name)):
            raise _fail(where, name, f"must be a finite number, got {getattr(cal, name)!r}")
    for name in ("tx_level_dbfs", "rx_full_scale_dbm"):
        value = getattr(cal, name)
        if value is not None and not _is_number(value):
            raise _fail(where, name, f"must be a finite number or absent, got {value!r}")
    if cal.tx_level_dbfs is not None and cal.tx_level_dbfs > 0:
        raise _fail(
            where, "tx_level_dbfs", f"is an RMS level relative to full scale: must be <= 0, got {cal.tx_level_dbfs!r}"
        )
    if not _MIN_NOISE_FLOOR_DBM_HZ <= cal.noise_floor_dbm_hz <= _MAX_NOISE_FLOOR_DBM_HZ:
        raise _fail(
            where,
            "noise_floor_dbm_hz",
            f"{cal.noise_floor_dbm_hz:g} dBm/Hz is outside {_MIN_NOISE_FLOOR_DBM_HZ:g} .. "
            f"{_MAX_NOISE_FLOOR_DBM_HZ:g} (below thermal noise, -174 dBm/Hz, means a wrong full-scale "
            f"reference; refer the floor to the RX port, not to dBFS)",
        )
    table = cal.tx_table
    if not isinstance(table, tuple) or len(table) < 2:
        raise _fail(where, "tx", "needs at least two [gain_db, power_dbm] points")
    for i, point in enumerate(table):
        if not (isinstance(point, tuple) and len(point) == 2 and all(_is_number(v) for v in point)):
            raise _fail(where, f"tx[{i}]", f"must be [gain_db, power_dbm] numbers, got {point!r}")
    gains = [g for g, _ in table]
    powers = [p for _, p in table]
    for i in range(1, len(table)):
        if gains[i] <= gains[i - 1]:
            raise _fail(where, f"tx[{i}]", f"gain_db must be strictly increasing, {gains[i]:g} after {gains[i - 1]:g}")
        if powers[i] <= powers[i - 1]:
            raise _fail(
                where,
                f"tx[{i}]",
                f"power_dbm must rise with gain, {powers[i]:g} dBm after "
                f"{powers[i - 1]:g} dBm (drop points in compression or below the "
                f"meter's floor)",
            )
    try:
        _dt.date.fromisoformat(cal.measured_on)
    except (TypeError, ValueError):
        raise _fail(where, "measured_on", f"must be a date YYYY-MM-DD, got {cal.measured_on!r}") from None
    if not isinstance(cal.by, str) or not cal.by.strip():
        raise _fail(where, "by", f"must name who measured, got {cal.by!r}")
    if not isinstance(cal.notes, str):
        raise _fail(where, "notes", f"must be text, got {type(cal.notes).__name__}")
    if cal.serial is not None and not isinstance(cal.serial, str):
        raise _fail(where, "serial", f"must be text (quote it in YAML), got {cal.serial!r}")
    if not isinstance(cal.placeholder, bool):
        raise _fail(where, "placeholder", f"must be true or false, got {cal.placeholder!r}")


# ------------------------------------------------------------------------------- file I/O
def from_mapping(doc: Any, source: str = "<memory>") -> RadioCalibration:
    """Validate a parsed document (the YAML schema above) into a RadioCalibration."""
    if not isinstance(doc, Mapping):
        raise RadioCalibrationError(f"{source}: top level must be a mapping of fields, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise RadioCalibrationError(
            f"{source}: unknown field(s) {unknown}; known: {sorted(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
        )
    missing = [k for k in REQUIRED_FIELDS if k not in doc or doc[k] is None]
    if missing:
        raise RadioCalibrationError(f"{source}: missing field(s) {missing}")
    tx = doc["tx"]
    if not isinstance(tx, list):
        raise _fail(source, "tx", "must be a list of [gain_db, power_dbm] pairs")
    return RadioCalibration(  # YAML parses a bare date into datetime.date: __post_init__ takes both
        radio=doc["radio"],
        center_freq_hz=_number_or_raw(doc["center_freq_hz"]),
        sample_rate_hz=_number_or_raw(doc["sample_rate_hz"]),
        tx_table=tuple(tx),
        rx_gain_db=doc["rx_gain_db"],
        noise_floor_dbm_hz=doc["noise_floor_dbm_hz"],
        measured_on=doc["measured_on"],
        by=doc["by"],
        notes=doc.get("notes") or "",
        serial=_text_or_raw(doc.get("serial")),
        tx_level_dbfs=doc.get("tx_level_dbfs"),
        rx_full_scale_dbm=doc.get("rx_full_scale_dbm"),
        placeholder=doc.get("placeholder", False),
        source=source,
    )


def _number_or_raw(value: Any) -> Any:
    """YAML 1.1 reads '2.45e9' (no dot) as a string: accept numeric strings for the Hz fields."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _text_or_raw(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def load_radio_calibration(path: str | Path, *, allow_placeholder: bool = False) -> RadioCalibration:
    """Read and validate a radio calibration YAML file; every error names the file (and the field).

    A file marked `placeholder: true` holds example numbers, not a measurement: a radio back end must not
    drive hardware from it, so it is refused unless allow_placeholder (tests, documentation) says otherwise.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RadioCalibrationError(f"{path}: cannot read radio calibration file: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RadioCalibrationError(f"{path}: cannot parse YAML: {exc}") from exc
    cal = from_mapping(doc, str(path))
    if cal.placeholder and not allow_placeholder:
        raise RadioCalibrationError(
            f"{path}: field 'placeholder' is true: these are example numbers that need a bench measurement "
            f"(docs/radio-calibration.md); measure the radio and set placeholder: false"
        )
    return cal


def write_radio_calibration(cal: RadioCalibration, path: str | Path, *, header: str | None = None) -> Path:
    """Write cal as YAML (optionally under a comment header) and check that it reads back identically."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" if line else "#" for line in (header or "").splitlines()]
    path.write_text(
        ("\n".join(lines) + "\n" if lines else "")
        + yaml.safe_dump(cal.to_mapping(), sort_keys=False, default_flow_style=None)
    )
    back = load_radio_calibration(path, allow_placeholder=True)
    if back != cal:
        raise RadioCalibrationError(f"{path}: written file does not read back identically")
    return path
