"""Stand-in radios for the rf link: what ``fedlora-radio-check --dry-run`` and the tests run on, in GNU Radio blocks.

Two radios joined by a cable and an attenuator, as the bench file describes them:

    edge: burst --> StandInTxRadio: digital samples -> dBm at its gain (radio.max_tx_power_dbm at rf.tx_gain_db,
                    dB for dB below; for the link's waveform at its digital level, as the bench defines it)
          --> Cable: minus the attenuation
    BS:   CableSource: the bursts with silence around them, tagged like a radio stream (rx_rate, rx_freq)
          --> channel_model: to dBFS at the RX gain, LO offset, receiver noise (channel.noise_psd_dbm_hz +
              channel.noise_figure_db over the radio's sample rate) --> the rf receiver

The BS stream advances only while a burst is in the cable (silence between bursts is skipped), so a check runs as
fast as the receivers decode, not in real time. Faults a test can force (StandInConfig): a noisier receiver than
the bench says, overflows (samples dropped, the stream re-tagged as gr-uhd and gr-soapy do), underflows (gr-uhd's
async messages), a radio that is not plugged in. Like a radio, a stand-in clamps a gain to its range.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phy.rf_radio import RadioReadback, RadioSpec

# the radios' gain ranges (uhd_usrp_probe: B210 TX 0-89.75, RX 0-76 dB; HackRF One through SoapyHackRF, amp off:
# TX VGA 0-47, RX LNA 0-40 + VGA 0-62)
GAIN_RANGES_DB = {
    ("uhd", "tx"): (0.0, 89.75),
    ("uhd", "rx"): (0.0, 76.0),
    ("soapy", "tx"): (0.0, 47.0),
    ("soapy", "rx"): (0.0, 102.0),
}
# RX port power that reads 0 dBFS at 0 dB of RX gain; each dB of gain lowers it by one (the example calibration
# file's -30 dBm at 50 dB)
FULL_SCALE_DBM_AT_0_DB = 20.0
PAD_BEFORE_SAMPLES = 2000  # silence the BS stream carries before each burst
PAD_AFTER_SAMPLES = 20000  # and after it: flushes the channel filters and the OFDM receivers


@dataclass(frozen=True)
class StandInConfig:
    """The stand-in bench: the LO offset between the radios, and faults a test forces."""

    lo_offset_hz: float = 100.0  # TX minus RX carrier (two radios without a shared reference)
    noise_figure_error_db: float = 0.0  # the receiver is this much noisier than channel.noise_figure_db
    overflows: int = 0  # the BS radio drops samples this many times (in the silence before the first burst)
    underflows_per_burst: int = 0  # a gr-uhd TX radio reports this many underflows after each burst
    missing: frozenset[str] = field(default_factory=frozenset)  # device args no radio answers to
    noise_seed: int = 0


def tx_power_dbm_at_gain(bench: Any, gain_db: float) -> float:
    """The bench's TX power model (phy.rf_radio.tx_gain_db inverted)."""
    return bench.radio.max_tx_power_dbm - (bench.rf.tx_gain_db - gain_db)


def burst_level_dbfs(bench: Any) -> float:
    """Mean power of phy.rf.edge_burst's samples: the OFDM peaks (~10 dB up) digital_backoff_db under full scale."""
    return -(10.0 + bench.rf.digital_backoff_db)


class Cable:
    """Bursts (amplitudes in sqrt(mW)) from the stand-in TX radios to the stand-in BS radio, in order."""

    def __init__(self, loss_db: float) -> None:
        self.gain = 10.0 ** (-loss_db / 20.0)
        self._bursts: deque[np.ndarray] = deque()
        self._cond = threading.Condition()

    def put(self, samples_mw: np.ndarray) -> None:
        with self._cond:
            self._bursts.append((samples_mw * self.gain).astype(np.complex64))
            self._cond.notify_all()

    def get(self, timeout_s: float) -> np.ndarray | None:
        with self._cond:
            if not self._bursts:
                self._cond.wait(timeout_s)
            return self._bursts.popleft() if self._bursts else None


