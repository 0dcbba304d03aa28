"""Receiver noise floor (dBm/Hz at the RX port) from captured complex samples and a full-scale reference.

    python -m calibration.noise_floor capture.cfile --sample-rate-hz 1e6 --full-scale-dbm -27.5 [--format fc32]

The capture is taken with the RX port terminated in 50 ohm at the RX gain the bench uses
(docs/radio-calibration.md). Sample power is in dB full scale (0 dBFS = mean |x|^2 = 1, a complex tone of
amplitude 1); the full-scale reference `full_scale_dbm` is the RX-port input power that reads 0 dBFS at that
gain, measured once with a known input (`full_scale_dbm_from_tone`: a signal generator, or the calibrated TX
through a known attenuator). Then

    noise_floor_dbm_hz = full_scale_dbm + mean PSD (dBFS/Hz) over the flat part of the band

The PSD (Welch, Hann window) is averaged over the central `band_fraction` of the sampled band, skipping the
anti-alias filter's roll-off at the edges and +-`dc_exclude_hz` around DC, where direct-conversion radios (B210,
HackRF) show LO leakage and DC offset; a plain total-power measurement would count both.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

THERMAL_NOISE_DBM_HZ = -174.0  # kT at 290 K (the same reference as phy.radio_calibration)
SAMPLE_FORMATS = {  # file suffix -> format
    ".cfile": "fc32",
    ".fc32": "fc32",
    ".cf32": "fc32",
    ".bin": "fc32",
    ".raw": "fc32",
    ".sc16": "sc16",
    ".cs16": "sc16",
    ".sc8": "sc8",
    ".cs8": "sc8",
    ".npy": "npy",
}
SPUR_WARNING_DB = 10.0  # a PSD bin this far above the mean floor: the port is not quiet (spur or a signal)


@dataclass(frozen=True)
class NoiseFloor:
    noise_floor_dbm_hz: float
    noise_figure_db: float  # the floor above kT (290 K)
    psd_dbfs_hz: float  # mean PSD over the used bins, dB full scale per Hz
    power_dbfs: float  # total mean power of the capture (includes DC and band edges)
    bins_used: int
    max_excess_db: float  # strongest used bin above the mean: > SPUR_WARNING_DB means a spur or signal


def load_samples(path: str | Path, fmt: str | None = None) -> np.ndarray:
    """Complex samples scaled to full scale 1.0.

    fc32: GNU Radio file sink / UHD complex float (I, Q float32); sc16: interleaved int16 (/32768);
    sc8: interleaved int8 as hackrf_transfer writes (/128); npy: a numpy array of complex values.
    """
    path = Path(path)
    fmt = fmt or SAMPLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown sample file type {path.suffix!r}; pass a format ({sorted(set(SAMPLE_FORMATS.values()))})"
        )
    try:
        if fmt == "npy":
            x = np.load(path, allow_pickle=False)
            if not np.iscomplexobj(x):
                raise ValueError(f"{path}: .npy must hold complex samples, got dtype {x.dtype}")
            return np.asarray(x, dtype=np.complex64).ravel()
        raw = {"fc32": np.float32, "sc16": np.int16, "sc8": np.int8}[fmt]
    except KeyError:
        raise ValueError(f"unknown sample format {fmt!r}; expected fc32, sc16, sc8 or npy") from None
    data = np.fromfile(path, dtype=raw)
    if data.size % 2:
        raise ValueError(f"{path}: odd number of {fmt} values: not interleaved I/Q")
    scale = {"fc32": 1.0, "sc16": 1.0 / 32768.0, "sc8": 1.0 / 128.0}[fmt]
    iq = data.astype(np.float32).reshape(-1, 2) * scale
    return (iq[:, 0] + 1j * iq[:, 1]).astype(np.complex64)


def power_dbfs(samples: np.ndarray) -> float:
    """Mean power of complex samples in dB full scale (0 dBFS = mean |x|^2 of 1)."""
    x = _check_samples(samples)
    return 10.0 * math.log10(max(float(np.mean(np.abs(x) ** 2)), 1e-30))


def psd_dbfs_hz(samples: np.ndarray, sample_rate_hz: float, nfft: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(frequency_hz, PSD in dBFS/Hz), DC in the middle: Welch, Hann window, 50 % overlap.

    Normalised so that white noise of mean power P (full-scale units) reads P / sample_rate_hz in every bin.
    """
    x = _check_samples(samples)
    if not (math.isfinite(sample_rate_hz) and sample_rate_hz > 0):
        raise ValueError(f"sample_rate_hz must be > 0, got {sample_rate_hz!r}")
    if nfft < 16 or x.size < nfft:
        raise ValueError(f"need at least nfft={nfft} samples (nfft >= 16), got {x.size}")
    window = np.hanning(nfft).astype(np.float64)
    step = nfft // 2
    starts = range(0, x.size - nfft + 1, step)
    acc = np.zeros(nfft)
    for s in starts:
        acc += np.abs(np.fft.fft(x[s : s + nfft] * window)) ** 2
    psd = np.fft.fftshift(acc / len(starts)) / (sample_rate_hz * float(np.sum(window**2)))
    freqs = np.fft.fftshift(np.fft.fftfreq(nfft, d=1.0 / sample_rate_hz))
    return freqs, 10.0 * np.log10(np.maximum(psd, 1e-30))


