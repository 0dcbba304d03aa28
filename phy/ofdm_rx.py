"""OFDM receiver: complex baseband in, one PDU per detected packet out (message port ``out``).

Signal chain (``digital.ofdm_rx``'s structure; Python only at the end of the payload path)::

    in --> SchmidlCoxSync --(freq)--> frequency_modulator -----+
    in --> delay(80 + 8) --------------------------------------x--> header_payload_demux
    hpd.header  --> FFT --> ofdm_chanest --> frame_equalizer(simpledfe, BPSK) --> serializer
                --> constellation_decoder --> packet_headerparser_b --msg--> hpd
    hpd.payload --> FFT --> frame_equalizer(soft, static) --> PayloadDecoder --msg--> out

The header is gr-digital's own format parsed by the stock C++ parser (see
phy.ofdm for how it carries the modulation), so the demux's header handshake
never waits for Python. SchmidlCoxSync is ``ofdm_sync_sc_cfb`` rebuilt from
the same blocks with a deterministic plateau detector (see its docstring), and
the detection threshold is 0.55 instead of 0.9 (see SYNC_THRESHOLD).

Equalizer with soft output. The stock payload equalizer
(``ofdm_equalizer_simpledfe(..., enable_soft_output=True)``) runs in static
mode (alpha = 1: no decision feedback, so it does not need to know the
constellation): it removes the coarse carrier offset and divides by the
channel estimate from the preamble + header. Its per-symbol decision-directed
update (alpha = 0.1 by default) would need a fixed constellation and, worse,
replaces the channel state almost entirely with each symbol's noisy
estimate, so every symbol is equalized with a one-symbol channel estimate
(roughly twice the noise). The PER curves measured here sit 2.7-4.3 dB left
of the stock receiver's in /work/shared/notes/platform-facts.md.
PayloadDecoder then finishes the equalization per packet with the packet's
own constellation: common phase error per symbol from the 4 pilots, refined
with decisions; per-carrier gain/phase from a sliding average of the
decision-directed channel over +-16 symbols. The soft symbols that come out
of it feed the demapper and the SNR estimate.

SNR estimate. Per packet, over exactly that packet's payload symbols (the
zero-filled tail of the last OFDM symbol excluded): Es/N0 = 1 / EVM^2 with
EVM^2 = sum |soft - decided point|^2 / sum (1 - 1/n) (points have unit power;
n = symbols in the channel-averaging window, whose fit removes 1/n of each
symbol's noise). If the packet passed CRC every decision is right, so this
is the data-aided EVM; measured bias < 0.1 dB from 10 to 50 dB, spread
~0.1 dB per 1000-byte packet; it saturates just below 60 dB.
Es/N0 per subcarrier is converted to the time-domain SNR convention of
phy.ofdm (+10 log10(52/64) = -0.90 dB), then the calibration constant
``snr_offset_db`` (calibration/per_sweep.py measures it) is added.

Output PDU: u8vector = decoded payload (also when the CRC failed), metadata
``crc_ok`` (bool), ``modulation`` (str), ``snr_db`` (float, calibrated),
``snr_raw_db`` (before the offset), ``ofdm_packet_num`` (int, 8 bits), ``payload_len``.
A header that passed the stock CRC-8 but is impossible for our transmitter is
counted in ``stats()["bad_headers"]`` and its payload dropped.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

import numpy as np
import pmt
from gnuradio import analog, blocks, digital, fft, filter, gr

from phy import ofdm

log = logging.getLogger(__name__)

# Schmidl & Cox timing: plateau threshold and smoothing of the metric (see SchmidlCoxSync). The stock 0.9 is
# above the metric's peak (SNR / (1 + SNR))^2 below ~12 dB, so packets that would decode are never detected;
# 0.55 detects ~88 % of preambles at 7 dB and 97 % at 8 dB (1000-byte BPSK). Lower is not free: every trigger
# retunes the mixer, and a false plateau inside a payload destroys that packet. The highest one seen, in a
# 13 dB BPSK payload (1 in ~16k packets of a calibration sweep), peaked at 0.60 raw and 0.50 after smoothing
# over 17 samples; offline, 50 M payload samples (BPSK/QPSK, 10-30 dB) never exceeded 0.4 after smoothing.
SYNC_THRESHOLD = 0.55
SYNC_SMOOTH_LEN = 17
_EQ_WINDOW_SYMBOLS = 33  # sliding window (symbols) of the decision-directed channel refinement
_MAX_SNR_DB = 60.0  # per-subcarrier cap (float32 EVM floor); estimates are accurate to ~50 dB time-domain


# --------------------------------------------------------------------------- numpy core (testable without GR)
@dataclass
class DecodedPacket:
    data: bytes
    crc_ok: bool
    modulation: str
    snr_raw_db: float  # time-domain convention, no calibration offset
    packet_num: int
    soft_symbols: np.ndarray  # equalized payload symbols (complex64), this packet's only


def _window_sum(x: np.ndarray, half: int) -> np.ndarray:
    """Sum over the centred window [i - half, i + half] along axis 0 (truncated at the ends)."""
    n = x.shape[0]
    cs = np.empty((n + 1,) + x.shape[1:], dtype=x.dtype)
    cs[0] = 0
    np.cumsum(x, axis=0, out=cs[1:])
    hi = np.minimum(np.arange(n) + half + 1, n)
    lo = np.maximum(np.arange(n) - half, 0)
    return cs[hi] - cs[lo]


def _unit_phasor(z: np.ndarray) -> np.ndarray:
    """conj(z) / |z| (rotation that removes z's phase), safe for z == 0."""
    mag = np.abs(z)
    return np.conj(z) / np.where(mag > 0, mag, 1.0)


def equalize_payload(frame: np.ndarray, header: ofdm.PacketHeader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finish equalizing one packet's payload; returns (soft data symbols, decided labels, EVM weights).

    frame: (n_ofdm, 64) fft-shifted payload symbols already divided by the
    preamble/header channel estimate (the stock soft static equalizer).
    """
    mod = ofdm.get_modulation(header.modulation)
    name, points = mod.name, mod.points
    inv_points = (1.0 / points).astype(np.complex64)  # unit power: conj for PSK, 1/p for QAM
    n_sym = frame.shape[0]
    data = frame[:, ofdm.DATA_BINS] * ofdm.CARRIER_DEROTATION  # undo the transmitter's per-carrier rotation
    pilot_idx = (np.arange(n_sym) + ofdm.N_HEADER_SYMBOLS) % len(ofdm.PILOT_SYMBOLS)
    pilot_sum = (frame[:, ofdm.PILOT_BINS] * ofdm.PILOT_VALUES[pilot_idx]).sum(axis=1)  # pilots are +-1

    # Cells that carry payload: the last OFDM symbol is zero-filled after the payload.
    n_valid = header.payload_symbols
    n_last = n_valid - (n_sym - 1) * ofdm.N_DATA_CARRIERS  # valid cells in the last symbol (1..48)
    if n_last < ofdm.N_DATA_CARRIERS:
        data[-1, n_last:] = 0

    # 1) common phase error per symbol from the pilots; 2) again with the data decisions added.
    rot = _unit_phasor(pilot_sum)
    labels = ofdm.decide(data * rot[:, None], name)
    rot = _unit_phasor((data * np.conj(points[labels])).sum(axis=1) + pilot_sum)
    data *= rot[:, None].astype(np.complex64)
    labels = ofdm.decide(data, name)

    # 3) per-carrier residual channel: decision-directed estimates, averaged over a sliding window of symbols.
    h = data * inv_points[labels]
    count = np.full((n_sym, ofdm.N_DATA_CARRIERS), 1.0, dtype=np.float32)
    if n_last < ofdm.N_DATA_CARRIERS:
        h[-1, n_last:] = 0
        count[-1, n_last:] = 0
    half = _EQ_WINDOW_SYMBOLS // 2
    n_avg = np.maximum(_window_sum(count, half), 1.0)
    h_avg = _window_sum(h, half) / n_avg
    h_avg[h_avg == 0] = 1.0  # carriers with no payload at all (tiny last symbol)
    soft = (data / h_avg).ravel()[:n_valid]
    # Averaging n cells that include the cell itself fits away 1/n of its noise: weight for an unbiased EVM.
    dof = (1.0 - 1.0 / n_avg).ravel()[:n_valid]
    return soft.astype(np.complex64, copy=False), ofdm.decide(soft, name), dof


def decode_payload(frame: np.ndarray, header: ofdm.PacketHeader) -> DecodedPacket:
    """Equalize, demap, CRC-check one packet and estimate its SNR (see module docstring)."""
    soft, labels, dof = equalize_payload(frame, header)
    data, crc_ok = ofdm.demap_packet(labels, header)
    err = soft - ofdm.get_modulation(header.modulation).points[labels]
    dof_sum = float(dof.sum())
    evm2 = float(np.vdot(err, err).real) / dof_sum if dof_sum > 0 else 0.0
    if evm2 > 0:
        snr_sc_db = min(-10.0 * math.log10(evm2), _MAX_SNR_DB)
    else:
        snr_sc_db = _MAX_SNR_DB
    return DecodedPacket(
        data, crc_ok, header.modulation, snr_sc_db + ofdm.SUBCARRIER_TO_TIME_DOMAIN_DB, header.packet_num, soft
    )


def _u8_pmt(data: bytes) -> pmt.pmt_t:
    """bytes -> pmt u8vector via deserialisation (~6x faster than init_u8vector's per-element conversion)."""
    return pmt.deserialize_str(b"\x0a\x00" + struct.pack(">I", len(data)) + b"\x01\x00" + data)


# --------------------------------------------------------------------------- GNU Radio blocks
class SchmidlCoxSync(gr.hier_block2):
    """``digital.ofdm_sync_sc_cfb`` rebuilt from stock blocks, with a longer plateau window and a smoothed metric.

    Outputs: 0 = fine frequency offset (angle of the half-symbol correlation,
    held from the last trigger; the caller mixes with 2/fft_len per unit),
    1 = trigger (1 at the middle of each plateau of the timing metric).

    Why not the stock block: it builds ``plateau_detector_fb(max_len=cp_len)``,
    and that detector only handles plateaus shorter than 2 * max_len (32
    samples) deterministically; a longer one that straddles the end of the
    input buffer is cut and its "middle" lands early, where the correlation
    window is mostly gap, so the held frequency estimate is off by up to ~3 %
    of a subcarrier. After a quiet gap (zero padding, or just noise at high
    SNR) the metric already rises while the correlation window is still partly
    in the gap, so below a threshold of ~0.8 the plateau is longer than 32
    samples (~45 at 0.5): measured as a
    ~23 dB error floor on a third of 16QAM packets at 30 dB, varying from run
    to run with the scheduler's buffer boundaries. max_len = fft_len gives
    128 samples of room at the same cost.

    Third change: the metric is averaged over ``smooth_len`` samples first. At
    10-12 dB the rising edge of a preamble's plateau sometimes crossed the
    threshold briefly before the plateau proper; that fragment triggered ~15
    samples early (header fails), and the detector's hold-off (max_len) then
    hid the real plateau: 0.2 % of QPSK packets missed at 10-12 dB without
    smoothing, 0 of 3000 with it. Smoothing also flattens the rare false
    plateaus inside payloads (see SYNC_THRESHOLD). Triggers come
    ``delay_samples`` later, which the receiver adds to its data delay.

    Every trigger also re-samples the frequency estimate that the mixer applies
    from then on, even one inside a payload the demux is busy with: a false
    plateau in the middle of a packet destroys that packet. BPSK payloads made
    such plateaus (~1 per 2 M samples at threshold 0.5, because OFDM symbols
    with real-valued carriers are conjugate-symmetric in time); phy.ofdm
    rotates every data carrier by a fixed phase to break that symmetry.
    """

    def __init__(
        self,
        fft_len: int = ofdm.FFT_LEN,
        threshold: float = SYNC_THRESHOLD,
        plateau_max_len: int = ofdm.FFT_LEN,
        smooth_len: int = SYNC_SMOOTH_LEN,
        use_even_carriers: bool = False,
    ) -> None:
        gr.hier_block2.__init__(
            self,
            "schmidl_cox_sync",
            gr.io_signature(1, 1, gr.sizeof_gr_complex),
            gr.io_signature2(2, 2, gr.sizeof_float, gr.sizeof_char),
        )
        if smooth_len < 1 or smooth_len % 2 == 0:
            raise ValueError("smooth_len must be odd and >= 1")
        # The smoothed metric (and so the trigger) lags the raw one by this much; the receiver delays its data
        # path by as much, and the frequency estimate is taken this much earlier, at the raw plateau's middle.
        self.delay_samples = (smooth_len - 1) // 2
        half = fft_len // 2
        delay = blocks.delay(gr.sizeof_gr_complex, half)
        conjugate = blocks.conjugate_cc()
        correlate = blocks.multiply_cc()
        # FIR sums as in the stock block, not moving_average: a running float32 sum keeps a rounding residue of
        # ~1e-6 of the last packet's energy, which in a quiet gap at > ~55 dB SNR outweighs the noise and makes
        # the metric random there (false triggers that retuned the mixer over a packet's last symbol).
        corr_sum = filter.fir_filter_ccf(1, [1.0 if use_even_carriers else -1.0] * half)  # odd carriers: -1
        corr_power = blocks.complex_to_mag_squared()
        metric = blocks.divide_ff()
        energy = blocks.complex_to_mag_squared()
        energy_sum = filter.fir_filter_fff(1, [0.5] * fft_len)
        energy_square = blocks.multiply_ff()
        no_nan = blocks.add_const_ff(1e-20)  # exact zeros (noise-free gaps) would give 0/0 = NaN, which a
        # moving average's running sum would carry for thousands of samples
        smooth = blocks.moving_average_ff(smooth_len, 1.0 / smooth_len, 4000)
        angle = blocks.complex_to_arg()
        angle_delay = blocks.delay(gr.sizeof_float, self.delay_samples)
        hold = blocks.sample_and_hold_ff()
        self.plateau = blocks.plateau_detector_fb(plateau_max_len, threshold)

        self.connect(self, delay, conjugate, (correlate, 1))
        self.connect(self, (correlate, 0))
        self.connect(correlate, corr_sum, corr_power, (metric, 0))
        self.connect(self, energy, energy_sum, (energy_square, 0))
        self.connect(energy_sum, (energy_square, 1))
        self.connect(energy_square, no_nan, (metric, 1))
        self.connect(corr_sum, angle, angle_delay, (hold, 0))
        self.connect(metric, smooth, self.plateau, (hold, 1))
        self.connect(hold, (self, 0))
        self.connect(self.plateau, (self, 1))


class HeaderCounter(gr.basic_block):
    """Counts the stock header parser's verdicts (it has no counters); off the demux's critical path."""

    def __init__(self) -> None:
        gr.basic_block.__init__(self, "ofdm_header_counter", None, None)
        self.message_port_register_in(pmt.intern("in"))
        self.set_msg_handler(pmt.intern("in"), self._handle)
        self.ok = 0
        self.failed = 0

    def _handle(self, msg: pmt.pmt_t) -> None:
        if pmt.is_dict(msg):
            self.ok += 1
        else:
            self.failed += 1


class PayloadDecoder(gr.sync_block):
    """Soft-equalized payload symbols (tagged per packet) -> one PDU per packet on message port ``out``."""

    def __init__(self, snr_offset_db: float = 0.0, max_packet_bytes: int = ofdm.MAX_PACKET_BYTES) -> None:
        gr.sync_block.__init__(self, "ofdm_payload_decoder", [(np.complex64, ofdm.FFT_LEN)], None)
        self.snr_offset_db = float(snr_offset_db)
        self.max_packet_bytes = max_packet_bytes
        self.bad_headers = 0
        self._port = pmt.intern("out")
        self.message_port_register_out(self._port)
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._header: ofdm.PacketHeader | None = None
        self.packets = 0
        self.crc_failures = 0

    def work(self, input_items, output_items):  # noqa: ANN001 (gr signature)
        inp = input_items[0]
        n = len(inp)
        base = self.nitems_read(0)
        starts: dict[int, dict[str, object]] = {}
        for tag in self.get_tags_in_window(0, 0, n):
            starts.setdefault(tag.offset - base, {})[pmt.symbol_to_string(tag.key)] = tag.value
        i = 0
        while i < n:
            if self._buf is None:
                tags = starts.get(i)
                header = self._header_from_tags(tags) if tags else None
                if header is None:  # not a packet start, or a header the stock CRC-8 let through: skip ahead
                    i = min([k for k in starts if k > i], default=n)
                    continue
                self._header = header
                self._buf = np.empty((header.payload_ofdm_symbols, ofdm.FFT_LEN), dtype=np.complex64)
                self._fill = 0
            take = min(self._buf.shape[0] - self._fill, n - i)
            self._buf[self._fill : self._fill + take] = inp[i : i + take]
            self._fill += take
            i += take
            if self._fill == self._buf.shape[0]:
                frame, self._buf = self._buf, None
                try:
                    self._publish(decode_payload(frame, self._header))
                except Exception:  # never let one odd packet stop the receiver thread
                    log.exception("ofdm_rx: decoding packet %s failed", self._header)
        return n

    def _header_from_tags(self, tags: dict[str, object]) -> ofdm.PacketHeader | None:
        """Our header fields from the stock parser's tags (packet_len = 8 x length field, see phy.ofdm)."""
        try:
            length = int(pmt.to_long(tags[ofdm.PACKET_LEN_KEY])) // 8
            header = ofdm.PacketHeader.from_fields(
                length, int(pmt.to_long(tags[ofdm.PACKET_NUM_KEY])), self.max_packet_bytes
            )
            frame_len = int(pmt.to_long(tags[ofdm.FRAME_LEN_KEY]))
        except (KeyError, RuntimeError, ValueError):
            return None
        if header is None or header.payload_ofdm_symbols != frame_len:
            self.bad_headers += 1  # CRC-8 let a corrupted header through: drop its payload symbols
            return None
        return header

    def _publish(self, pkt: DecodedPacket) -> None:
        self.packets += 1
        self.crc_failures += not pkt.crc_ok
        snr_db = pkt.snr_raw_db + self.snr_offset_db
        meta = pmt.make_dict()
        for key, value in (
            ("crc_ok", pmt.from_bool(pkt.crc_ok)),
            ("modulation", pmt.intern(pkt.modulation)),
            ("snr_db", pmt.from_double(snr_db)),
            ("snr_raw_db", pmt.from_double(pkt.snr_raw_db)),
            (ofdm.META_PACKET_NUM, pmt.from_long(pkt.packet_num)),
            ("payload_len", pmt.from_long(len(pkt.data))),
        ):
            meta = pmt.dict_add(meta, pmt.intern(key), value)
        self.message_port_pub(self._port, pmt.cons(meta, _u8_pmt(pkt.data)))


class OfdmReceiver(gr.hier_block2):
    """Complex baseband in; decoded packets out as PDUs on message port ``out`` (see module docstring)."""

    def __init__(
        self,
        snr_offset_db: float = 0.0,
        *,
        max_packet_bytes: int = ofdm.MAX_PACKET_BYTES,
        header_alpha: float = 0.5,
        sync_threshold: float = SYNC_THRESHOLD,
        sync_smooth_len: int = SYNC_SMOOTH_LEN,
    ) -> None:
        gr.hier_block2.__init__(
            self, "ofdm_receiver", gr.io_signature(1, 1, gr.sizeof_gr_complex), gr.io_signature(0, 0, 0)
        )
        self.message_port_register_hier_out("out")
        occupied = [list(ofdm.OCCUPIED_CARRIERS)]
        pilots = [list(ofdm.PILOT_CARRIERS)]
        pilot_symbols = [list(p) for p in ofdm.PILOT_SYMBOLS]
        bpsk = ofdm.get_modulation("bpsk").gr_constellation()

        # --- timing + fine frequency sync (Schmidl & Cox), then cut into header / payload
        sync = SchmidlCoxSync(ofdm.FFT_LEN, sync_threshold, smooth_len=sync_smooth_len)
        self._delay = delay = blocks.delay(gr.sizeof_gr_complex, ofdm.SYMBOL_SAMPLES + sync.delay_samples)
        oscillator = analog.frequency_modulator_fc(-2.0 / ofdm.FFT_LEN)
        mixer = blocks.multiply_cc()
        hpd = digital.header_payload_demux(
            ofdm.N_SYNC_SYMBOLS + ofdm.N_HEADER_SYMBOLS,
            ofdm.FFT_LEN,
            ofdm.CP_LEN,
            ofdm.FRAME_LEN_KEY,
            "",
            True,
            gr.sizeof_gr_complex,
        )
        hpd.set_log_level("warn")  # every false trigger would log "Parser returned #f" at info level

        # --- header: channel estimate from the preamble, hard BPSK header, stock C++ parser (phy.ofdm format)
        header_fft = fft.fft_vcc(ofdm.FFT_LEN, True, (), True)
        chanest = digital.ofdm_chanest_vcvc(ofdm.SYNC_WORD1.tolist(), ofdm.SYNC_WORD2.tolist(), 1)
        # alpha 0.5: the propagated channel state averages the preamble and header estimates (half the noise)
        header_equalizer = digital.ofdm_equalizer_simpledfe(
            ofdm.FFT_LEN, bpsk, occupied, pilots, pilot_symbols, 0, header_alpha
        )
        header_eq = digital.ofdm_frame_equalizer_vcvc(header_equalizer.base(), ofdm.CP_LEN, ofdm.FRAME_LEN_KEY, True, 1)
        header_serializer = digital.ofdm_serializer_vcc(ofdm.FFT_LEN, occupied, ofdm.FRAME_LEN_KEY)
        header_demod = digital.constellation_decoder_cb(bpsk)
        header_parser = digital.packet_headerparser_b(ofdm.header_formatter().formatter())
        header_parser.set_log_level("warn")  # logs every failed header (noise triggers) at info level
        self.header_counter = HeaderCounter()

        # --- payload: static soft equalizer (all 52 carriers, pilots included, no decision feedback)
        payload_fft = fft.fft_vcc(ofdm.FFT_LEN, True, (), True)
        active = [sorted(ofdm.OCCUPIED_CARRIERS + ofdm.PILOT_CARRIERS)]
        payload_equalizer = digital.ofdm_equalizer_simpledfe(ofdm.FFT_LEN, bpsk, active, [], [], 0, 1.0, True, True)
        payload_eq = digital.ofdm_frame_equalizer_vcvc(payload_equalizer.base(), ofdm.CP_LEN, ofdm.FRAME_LEN_KEY)
        self.payload_decoder = PayloadDecoder(snr_offset_db, max_packet_bytes)

        # Pitfall 2: whole packets must fit in every buffer header_payload_demux and the equalizer read.
        max_samples = 2 * ofdm.MAX_FRAME_SAMPLES
        max_vectors = 2 * ofdm.MAX_FRAME_OFDM_SYMBOLS
        delay.set_min_output_buffer(0, max_samples)
        mixer.set_min_output_buffer(0, max_samples)
        oscillator.set_min_output_buffer(0, max_samples)
        hpd.set_min_output_buffer(0, max_vectors)  # set_min_noutput_items(payload) applies to both ports
        hpd.set_min_output_buffer(1, max_vectors)
        payload_fft.set_min_output_buffer(0, max_vectors)
        payload_eq.set_min_output_buffer(0, max_vectors)

        self.connect(self, sync)
        self.connect(self, delay, (mixer, 0), (hpd, 0))
        self.connect((sync, 0), oscillator, (mixer, 1))
        self.connect((sync, 1), (hpd, 1))
        self.connect((hpd, 0), header_fft, chanest, header_eq, header_serializer, header_demod, header_parser)
        self.msg_connect(header_parser, "header_data", hpd, "header_data")
        self.msg_connect(header_parser, "header_data", self.header_counter, "in")  # statistics only
        self.connect((hpd, 1), payload_fft, payload_eq, self.payload_decoder)
        self.msg_connect(self.payload_decoder, "out", self, "out")
        # keep references: stock blocks for perf counters / debugging, Python blocks so their gateways stay alive
        self.blocks = {
            "sync": sync,
            "delay": delay,
            "oscillator": oscillator,
            "mixer": mixer,
            "hpd": hpd,
            "header_fft": header_fft,
            "chanest": chanest,
            "header_eq": header_eq,
            "header_serializer": header_serializer,
            "header_demod": header_demod,
            "header_parser": header_parser,
            "header_counter": self.header_counter,
            "payload_fft": payload_fft,
            "payload_eq": payload_eq,
            "payload_decoder": self.payload_decoder,
        }

    @property
    def snr_offset_db(self) -> float:
        return self.payload_decoder.snr_offset_db

    def set_snr_offset_db(self, offset_db: float) -> None:
        self.payload_decoder.snr_offset_db = float(offset_db)

    def samples_in(self) -> int:
        """Samples consumed so far (pacing: the sender compares it with what it sent)."""
        return int(self._delay.nitems_read(0))

    def stats(self) -> dict[str, int]:
        return {
            "headers_ok": self.header_counter.ok,
            "headers_failed": self.header_counter.failed,
            "bad_headers": self.payload_decoder.bad_headers,
            "packets": self.payload_decoder.packets,
            "crc_failures": self.payload_decoder.crc_failures,
        }


def pdu_to_result(msg: pmt.pmt_t) -> tuple[bytes, dict]:
    """Receiver PDU -> (payload bytes, metadata dict of Python values)."""
    meta = pmt.to_python(pmt.car(msg)) or {}
    vec = pmt.cdr(msg)
    raw = pmt.serialize_str(vec) if pmt.is_u8vector(vec) else b""
    if raw[:2] == b"\x0a\x00" and raw[6:8] == b"\x01\x00":  # fast path: u8vector header, 1 pad byte (_u8_pmt)
        return raw[8:], meta
    return bytes(pmt.u8vector_elements(vec)), meta
