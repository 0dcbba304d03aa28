"""Software loopback of the OFDM PHY in one flowgraph: OfdmTransmitter -> channel_model -> + noise -> OfdmReceiver.

For tests and calibration (calibration/per_sweep.py). The flowgraph starts
once and keeps running; ``run_packets`` feeds it and collects what comes out.

SNR convention (the same as phy.channel and phy.ofdm)
------------------------------------------------------
``snr_db`` is the *time-domain* SNR over the whole sampled bandwidth: mean
power of the transmitted burst samples (zero padding excluded; the
transmitter scales full OFDM symbols to power 1.0) divided by the complex
noise power per sample added after the channel model (noise power =
noise_voltage**2, measured, as channel_model's own convention).

The noise is GNU Radio's ``analog.noise_source_c`` (a fresh Gaussian draw per sample), not channel_model's
built-in one: that is a ``fastnoise_source`` drawing from a pool of 8,192 samples, refilled only when the noise
level changes, so a long run at one SNR saw the same few thousand noise samples again and again (about one
point of 8PSK PER at the waterfall). channel_model keeps the carrier offset and timing; its own noise is 0.

The noise is white over all 64 FFT bins while the signal sits on 52 of them, so Es/N0 per occupied subcarrier
is SNR + 0.90 dB; the receiver reports (after its calibration offset) in the time-domain convention again.

Why the stock loopback drops packets (gnuradio issue 6891) and how this avoids it
---------------------------------------------------------------------------------
``header_payload_demux`` starts a packet at its Schmidl & Cox trigger, then
consumes header + payload minus one item and only then looks for the next
trigger. The trigger lands anywhere on the timing metric's plateau: measured
here at 76..81 samples after the preamble start, varying per packet. With
packets back to back (as the stock example sends them), the next trigger is
exactly one packet length after the current packet's true start; when it
comes 2 or more samples earlier (relative to its own preamble) than the
current one did, it lies inside the range the demux has already consumed, and
that packet vanishes without even a header error (the mechanism gnuradio
PR 5092 describes). ``measure_back_to_back_loss``: 12 % / 9 % of 300
100- / 1000-byte QPSK packets lost at 40 dB with no gap (18 % with the
stock-like detector), 0 % with the default padding. A second effect: the last packet of a burst is released only when
more samples arrive. Every packet here carries zero padding (pre_pad before,
post_pad after; 16 + 224 samples by default), far more than the trigger
jitter and enough to flush the receiver after a burst's last packet.

Pacing (docs/pitfalls.md §7): at most ``window_samples`` are in flight between what
the transmitter was given and what the receiver has consumed.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pmt
from gnuradio import analog, blocks, channels, gr

from phy import ofdm
from phy.ofdm_decoder import pdu_to_result
from phy.ofdm_rx import OfdmReceiver
from phy.ofdm_tx import OfdmTransmitter
from proto import numerology

NOISE_BUFFER_SAMPLES = 8192  # the noise source's output buffer (GNU Radio may round it up to a page multiple)
NOISE_FLUSH_SAMPLES = 16384  # > that buffer: zeros that carry the old noise level out before the next packet
MAX_PACKETS_IN_FLIGHT = 64  # far from the ~1000 queued bursts of docs/pitfalls.md §7
RECORDING_FLUSH_SAMPLES = 256  # zeros after the last packet at close: > the channel model's filter history


@dataclass
class RxPacket:
    """One packet out of the receiver (CRC failures included)."""

    data: bytes
    crc_ok: bool
    snr_db: float  # calibrated estimate (receiver's snr_offset_db applied)
    modulation: str = ""
    index: int = -1  # position in the frames given to run_packets
    snr_raw_db: float = math.nan  # estimate before the calibration offset


class PduCollector(gr.basic_block):
    """Message sink: keeps the receiver's PDUs for a Python thread to pick up."""

    def __init__(self) -> None:
        gr.basic_block.__init__(self, "ofdm_pdu_collector", None, None)
        self.message_port_register_in(pmt.intern("in"))
        self.set_msg_handler(pmt.intern("in"), self._handle)
        self._cond = threading.Condition()
        self._items: list[tuple[bytes, dict]] = []
        self.count = 0

    def _handle(self, msg: pmt.pmt_t) -> None:
        item = pdu_to_result(msg)
        with self._cond:
            self._items.append(item)
            self.count += 1
            self._cond.notify_all()

    def take(self, timeout_s: float = 0.0) -> list[tuple[bytes, dict]]:
        """Everything collected so far; waits up to timeout_s if there is nothing yet."""
        with self._cond:
            if not self._items and timeout_s > 0:
                self._cond.wait(timeout_s)
            items, self._items = self._items, []
        return items