def noise_floor_dbm_hz(
    samples: np.ndarray,
    sample_rate_hz: float,
    full_scale_dbm: float,
    *,
    band_fraction: float = 0.8,
    dc_exclude_hz: float | None = None,
    nfft: int = 1024,
) -> NoiseFloor:
    """Noise floor referred to the RX port from a terminated-input capture (see the module docstring).

    dc_exclude_hz defaults to 1 % of the sample rate (at least 2 FFT bins each side).
    """
    if not math.isfinite(full_scale_dbm):
        raise ValueError(f"full_scale_dbm must be finite, got {full_scale_dbm!r}")
    if not 0.0 < band_fraction <= 1.0:
        raise ValueError(f"band_fraction must be in (0, 1], got {band_fraction!r}")
    freqs, psd_db = psd_dbfs_hz(samples, sample_rate_hz, nfft)
    bin_hz = sample_rate_hz / nfft
    dc_hz = max(0.01 * sample_rate_hz, 2.0 * bin_hz) if dc_exclude_hz is None else float(dc_exclude_hz)
    if dc_hz < 0:
        raise ValueError(f"dc_exclude_hz must be >= 0, got {dc_exclude_hz!r}")
    use = (np.abs(freqs) <= band_fraction * sample_rate_hz / 2.0) & (np.abs(freqs) > dc_hz)
    if np.count_nonzero(use) < 8:
        raise ValueError(
            f"only {np.count_nonzero(use)} PSD bins left after band_fraction={band_fraction} and "
            f"dc_exclude_hz={dc_hz:g}; use a larger nfft or a smaller DC exclusion"
        )
    lin = 10.0 ** (psd_db[use] / 10.0)
    mean_psd_db = 10.0 * math.log10(float(np.mean(lin)))
    floor = full_scale_dbm + mean_psd_db
    return NoiseFloor(
        noise_floor_dbm_hz=floor,
        noise_figure_db=floor - THERMAL_NOISE_DBM_HZ,
        psd_dbfs_hz=mean_psd_db,
        power_dbfs=power_dbfs(samples),
        bins_used=int(np.count_nonzero(use)),
        max_excess_db=float(np.max(psd_db[use]) - mean_psd_db),
    )


def full_scale_dbm_from_tone(
    samples: np.ndarray, input_power_dbm: float, noise_samples: np.ndarray | None = None
) -> float:
    """RX-port power that reads 0 dBFS, from a capture of a known input (CW tone or any signal of known power).

    input_power_dbm: power at the RX port (generator level minus cable/attenuator loss, or the calibrated TX's
    tx_power_dbm_for(gain) minus the attenuation). noise_samples (port terminated, same gain) lets the noise
    power be subtracted; it matters only when the input is within ~20 dB of the floor.
    """
    if not math.isfinite(input_power_dbm):
        raise ValueError(f"input_power_dbm must be finite, got {input_power_dbm!r}")
    signal = float(np.mean(np.abs(_check_samples(samples)) ** 2))
    if noise_samples is not None:
        signal -= float(np.mean(np.abs(_check_samples(noise_samples)) ** 2))
    if not signal > 0:
        raise ValueError(
            "the reference capture has no power above the noise capture: the input is not reaching "
            "the receiver, or it is below the floor"
        )
    return input_power_dbm - 10.0 * math.log10(signal)


def _check_samples(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D array, got shape {x.shape}")
    if not np.iscomplexobj(x):
        raise ValueError(f"samples must be complex I/Q, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or inf")
    return x


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", type=Path, help="capture with the RX port terminated (.cfile/.fc32, .sc16, .sc8, .npy)")
    ap.add_argument("--sample-rate-hz", type=float, required=True)
    ap.add_argument(
        "--full-scale-dbm",
        type=float,
        required=True,
        help="RX-port power that reads 0 dBFS at this RX gain (full_scale_dbm_from_tone)",
    )
    ap.add_argument("--format", choices=("fc32", "sc16", "sc8", "npy"), help="default: from the file suffix")
    ap.add_argument("--band-fraction", type=float, default=0.8)
    ap.add_argument("--dc-exclude-hz", type=float)
    ap.add_argument("--nfft", type=int, default=1024)
    args = ap.parse_args(argv)
    try:
        x = load_samples(args.samples, args.format)
        result = noise_floor_dbm_hz(
            x,
            args.sample_rate_hz,
            args.full_scale_dbm,
            band_fraction=args.band_fraction,
            dc_exclude_hz=args.dc_exclude_hz,
            nfft=args.nfft,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in asdict(result).items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    if result.max_excess_db > SPUR_WARNING_DB:
        print(
            f"warning: a PSD bin is {result.max_excess_db:.1f} dB above the floor: a spur or a signal reaches "
            f"the receiver (terminate the port, shield, or narrow --band-fraction)",
            file=sys.stderr,
        )
    print(f"{x.size} samples ({x.size / args.sample_rate_hz:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
