"""FDMA subbands of the gr-zmq-iq medium: where each device sits in the band, and the filters that put it there.

Subband plan (the BS's schedule; the air and the BS both apply it)
------------------------------------------------------------------
The medium is complex baseband at ``total_bandwidth_hz`` samples/s, spanning
[-B/2, +B/2). Every round the BS lays the participating devices' subbands side
by side in device-id order, starting at the lower band edge:

    device i occupies [-B/2 + sum(b_j for participating j < i), ... + b_i),  b_i = its planned bandwidth_hz

so the controller's bandwidth share *is* the subband width (and the OFDM
sample rate of that device). Equal shares of 4 devices in 1 MHz give centres
-375, -125, +125, +375 kHz. A device that does not take part gets no subband;
a plan whose widths add up to more than B is refused (``plan_subbands``
raises). The BS computes the plan when it sends the round's plans and
announces it to the air (``phy.air``); the edge needs none of it: it
modulates at baseband at its width's sample rate, and the air (standing in
for the edge's RF front end) shifts it into place, as an FDMA scheduler would
tell a radio which channel to tune. When shares change between rounds both
ends retune (``SubbandUpconverter.retune`` / ``SubbandChannelizer.retune``:
resampling rate, filter, frequency) while no burst is on the air; a burst
whose width does not match the current plan is refused by the air.

Filters
-------
The OFDM signal fills 52 of 64 carriers: +-0.406 b around its centre. Both the air's transmit filter and the
BS's channel filter pass +-0.41 b flat and stop from +-0.52 b at ``attenuation_db``. The stop edge sits just
past the subband's own edge for two reasons: the air keeps a device's OFDM sidelobes out of its neighbours'
subbands, and the BS channel filter leaves almost nothing above the Nyquist frequency of the subband rate b,
where it would alias onto the band's other edge and leak into the edge carriers through the receiver's
rectangular FFT. Measured (4 devices at 49 / 35 / 29 / 24 dB, 60 dB filters, python /tmp link test):
stop edge 0.58 b: the neighbours of the 49 dB device lost 2.6-3.2 dB; 0.52 b: every device within 0.1 dB of
its target except the strongest, which reads 47 dB (a sharper filter rings beyond the 16-sample cyclic prefix:
0.50 b put that floor at 44 dB). The 10 m device is ~25 dB above the 50 m one, fading adds a few dB either
way: 60 dB keeps leakage ~30 dB under the far device's noise floor. The BS uses ``pfb_arb_resampler_ccf``
(any rate ratio, retunable while running); the air resamples each burst once, in numpy (phy.air_medium).

Level (the SNR convention of phy.gr_loopback)
----------------------------------------------
The air adds complex white noise of power 1 per medium sample (= the thermal
noise over the whole band B). A device's burst (unit mean power at rate b)
is scaled so that, after the BS's unit-gain channel filter, signal power over
noise power per sample *at rate b* equals the SNR SimChannel gives for its
power, distance, fading and width:  amplitude^2 = 10^((SNR - 10 log10(B / b)) / 10)
(in its subband the noise is B / b times weaker than over the whole band).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

PASS_EDGE = 0.41  # x subband width: passband edge (OFDM carriers reach +-0.406)
STOP_EDGE = 0.52  # x subband width: stopband edge, just past the subband's own edge (see Filters)
RESAMPLER_FILTERS = 32  # pfb_arb_resampler_ccf filter arms
DEFAULT_ATTENUATION_DB = 60.0
CHANNELIZER_BUFFER_ITEMS = 1 << 16  # output buffer of a channelizer's blocks, samples (512 KB)
_CFO_STREAM = 0xCF0  # separates the per-link carrier offset draw from other users of the seed


@dataclass(frozen=True)
class Subband:
    """One device's slice of the medium (Hz, relative to the medium's centre)."""

    device_id: int
    center_hz: float
    bandwidth_hz: float

    @property
    def low_hz(self) -> float:
        return self.center_hz - self.bandwidth_hz / 2

    @property
    def high_hz(self) -> float:
        return self.center_hz + self.bandwidth_hz / 2


def plan_subbands(total_bandwidth_hz: float, widths_hz: Mapping[int, float]) -> dict[int, Subband]:
    """The round's subbands: participating devices side by side in device-id order from the lower band edge."""
    if not (math.isfinite(total_bandwidth_hz) and total_bandwidth_hz > 0):
        raise ValueError(f"total_bandwidth_hz must be finite and > 0, got {total_bandwidth_hz!r}")
    for device_id, width in widths_hz.items():
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"device id must be an int >= 0, got {device_id!r}")
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise ValueError(f"device {device_id}: bandwidth_hz must be finite and > 0, got {width!r}")
    used = sum(widths_hz.values())
    if used > total_bandwidth_hz * (1 + 1e-9):
        raise ValueError(f"subbands need {used:.0f} Hz, more than the {total_bandwidth_hz:.0f} Hz of the band")
    plan: dict[int, Subband] = {}
    low = -total_bandwidth_hz / 2
    for device_id in sorted(widths_hz):
        width = float(widths_hz[device_id])
        plan[device_id] = Subband(device_id, low + width / 2, width)
        low += width
    return plan