class StandInRadios:
    """Opens stand-ins for the bench's radios, all on one cable; phy.bringup uses it in place of the real ones."""

    def __init__(self, bench: Any, attenuation_db: float, config: StandInConfig | None = None) -> None:
        self.bench, self.config = bench, config or StandInConfig()
        self.cable = Cable(attenuation_db)

    def find(self, device_args: str) -> list[str]:
        """What an enumeration of device_args would return."""
        return [] if device_args in self.config.missing else [f"stand-in radio ({device_args})"]

    def open(self, spec: RadioSpec) -> Any:
        if spec.device_args in self.config.missing:
            raise RuntimeError(f"no stand-in radio answers to {spec.device_args!r}")
        if spec.direction == "tx":
            return _tx_radio_class()(spec, self.bench, self.cable, self.config)
        return _rx_radio_class()(spec, self.bench, self.cable, self.config)


def _readback(spec: RadioSpec, gain_db: float) -> RadioReadback:
    lo, hi = GAIN_RANGES_DB[(spec.driver, spec.direction)]
    return RadioReadback(
        spec.sample_rate_hz, spec.center_freq_hz, min(max(gain_db, lo), hi), (lo, hi), True, "stand-in clock"
    )


def _uhd_underflow_msg() -> Any:
    """The message gr-uhd's usrp_sink publishes on async_msgs for one underflow."""
    import pmt

    value = pmt.dict_add(pmt.make_dict(), pmt.intern("event_code"), pmt.list1(pmt.intern("underflow")))
    value = pmt.dict_add(value, pmt.intern("channel"), pmt.from_uint64(0))
    return pmt.cons(pmt.intern("uhd_async_msg"), value)


@functools.cache
def _tx_radio_class() -> type:
    import pmt
    from gnuradio import gr

    class StandInTxRadio(gr.sync_block):
        """A TX radio: takes packet_len-tagged bursts, puts each on the cable at the power its gain gives."""

        def __init__(self, spec: RadioSpec, bench: Any, cable: Cable, config: StandInConfig) -> None:
            gr.sync_block.__init__(self, "standin_tx_radio", in_sig=[np.complex64], out_sig=None)
            self.spec, self.bench, self.cable, self.config = spec, bench, cable, config
            self.gain_db = spec.gain_db
            self._len_key, self._async = pmt.intern("packet_len"), pmt.intern("async_msgs")
            if spec.driver == "uhd":  # gr-soapy's sink has no such port
                self.message_port_register_out(self._async)
            self._parts: list[np.ndarray] = []
            self._need = 0  # samples still missing from the current burst

        def set_gain(self, a: float, b: float) -> None:
            """gr-uhd: set_gain(gain, chan); gr-soapy: set_gain(chan, gain)."""
            self.gain_db = a if self.spec.driver == "uhd" else b

        def read_back(self) -> RadioReadback:
            return _readback(self.spec, self.gain_db)

        def work(self, input_items: Any, output_items: Any) -> int:
            x = input_items[0]
            n, base = len(x), self.nitems_read(0)
            starts = {t.offset - base: pmt.to_long(t.value) for t in self.get_tags_in_window(0, 0, n, self._len_key)}
            i = 0
            while i < n:
                if i in starts:
                    self._flush()
                    self._need = starts.pop(i)
                end = min([n] + ([i + self._need] if self._need else []) + [s for s in starts if s > i])
                if self._need:
                    self._parts.append(x[i:end].copy())
                    self._need -= end - i
                    if not self._need:
                        self._flush()
                i = end
            return n

        def _flush(self) -> None:
            if not self._parts:
                return
            gain_db = self.read_back().gain_db
            scale_db = tx_power_dbm_at_gain(self.bench, gain_db) - burst_level_dbfs(self.bench)
            self.cable.put(np.concatenate(self._parts) * 10.0 ** (scale_db / 20.0))
            self._parts = []
            if self.spec.driver == "uhd":
                for _ in range(self.config.underflows_per_burst):
                    self.message_port_pub(self._async, _uhd_underflow_msg())

    return StandInTxRadio