class LoopbackModem:
    """tx -> channel_model(AWGN, optional frequency offset, tags blocked) -> rx, in one running top_block."""

    def __init__(
        self,
        snr_db: float = 30.0,
        *,
        freq_offset: float = 0.0,
        snr_offset_db: float = 0.0,
        noise_seed: int = 0,
        default_modulation: str = "qpsk",
        pre_pad: int = numerology.DEFAULT_PRE_PAD_SAMPLES,
        post_pad: int = numerology.DEFAULT_POST_PAD_SAMPLES,
        window_samples: int = 200_000,
        rx_kwargs: dict | None = None,
        iq_data_path: Path | None = None,
    ) -> None:
        """freq_offset: normalised (cycles/sample) as channel_model takes it; 1/64 = one subcarrier.
        iq_data_path: also write what the receiver takes in (complex64) to this file (phy.iq_record); sample n
        of the file is sample n the transmitter emitted, so `last_spans` locate each packet in it."""
        self.tb = gr.top_block("ofdm_loopback")
        self.tx = OfdmTransmitter(default_modulation, pre_pad=pre_pad, post_pad=post_pad)
        self.channel = channels.channel_model(
            noise_voltage=0.0, frequency_offset=freq_offset, epsilon=1.0, taps=[1.0], block_tags=True
        )  # docs/pitfalls.md §1: no TX tags into the RX
        # seed + 1: GNU Radio seeds a generator given 0 from the clock, and a loopback run must repeat
        self.noise = analog.noise_source_c(analog.GR_GAUSSIAN, ofdm.noise_voltage_for_snr(snr_db), noise_seed + 1)
        self.noise.set_max_output_buffer(NOISE_BUFFER_SAMPLES)  # what runs ahead at an old level (set_snr_db)
        self.add_noise = blocks.add_cc()
        self.rx = OfdmReceiver(snr_offset_db, **(rx_kwargs or {}))
        self.collector = PduCollector()
        self.tb.connect(self.tx, self.channel, (self.add_noise, 0))
        self.tb.connect(self.noise, (self.add_noise, 1))
        self.tb.connect(self.add_noise, self.rx)
        if iq_data_path is not None:
            self.iq_sink = blocks.file_sink(gr.sizeof_gr_complex, str(iq_data_path), False)
            self.iq_sink.set_unbuffered(True)  # the file holds every sample handed on: a round's close can read it
            self.tb.connect(self.add_noise, self.iq_sink)
        self.tb.msg_connect(self.rx, "out", self.collector, "in")
        self.snr_db = float(snr_db)
        self.window_samples = max(int(window_samples), 2 * numerology.MAX_FRAME_SAMPLES)
        self._posted_samples = 0
        self.last_spans: list[tuple[int, int]] = []  # (first sample, samples) of each packet of the last run
        self._next_num = 0
        self._closed = False
        self.tb.start()

    # ----------------------------------------------------------------- control
    def set_snr_db(self, snr_db: float) -> None:
        if not math.isfinite(snr_db):
            raise ValueError(f"snr_db must be finite, got {snr_db}")
        if float(snr_db) == self.snr_db:
            return
        self.snr_db = float(snr_db)
        self.noise.set_amplitude(ofdm.noise_voltage_for_snr(snr_db))
        # the noise source runs ahead of the signal: up to NOISE_BUFFER_SAMPLES generated at the old level sit
        # in its output buffer. Push zeros through so the next packet sees the new noise level only.
        self.tx.send_gap(NOISE_FLUSH_SAMPLES)
        self._posted_samples += NOISE_FLUSH_SAMPLES

    def set_snr_offset_db(self, offset_db: float) -> None:
        self.rx.set_snr_offset_db(offset_db)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if hasattr(self, "iq_sink"):  # the recording gets the last packet's samples before the stop: the
                self.tx.send_gap(RECORDING_FLUSH_SAMPLES)  # channel model holds a few back until more come
            deadline = time.monotonic() + 2.0
            while hasattr(self, "iq_sink") and self.iq_sink.nitems_read(0) < self._posted_samples:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self.tb.stop()
            self.tb.wait()
            if hasattr(self, "iq_sink"):
                self.iq_sink.close()

    def __enter__(self) -> LoopbackModem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- traffic
    def run_packets(
        self,
        frames: Sequence[bytes],
        modulation: str | Sequence[str] = "qpsk",
        snr_db: float | None = None,
        *,
        quiet_s: float = 0.25,
        timeout_s: float | None = None,
    ) -> list[RxPacket]:
        """Send frames (one packet each) and return what the receiver decoded, ordered by frame index.

        modulation: one for all frames, or one per frame (mixed in one run).
        Lost packets are simply absent; CRC failures come back with crc_ok False.
        Raises ValueError (before sending anything) for an oversized frame or unknown modulation.
        """
        if self._closed:
            raise RuntimeError("LoopbackModem is closed")
        mods = [modulation] * len(frames) if isinstance(modulation, str) else list(modulation)
        if len(mods) != len(frames):
            raise ValueError(f"{len(mods)} modulations for {len(frames)} frames")
        for m in set(mods):
            ofdm.get_modulation(m)
        checked = [ofdm.check_packet(f, self.tx.max_packet_bytes) for f in frames]
        if snr_db is not None:
            self.set_snr_db(snr_db)
        self.collector.take()  # drop leftovers of an earlier, timed-out run

        pads = {"pre_pad_samples": self.tx.pre_pad, "post_pad_samples": self.tx.post_pad}
        sizes = [numerology.packet_samples(len(f), m, **pads) for f, m in zip(checked, mods)]
        total = sum(sizes)
        if timeout_s is None:
            timeout_s = 20.0 + total / 100_000.0  # >10x slower than this loopback runs on a busy 2-core box
        deadline = time.monotonic() + timeout_s
        base_num = self._next_num
        self._next_num = (base_num + len(frames)) & 0xFF
        results: list[RxPacket] = []
        posted = 0
        last_ok = -1  # index of the last CRC-ok packet: packets come out in the order they went in

        def collect(wait_s: float) -> None:
            nonlocal last_ok
            for data, meta in self.collector.take(wait_s):
                crc_ok = bool(meta.get("crc_ok", False))
                rel = (int(meta.get(ofdm.META_PACKET_NUM, 0)) - base_num) & 0xFF
                # the first index after the last good packet with this 8-bit number (< 256 packets lost in a row)
                idx = last_ok + 1 + ((rel - (last_ok + 1)) % 256)
                if idx >= posted:
                    continue  # not sent yet in this run: a late packet of an earlier run, or a garbage header
                if crc_ok:
                    last_ok = idx
                results.append(
                    RxPacket(
                        data,
                        crc_ok,
                        float(meta.get("snr_db", math.nan)),
                        str(meta.get("modulation", "")),
                        idx,
                        float(meta.get("snr_raw_db", math.nan)),
                    )
                )

        start_samples = self._posted_samples
        self.last_spans = spans = []
        ends: list[int] = []  # sample count at the end of each posted packet
        while posted < len(frames):
            rx_in = self.rx.samples_in()
            in_flight = self._posted_samples - rx_in
            packets_in_flight = posted - bisect.bisect_right(ends, rx_in)
            if in_flight <= 0 or (
                in_flight + sizes[posted] <= self.window_samples and packets_in_flight < MAX_PACKETS_IN_FLIGHT
            ):
                self.tx.source.enqueue(checked[posted], mods[posted], (base_num + posted) & 0xFF)
                spans.append((self._posted_samples, sizes[posted]))
                self._posted_samples += sizes[posted]
                ends.append(self._posted_samples)
                posted += 1
                continue
            collect(0.001)
            if time.monotonic() > deadline:
                raise TimeoutError(f"loopback stalled: posted {posted}/{len(frames)} packets")
        # Drain: wait until the receiver consumed everything, then until results stop coming.
        end = start_samples + total
        last_change = time.monotonic()
        n_seen = len(results)
        while len(results) < len(frames):
            collect(0.01)
            now = time.monotonic()
            if len(results) != n_seen:
                n_seen, last_change = len(results), now
            caught_up = self.rx.samples_in() >= end - numerology.SYMBOL_SAMPLES
            if caught_up and now - last_change > quiet_s:
                break
            if now > deadline:
                break
        results.sort(key=lambda r: r.index)
        return results


def measure_back_to_back_loss(
    n_packets: int = 300, frame_bytes: int = 100, modulation: str = "qpsk", snr_db: float = 40.0
) -> dict[str, float]:
    """Issue 6891 on this receiver: loss with packets back to back (no zero padding) vs the default padding.

    Three sacrificial packets follow the measured ones, so the unpadded run's tail is flushed too.
    """
    out: dict[str, float] = {}
    frames = [bytes([i & 0xFF]) * frame_bytes for i in range(n_packets + 3)]
    padded = ("padded", numerology.DEFAULT_PRE_PAD_SAMPLES, numerology.DEFAULT_POST_PAD_SAMPLES)
    for label, pre, post in (("no_padding", 0, 0), padded):
        with LoopbackModem(snr_db, pre_pad=pre, post_pad=post) as modem:
            got = modem.run_packets(frames, modulation, quiet_s=0.5)
        ok = {r.index for r in got if r.crc_ok and r.index < n_packets and r.data == frames[r.index]}
        out[label] = 1.0 - len(ok) / n_packets
    return out