def equal_subbands(total_bandwidth_hz: float, device_count: int) -> dict[int, Subband]:
    """The plan before the BS has announced one: every device an equal share (the fixed policy's plan)."""
    return plan_subbands(total_bandwidth_hz, {k: total_bandwidth_hz / device_count for k in range(device_count)})


def signal_amplitude(snr_db: float, bandwidth_hz: float, total_bandwidth_hz: float) -> float:
    """Scale for a unit-power burst so it reaches snr_db in its subband over unit-power medium noise."""
    return 10.0 ** ((snr_db - 10.0 * math.log10(total_bandwidth_hz / bandwidth_hz)) / 20.0)


def carrier_offset_hz(seed: int, device_id: int, max_cfo_hz: float) -> float:
    """A link's fixed carrier frequency offset, uniform in [-max, +max], reproducible per (seed, device)."""
    if max_cfo_hz <= 0:
        return 0.0
    rng = np.random.default_rng([seed, _CFO_STREAM, device_id])
    return float(rng.uniform(-max_cfo_hz, max_cfo_hz))


def _lowpass(bandwidth_hz: float, sample_rate_hz: float, attenuation_db: float) -> list[float]:
    """Prototype for pfb_arb_resampler_ccf: designed at RESAMPLER_FILTERS x the input rate, unit gain per arm."""
    from gnuradio.fft import window
    from gnuradio.filter import firdes

    fs = RESAMPLER_FILTERS * sample_rate_hz
    cutoff = (PASS_EDGE + STOP_EDGE) / 2 * bandwidth_hz
    transition = (STOP_EDGE - PASS_EDGE) * bandwidth_hz
    return list(firdes.low_pass_2(RESAMPLER_FILTERS, fs, cutoff, transition, attenuation_db, window.WIN_KAISER, 6.76))


def upconverter_taps(bandwidth_hz: float, attenuation_db: float = DEFAULT_ATTENUATION_DB) -> list[float]:
    """Interpolating filter: subband rate -> medium rate (the input runs at bandwidth_hz)."""
    return _lowpass(bandwidth_hz, bandwidth_hz, attenuation_db)


def channelizer_taps(
    bandwidth_hz: float, total_bandwidth_hz: float, attenuation_db: float = DEFAULT_ATTENUATION_DB
) -> list[float]:
    """Decimating filter: medium rate -> subband rate (the input runs at total_bandwidth_hz)."""
    return _lowpass(bandwidth_hz, total_bandwidth_hz, attenuation_db)


