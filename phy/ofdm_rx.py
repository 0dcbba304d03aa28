"""OFDM receiver: complex baseband in, one PDU per detected packet out (message port ``out``).

Signal chain (``digital.ofdm_rx``'s structure; Python only at the end of the payload path)::

    in --> SchmidlCoxSync --(freq)--> frequency_modulator -----+
    in --> delay(80 + 8) --------------------------------------x--> header_payload_demux
    hpd.header  --> FFT --> ofdm_chanest --> frame_equalizer(simpledfe, BPSK) --> serializer
                --> constellation_decoder --> packet_headerparser_b --msg--> hpd
    hpd.payload --> FFT --> frame_equalizer(soft, static) --> PayloadDecoder --msg--> out

The header is gr-digital's own format parsed by the stock C++ parser (see
phy.ofdm for how it carries the modulation), so the demux's header handshake
never waits for Python. SchmidlCoxSync (phy.ofdm_sync) is ``ofdm_sync_sc_cfb``
rebuilt from the same blocks with a deterministic plateau detector, and the
detection threshold is 0.55 instead of 0.9 (see SYNC_THRESHOLD there).

The payload equalizer is the stock one in static soft mode; PayloadDecoder
(phy.ofdm_decoder) finishes the equalization per packet with the packet's own
constellation, demaps, checks the CRC and estimates the SNR (phy.ofdm_demod
says how), and publishes one PDU per packet; ``pdu_to_result`` reads it. It
also counts the parser's verdicts (``stats()``).

CPU: most of it goes to scheduling, not arithmetic (docs/pitfalls.md §16), and
the demux spins while a header goes round the six header blocks (§15). So the
synchronizer's blocks get large buffers (SAMPLE_BUFFER_ITEMS) and the decoder
yields the core after every packet.
"""

from __future__ import annotations

from gnuradio import analog, blocks, digital, fft, gr

from phy import ofdm
from phy.ofdm_decoder import PayloadDecoder
from phy.ofdm_sync import SYNC_SMOOTH_LEN, SYNC_THRESHOLD, SchmidlCoxSync

# Output buffer (items) of the synchronizer's sample-rate blocks. Most of the receiver's CPU goes to scheduling
# (thread hand-offs for every work call of every block), not arithmetic (docs/pitfalls.md §12), and a block writes
# at most half its buffer per call: 4096 complex samples with GNU Radio's 64 KiB default, 16384 with this.
# Measured: ~7 % less CPU per MB of the loopback (benchmarks/ofdm_goodput.py).
SAMPLE_BUFFER_ITEMS = 32768


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
        sync = SchmidlCoxSync(
            ofdm.FFT_LEN, sync_threshold, smooth_len=sync_smooth_len, buffer_items=SAMPLE_BUFFER_ITEMS
        )
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

        # --- payload: static soft equalizer (all 52 carriers, pilots included, no decision feedback)
        payload_fft = fft.fft_vcc(ofdm.FFT_LEN, True, (), True)
        active = [sorted(ofdm.OCCUPIED_CARRIERS + ofdm.PILOT_CARRIERS)]
        payload_equalizer = digital.ofdm_equalizer_simpledfe(ofdm.FFT_LEN, bpsk, active, [], [], 0, 1.0, True, True)
        payload_eq = digital.ofdm_frame_equalizer_vcvc(payload_equalizer.base(), ofdm.CP_LEN, ofdm.FRAME_LEN_KEY)
        self.payload_decoder = PayloadDecoder(snr_offset_db, max_packet_bytes)

        # Whole packets must fit in every buffer header_payload_demux and the equalizer read (docs/pitfalls.md §2).
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
        self.connect((hpd, 1), payload_fft, payload_eq, self.payload_decoder)
        self.msg_connect(header_parser, "header_data", self.payload_decoder, "headers")  # statistics only
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
            "headers_ok": self.payload_decoder.headers_ok,
            "headers_failed": self.payload_decoder.headers_failed,
            "bad_headers": self.payload_decoder.bad_headers,
            "packets": self.payload_decoder.packets,
            "crc_failures": self.payload_decoder.crc_failures,
        }
