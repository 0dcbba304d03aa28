"""Payload constellations of the OFDM modem: points, the matching gr-digital objects, and hard decisions.

Gray-coded and normalised to unit average power (docs/pitfalls.md §3: ``constellation_qpsk()`` has power 4 in
3.10.5, which would put the payload 6 dB above the header). Pilots, sync words and the BPSK header also have unit
power per carrier, so every full OFDM symbol carries the same power and the transmitter scales the burst to unit
mean sample power. Which modulations exist and how many bits each carries is proto.numerology's to say; this
module only draws their points. Plain numpy; GNU Radio is imported only for ``gr_constellation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from proto.numerology import MODEM_BITS_PER_SYMBOL, MODEM_MODULATION_NAMES


def _gray(n: int) -> int:
    return n ^ (n >> 1)


def _psk_points(m: int) -> np.ndarray:
    """points[label] for Gray-coded M-PSK: neighbours on the circle differ in one bit."""
    pts = np.empty(m, dtype=np.complex128)
    for k in range(m):  # k = position on the circle
        pts[_gray(k)] = np.exp(2j * np.pi * k / m)
    return pts


def _qam16_points() -> np.ndarray:
    level = {0b00: -3.0, 0b01: -1.0, 0b11: 1.0, 0b10: 3.0}  # Gray per axis
    pts = np.array([level[lab >> 2] + 1j * level[lab & 3] for lab in range(16)])
    return pts / math.sqrt(10.0)


@dataclass(frozen=True)
class Constellation:
    """One payload constellation: points indexed by their Gray bit label, unit mean power."""

    name: str
    bits_per_symbol: int
    points: np.ndarray  # complex64, len 2**bits_per_symbol

    def gr_constellation(self) -> Any:
        """The same points as a gr-digital constellation object (power-normalised, unit power)."""
        return _gr_constellation(self.name)


def _make_constellations() -> dict[str, Constellation]:
    table = {
        "bpsk": np.array([1.0, -1.0], dtype=np.complex128),  # bit 0 -> +1
        "qpsk": np.array([1 + 1j, 1 - 1j, -1 + 1j, -1 - 1j]) / math.sqrt(2.0),  # MSB -> I sign, LSB -> Q sign
        "8psk": _psk_points(8) * np.exp(1j * np.pi / 8),  # no point on the axes, like gr's 8PSK
        "16qam": _qam16_points(),
    }
    if set(table) != set(MODEM_MODULATION_NAMES):
        raise RuntimeError(f"constellations {sorted(table)} differ from proto.numerology's {MODEM_MODULATION_NAMES}")
    out = {}
    for name, pts in table.items():
        pts = pts / math.sqrt(np.mean(np.abs(pts) ** 2))
        if len(pts) != 2 ** MODEM_BITS_PER_SYMBOL[name]:
            raise RuntimeError(f"{name}: {len(pts)} points for {MODEM_BITS_PER_SYMBOL[name]} bits per symbol")
        out[name] = Constellation(name, MODEM_BITS_PER_SYMBOL[name], pts.astype(np.complex64))
    return out


CONSTELLATIONS: dict[str, Constellation] = _make_constellations()


def get_modulation(name: str) -> Constellation:
    """The constellation of a modulation the modem carries; ValueError naming the choices otherwise."""
    try:
        return CONSTELLATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown modulation {name!r}; expected one of {list(MODEM_MODULATION_NAMES)}") from None


@cache
def _gr_constellation(name: str) -> Any:
    from gnuradio import digital

    mod = get_modulation(name)
    pts = [complex(p) for p in mod.points]
    return digital.constellation_calcdist(pts, list(range(len(pts))), 1, 1, digital.constellation.POWER_NORMALIZATION)


# Decision look-up tables (sign/magnitude slicing is ~10x faster than angles or distances in numpy).
# 8PSK: sector k (angle in [k*pi/4, (k+1)*pi/4)) from (imag < 0, real < 0, |real| < |imag|), then Gray label.
_8PSK_SECTOR = np.array([0, 1, 3, 2, 7, 6, 4, 5], dtype=np.intp)
_8PSK_LUT = _8PSK_SECTOR ^ (_8PSK_SECTOR >> 1)
_QAM16_AXIS_LUT = np.array([0b00, 0b01, 0b11, 0b10], dtype=np.intp)  # level index (-3,-1,1,3) -> Gray bits
_QAM16_T = 2.0 / math.sqrt(10.0)


def decide(symbols: np.ndarray, modulation: str) -> np.ndarray:
    """Nearest-point hard decisions: Gray labels of the points closest to the (unit-power) symbols."""
    re, im = symbols.real, symbols.imag
    if modulation == "bpsk":
        return (re < 0).astype(np.intp)
    if modulation == "qpsk":
        return ((re < 0).astype(np.intp) << 1) | (im < 0)
    if modulation == "8psk":
        idx = ((im < 0).astype(np.intp) << 2) | ((re < 0).astype(np.intp) << 1) | (np.abs(re) < np.abs(im))
        return _8PSK_LUT[idx]
    if modulation == "16qam":
        i_re = (re > -_QAM16_T).astype(np.intp) + (re > 0) + (re > _QAM16_T)
        i_im = (im > -_QAM16_T).astype(np.intp) + (im > 0) + (im > _QAM16_T)
        return (_QAM16_AXIS_LUT[i_re] << 2) | _QAM16_AXIS_LUT[i_im]
    mod = get_modulation(modulation)
    return np.argmin(np.abs(symbols[..., None] - mod.points[None, :]), axis=-1)