def _make_upconverter_class():
    from gnuradio import blocks, filter, gr

    class SubbandUpconverter(gr.hier_block2):
        """Air side of one link: baseband at the subband rate -> medium rate, shifted into the subband.

        Signal chain::  in (rate b) --> pfb_arb_resampler(B / b) --> rotator(centre + CFO) --> out (rate B)
        """

        def __init__(
            self,
            subband: Subband,
            total_bandwidth_hz: float,
            *,
            cfo_hz: float = 0.0,
            attenuation_db: float = DEFAULT_ATTENUATION_DB,
        ) -> None:
            gr.hier_block2.__init__(
                self,
                "subband_upconverter",
                gr.io_signature(1, 1, gr.sizeof_gr_complex),
                gr.io_signature(1, 1, gr.sizeof_gr_complex),
            )
            self.total_bandwidth_hz = float(total_bandwidth_hz)
            self.attenuation_db = attenuation_db
            self.cfo_hz = float(cfo_hz)
            self.subband = subband
            self.resampler = filter.pfb_arb_resampler_ccf(
                self.total_bandwidth_hz / subband.bandwidth_hz,
                upconverter_taps(subband.bandwidth_hz, attenuation_db),
                RESAMPLER_FILTERS,
            )
            self.rotator = blocks.rotator_cc(self._phase_inc(subband))
            self.connect(self, self.resampler, self.rotator, self)

        def _phase_inc(self, subband: Subband) -> float:
            return 2 * math.pi * (subband.center_hz + self.cfo_hz) / self.total_bandwidth_hz

        def retune(self, subband: Subband) -> None:
            """New centre and/or width (call while no burst of this device is on the air)."""
            if subband.bandwidth_hz != self.subband.bandwidth_hz:
                self.resampler.set_taps(upconverter_taps(subband.bandwidth_hz, self.attenuation_db))
                self.resampler.set_rate(self.total_bandwidth_hz / subband.bandwidth_hz)
            self.rotator.set_phase_inc(self._phase_inc(subband))
            self.subband = subband

    return SubbandUpconverter


def _make_channelizer_class():
    from gnuradio import blocks, filter, gr

    class SubbandChannelizer(gr.hier_block2):
        """BS side of one link: the medium's subband shifted to DC, filtered and resampled to the subband rate.

        Signal chain::  in (rate B) --> rotator(-centre) --> pfb_arb_resampler(b / B) --> out (rate b)
        """

        def __init__(
            self, subband: Subband, total_bandwidth_hz: float, *, attenuation_db: float = DEFAULT_ATTENUATION_DB
        ) -> None:
            gr.hier_block2.__init__(
                self,
                "subband_channelizer",
                gr.io_signature(1, 1, gr.sizeof_gr_complex),
                gr.io_signature(1, 1, gr.sizeof_gr_complex),
            )
            self.total_bandwidth_hz = float(total_bandwidth_hz)
            self.attenuation_db = attenuation_db
            self.subband = subband
            self.rotator = blocks.rotator_cc(self._phase_inc(subband))
            self.resampler = filter.pfb_arb_resampler_ccf(
                subband.bandwidth_hz / self.total_bandwidth_hz,
                channelizer_taps(subband.bandwidth_hz, self.total_bandwidth_hz, attenuation_db),
                RESAMPLER_FILTERS,
            )
            # batches: GNU Radio's default 32 KB buffers let the rotator pass 4,096 medium samples a call, so the
            # receiver behind a 1/16 share got 256-sample calls, paying per call, not per sample (pitfalls §12)
            self.rotator.set_min_output_buffer(0, CHANNELIZER_BUFFER_ITEMS)
            self.resampler.set_min_output_buffer(0, CHANNELIZER_BUFFER_ITEMS)
            self.connect(self, self.rotator, self.resampler, self)

        def _phase_inc(self, subband: Subband) -> float:
            return -2 * math.pi * subband.center_hz / self.total_bandwidth_hz

        def retune(self, subband: Subband) -> None:
            """New centre and/or width (call while no burst is on the air)."""
            if subband.bandwidth_hz != self.subband.bandwidth_hz:
                self.resampler.set_taps(
                    channelizer_taps(subband.bandwidth_hz, self.total_bandwidth_hz, self.attenuation_db)
                )
                self.resampler.set_rate(subband.bandwidth_hz / self.total_bandwidth_hz)
            self.rotator.set_phase_inc(self._phase_inc(subband))
            self.subband = subband

        def samples_out(self) -> int:
            return int(self.resampler.nitems_written(0))

    return SubbandChannelizer


def __getattr__(name: str):  # the GNU Radio hier blocks are built on first use: this module imports without GR
    if name == "SubbandUpconverter":
        cls = _make_upconverter_class()
    elif name == "SubbandChannelizer":
        cls = _make_channelizer_class()
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