@functools.cache
def _cable_source_class() -> type:
    import pmt
    from gnuradio import gr

    class CableSource(gr.sync_block):
        """The BS radio's ADC side: cable bursts with silence around them, tagged as gr-uhd/gr-soapy tag."""

        def __init__(self, spec: RadioSpec, cable: Cable, overflows: int) -> None:
            gr.sync_block.__init__(self, "standin_cable_source", in_sig=None, out_sig=[np.complex64])
            self.spec, self.cable, self.overflows = spec, cable, overflows
            self._pending = np.zeros(0, np.complex64)
            self._retag: list[int] = [0]  # absolute sample offsets to tag: the stream's start, then overflows

        def _tag(self, offset: int) -> None:
            self.add_item_tag(0, offset, pmt.intern("rx_rate"), pmt.from_double(self.spec.sample_rate_hz))
            self.add_item_tag(0, offset, pmt.intern("rx_freq"), pmt.from_double(self.spec.center_freq_hz))

        def work(self, input_items: Any, output_items: Any) -> int:
            out = output_items[0]
            if not len(self._pending):
                burst = self.cable.get(0.2)
                if burst is None:
                    return 0  # nothing on the cable: GNU Radio calls again (~250 ms later)
                start = self.nitems_written(0)
                # an overflow: samples lost in the silence before the burst, the stream re-tagged after them
                step = PAD_BEFORE_SAMPLES // (self.overflows + 1)
                self._retag += [start + step * (k + 1) for k in range(self.overflows)]
                self.overflows = 0
                silence_after = np.zeros(PAD_AFTER_SAMPLES, np.complex64)
                self._pending = np.concatenate([np.zeros(PAD_BEFORE_SAMPLES, np.complex64), burst, silence_after])
            n = min(len(out), len(self._pending))
            out[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            first = self.nitems_written(0)
            for offset in [o for o in self._retag if first <= o < first + n]:
                self._tag(offset)
                self._retag.remove(offset)
            return n

    return CableSource


@functools.cache
def _rx_radio_class() -> type:
    from gnuradio import channels, gr

    class StandInRxRadio(gr.hier_block2):
        """The BS radio: CableSource --> channel_model (dBm to dBFS at its gain, LO offset, receiver noise)."""

        def __init__(self, spec: RadioSpec, bench: Any, cable: Cable, config: StandInConfig) -> None:
            gr.hier_block2.__init__(
                self, "standin_rx_radio", gr.io_signature(0, 0, 0), gr.io_signature(1, 1, gr.sizeof_gr_complex)
            )
            self.spec, self.gain_db = spec, spec.gain_db
            full_scale_dbm = FULL_SCALE_DBM_AT_0_DB - self.read_back().gain_db
            noise_dbm = (
                bench.channel.noise_psd_dbm_hz
                + bench.channel.noise_figure_db
                + config.noise_figure_error_db
                + 10.0 * math.log10(spec.sample_rate_hz)
            )
            self.source = _cable_source_class()(spec, cable, config.overflows)
            self.channel = channels.channel_model(
                noise_voltage=10.0 ** ((noise_dbm - full_scale_dbm) / 20.0),
                frequency_offset=config.lo_offset_hz / spec.sample_rate_hz,
                epsilon=1.0,
                taps=[10.0 ** (-full_scale_dbm / 20.0)],
                noise_seed=config.noise_seed,
                block_tags=False,  # the radio's own tags go through
            )
            self.connect(self.source, self.channel, self)

        def read_back(self) -> RadioReadback:
            return _readback(self.spec, self.gain_db)

    return StandInRxRadio
