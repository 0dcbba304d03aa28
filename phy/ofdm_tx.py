"""OFDM transmitter: PDUs (one PHY packet each) in, complex baseband out.

Signal chain, per packet (``modulate_packet``; each step names the gr-digital block it computes)::

    bytes --map_packet--> 48 BPSK header + payload symbols    crc32 + headergenerator + repack + chunks_to_symbols
          --allocate----> sync words; data + pilot carriers   ofdm_carrier_allocator_cvc
          --IFFT--------> 64 samples per OFDM symbol          fft_vcc(reverse, shift)
          --prefix------> 80 samples per OFDM symbol          ofdm_cyclic_prefixer
          --scale-------> unit mean power                     multiply_const_cc(1/sqrt(52))
          --pad---------> pre_pad zeros, packet, post_pad zeros (docs/pitfalls.md §5, gnuradio issue 6891)

In the flowgraph (OfdmTransmitter)::

    PDU --msg--> PacketSource --samples--> out

PacketSource modulates each packet with numpy when it is queued and copies whole packets, many per call, into
a large output buffer. Why not the stock C++ blocks for the steps above (which this chain used before):

* the constellation changes per packet, so the symbol mapping is ours anyway, and it needs Python per packet;
* the padding cannot be a stock block: ``digital.burst_shaper_cc`` writes a packet's post padding only when the
  *next* packet's samples arrive (the last packet of a burst would stay stuck in the receiver), and
  ``blocks.tagged_stream_mux`` cannot emit a gap (``send_gap``) that follows no packet. So a second Python block
  sat on the sample path behind the C++ ones, called per fragment of a packet;
* six blocks fewer means six thread hand-offs fewer per call, which is what a flowgraph's CPU goes to
  (docs/pitfalls.md §16); and ``modulate`` needs no flowgraph: a 20-frame burst takes ~3 ms instead of 25-30 ms
  of flowgraph start and stop. The samples agree with the stock blocks' to float32 rounding
  (tests/test_ofdm_chain.py).

Pitfalls handled here (docs/pitfalls.md §1, §2, §5, §7):
  §1 length tags do not leave the block unless asked for (``propagate_tags=True``, for sinks that want burst tags);
  §2 the output buffer holds two of the longest packets (MAX_PACKET_BYTES in BPSK, padding included);
  §5 each packet carries its zero padding (pre_pad before, post_pad after), written together with the packet:
     the Schmidl & Cox detector sees a rising edge, the receiver is flushed past the last packet of a burst, and
     ``header_payload_demux`` never swallows the next trigger with the current payload (see phy.gr_loopback);
  §7 ``send`` queues packets in Python, not as thousands of PMTs in a block's message queue.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import pmt
from gnuradio import gr

from phy import ofdm
from proto import numerology

log = logging.getLogger(__name__)

_TX_SCALE = 1.0 / math.sqrt(numerology.N_ACTIVE_CARRIERS)  # un-normalised IFFT of 52 unit carriers -> unit power

# Carrier positions in the IFFT's input. The allocator writes fft-shifted vectors (DC in the middle) and
# fft_vcc(shift=True) un-shifts them before transforming: carrier c ends up in bin c mod 64 either way.
_DATA_COLS = np.array([c % numerology.FFT_LEN for c in numerology.OCCUPIED_CARRIERS], dtype=np.intp)
_PILOT_COLS = np.array([c % numerology.FFT_LEN for c in numerology.PILOT_CARRIERS], dtype=np.intp)
# Pilots of OFDM symbol k after the sync words (k = 0 is the header): the allocator cycles through the 127 sets.
_PILOTS = ofdm.PILOT_VALUES[np.arange(numerology.MAX_FRAME_OFDM_SYMBOLS) % len(ofdm.PILOT_SYMBOLS)]


def _ifft_with_prefix(grid: np.ndarray) -> np.ndarray:
    """(n, 64) carriers in IFFT order -> (n, 80) time samples: un-normalised IFFT, cyclic prefix, TX scale."""
    body = np.fft.ifft(grid, axis=1, norm="forward") * _TX_SCALE  # norm="forward": the inverse is not scaled
    out = np.empty((grid.shape[0], numerology.SYMBOL_SAMPLES), dtype=np.complex64)
    out[:, numerology.CP_LEN :] = body
    out[:, : numerology.CP_LEN] = body[:, numerology.FFT_LEN - numerology.CP_LEN :]
    return out


# The two Schmidl & Cox sync symbols are the same in every packet: their samples are computed once.
_SYNC_SAMPLES = _ifft_with_prefix(np.fft.ifftshift(np.stack([ofdm.SYNC_WORD1, ofdm.SYNC_WORD2]), axes=1)).ravel()


def packet_samples(n_symbols: int, pre_pad: int, post_pad: int) -> int:
    """Samples of a packet whose header + payload is n_symbols constellation symbols, padding included."""
    n_ofdm = -(-n_symbols // numerology.N_DATA_CARRIERS)
    return pre_pad + (numerology.N_SYNC_SYMBOLS + n_ofdm) * numerology.SYMBOL_SAMPLES + post_pad


def modulate_packet(
    data: bytes,
    modulation: str,
    packet_num: int = 0,
    *,
    pre_pad: int = numerology.DEFAULT_PRE_PAD_SAMPLES,
    post_pad: int = numerology.DEFAULT_POST_PAD_SAMPLES,
) -> np.ndarray:
    """One packet -> its complex64 samples, zero padding included (the signal chain of the module docstring)."""
    symbols = ofdm.map_packet(data, modulation, packet_num)  # header + payload, in the packet's constellation
    n_ofdm = -(-symbols.size // numerology.N_DATA_CARRIERS)
    cells = np.zeros(n_ofdm * numerology.N_DATA_CARRIERS, dtype=np.complex64)
    cells[: symbols.size] = symbols  # the last OFDM symbol is zero-filled
    grid = np.zeros((n_ofdm, numerology.FFT_LEN), dtype=np.complex64)  # allocate: data and pilot carriers
    grid[:, _DATA_COLS] = cells.reshape(n_ofdm, numerology.N_DATA_CARRIERS)
    grid[:, _PILOT_COLS] = _PILOTS[:n_ofdm]
    out = np.zeros(packet_samples(symbols.size, pre_pad, post_pad), dtype=np.complex64)
    sync_end = pre_pad + _SYNC_SAMPLES.size
    out[pre_pad:sync_end] = _SYNC_SAMPLES
    out[sync_end : sync_end + n_ofdm * numerology.SYMBOL_SAMPLES] = _ifft_with_prefix(grid).ravel()
    return out


class PacketSource(gr.basic_block):
    """Packets -> their samples (``modulate_packet``), whole packets copied into the output buffer.

    Input: message port ``in``: a PDU (metadata dict, u8vector; metadata may
    hold ``modulation`` and ``ofdm_packet_num``), or ``enqueue()`` from Python;
    ``enqueue_gap()`` queues zeros between two packets.
    Output: complex samples; with ``tag_packets`` a ``packet_len`` tag (padding included) on each packet's first.

    Scheduling (GNU Radio 3.10): a source whose work returns 0 sleeps until a
    message arrives or ``blkd_input_timer_value`` expires; freed output space
    does not wake it. So work never returns 0 while samples are queued (a
    packet may be written across several calls), and after a call that found
    nothing to do, the next ``enqueue`` from another thread posts a wake-up
    message (PMT_NIL) on ``in``; while the block is busy, queuing costs no message.
    """

    def __init__(
        self,
        default_modulation: str = "qpsk",
        max_packet_bytes: int = numerology.MAX_PACKET_BYTES,
        *,
        pre_pad: int = numerology.DEFAULT_PRE_PAD_SAMPLES,
        post_pad: int = numerology.DEFAULT_POST_PAD_SAMPLES,
        tag_packets: bool = False,
    ) -> None:
        gr.basic_block.__init__(self, name="ofdm_packet_source", in_sig=None, out_sig=[np.complex64])
        ofdm.get_modulation(default_modulation)
        self.default_modulation = default_modulation
        self.max_packet_bytes = max_packet_bytes
        self.pre_pad, self.post_pad = int(pre_pad), int(post_pad)
        self.tag_packets = tag_packets
        self._queue: collections.deque[np.ndarray | int] = collections.deque()  # samples, or a gap's zero count
        self._lock = threading.Lock()
        self._offset = 0  # samples of self._queue[0] already written
        self._idle = True  # the last work call found nothing: the next enqueue must wake the block
        self._next_num = 0
        self._port = pmt.intern("in")
        self._len_key = pmt.intern(ofdm.PACKET_LEN_KEY)
        self._src_id = pmt.intern("ofdm_tx")
        self.packets_emitted = 0
        self.rejected = 0
        self.message_port_register_in(self._port)
        self.set_msg_handler(self._port, self._handle_msg)
        longest = numerology.packet_samples(
            max_packet_bytes, "bpsk", pre_pad_samples=self.pre_pad, post_pad_samples=self.post_pad
        )
        self.set_min_output_buffer(0, 2 * longest)  # docs/pitfalls.md §2

    # ----------------------------------------------------------------- input side
    def enqueue(
        self, data: bytes, modulation: str | None = None, packet_num: int | None = None, *, wake: bool = True
    ) -> int:
        """Modulate one packet and queue it; returns its 8-bit packet number. Raises ValueError if invalid."""
        data = ofdm.check_packet(data, self.max_packet_bytes)
        modulation = modulation or self.default_modulation
        with self._lock:
            if packet_num is None:
                packet_num = self._next_num
            self._next_num = (packet_num + 1) & 0xFF
        samples = modulate_packet(data, modulation, packet_num, pre_pad=self.pre_pad, post_pad=self.post_pad)
        self._put(samples, wake)
        return packet_num

    def enqueue_gap(self, n_samples: int, *, wake: bool = True) -> None:
        """Queue n_samples zeros after the packets queued so far."""
        if n_samples > 0:
            self._put(int(n_samples), wake)

    def _put(self, item: np.ndarray | int, wake: bool) -> None:
        with self._lock:
            self._queue.append(item)
            asleep, self._idle = self._idle, False
        if wake and asleep:
            self.to_basic_block()._post(self._port, pmt.PMT_NIL)

    def _handle_msg(self, msg: pmt.pmt_t) -> None:
        if not pmt.is_pair(msg):
            return  # wake-up from enqueue(): the scheduler runs general_work next
        try:
            meta = pmt.to_python(pmt.car(msg)) or {}
            vec = pmt.cdr(msg)
            raw = pmt.serialize_str(vec) if pmt.is_u8vector(vec) else b""
            data = raw[8:] if raw[:2] == b"\x0a\x00" and raw[6:8] == b"\x01\x00" else bytes(pmt.u8vector_elements(vec))
            self.enqueue(data, meta.get(ofdm.META_MODULATION), meta.get(ofdm.META_PACKET_NUM), wake=False)
        except Exception as exc:  # a bad PDU must not kill the flowgraph thread, but must be visible
            self.rejected += 1
            log.error("ofdm_tx: rejected PDU: %s", exc)

    def pending(self) -> int:
        """Packets queued and not completely written yet (gaps not counted)."""
        with self._lock:
            return sum(not isinstance(item, int) for item in self._queue)

    # ----------------------------------------------------------------- stream side
    def general_work(self, input_items, output_items):  # noqa: ANN001 (gr signature)
        out = output_items[0]
        room = len(out)
        produced = 0
        with self._lock:
            while self._queue and produced < room:
                item = self._queue[0]
                if isinstance(item, int):  # a gap
                    n = min(item - self._offset, room - produced)
                    out[produced : produced + n] = 0
                    total = item
                else:
                    if self._offset == 0 and self.tag_packets:
                        tag_at = self.nitems_written(0) + produced
                        self.add_item_tag(0, tag_at, self._len_key, pmt.from_long(len(item)), self._src_id)
                    n = min(len(item) - self._offset, room - produced)
                    out[produced : produced + n] = item[self._offset : self._offset + n]
                    total = len(item)
                produced += n
                self._offset += n
                if self._offset == total:
                    self._queue.popleft()
                    self._offset = 0
                    self.packets_emitted += not isinstance(item, int)
            if produced == 0:
                self._idle = True
        return produced  # 0 only when idle: the block then sleeps until the next message


class OfdmTransmitter(gr.hier_block2):
    """Packets (PDUs on message port ``in``, or ``send()``) -> complex baseband, unit mean power per sample.

    Every packet becomes pre_pad zeros, 2 sync symbols, 1 BPSK header symbol,
    the payload symbols in the packet's modulation, post_pad zeros; exactly
    proto.numerology.packet_samples(len, modulation, pre_pad_samples=pre_pad, post_pad_samples=post_pad) samples.
    """

    def __init__(
        self,
        default_modulation: str = "qpsk",
        *,
        pre_pad: int = numerology.DEFAULT_PRE_PAD_SAMPLES,
        post_pad: int = numerology.DEFAULT_POST_PAD_SAMPLES,
        propagate_tags: bool = False,
        max_packet_bytes: int = numerology.MAX_PACKET_BYTES,
    ) -> None:
        gr.hier_block2.__init__(
            self, "ofdm_transmitter", gr.io_signature(0, 0, 0), gr.io_signature(1, 1, gr.sizeof_gr_complex)
        )
        _check_padding(pre_pad, post_pad)
        if not 0 < max_packet_bytes <= numerology.MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be in 1..{numerology.MAX_PACKET_BYTES}")
        self.default_modulation = default_modulation
        self.pre_pad, self.post_pad = pre_pad, post_pad
        self.max_packet_bytes = max_packet_bytes
        self.message_port_register_hier_in("in")

        # Python blocks must stay referenced from Python, or the gateway calls into a freed object.
        self.source = PacketSource(
            default_modulation, max_packet_bytes, pre_pad=pre_pad, post_pad=post_pad, tag_packets=propagate_tags
        )
        self.blocks = {"source": self.source}  # for perf counters / debugging
        self.msg_connect(self, "in", self.source, "in")
        self.connect(self.source, self)

    # ----------------------------------------------------------------- Python API
    def send(self, frames: Iterable[bytes], modulation: str | None = None) -> list[int]:
        """Queue packets for transmission; all are validated first, so a bad one sends nothing.

        Returns the 8-bit packet numbers given to the packets.
        """
        modulation = modulation or self.default_modulation
        ofdm.get_modulation(modulation)
        checked = [ofdm.check_packet(f, self.max_packet_bytes) for f in frames]
        return [self.source.enqueue(f, modulation) for f in checked]

    def send_gap(self, n_samples: int) -> None:
        """Emit n_samples zeros after the packets queued so far (flushes a channel's buffered noise, idles a link)."""
        self.source.enqueue_gap(int(n_samples))

    def burst_samples(self, frame_sizes: Sequence[int], modulation: str | None = None) -> int:
        """Samples the transmitter will emit for packets of these sizes."""
        modulation = modulation or self.default_modulation
        return numerology.burst_samples(
            frame_sizes, modulation, pre_pad_samples=self.pre_pad, post_pad_samples=self.post_pad
        )

    def samples_out(self) -> int:
        """Samples emitted so far (for pacing the sender against the receiver)."""
        return int(self.source.nitems_written(0))

    def pending_packets(self) -> int:
        return self.source.pending()


def _check_padding(pre_pad: int, post_pad: int) -> None:
    if pre_pad < 0 or post_pad < 0:
        raise ValueError("pre_pad and post_pad must be >= 0 samples")


def make_pdu(data: bytes, modulation: str | None = None, packet_num: int | None = None) -> pmt.pmt_t:
    """A PDU for OfdmTransmitter's ``in`` port (metadata: modulation / packet number)."""
    meta = pmt.make_dict()
    if modulation is not None:
        ofdm.get_modulation(modulation)
        meta = pmt.dict_add(meta, pmt.intern(ofdm.META_MODULATION), pmt.intern(modulation))
    if packet_num is not None:
        meta = pmt.dict_add(meta, pmt.intern(ofdm.META_PACKET_NUM), pmt.from_long(packet_num))
    data = bytes(data)
    return pmt.cons(meta, pmt.init_u8vector(len(data), list(data)))


def modulate(
    frames: Sequence[bytes],
    modulation: str = "qpsk",
    *,
    pre_pad: int = numerology.DEFAULT_PRE_PAD_SAMPLES,
    post_pad: int = numerology.DEFAULT_POST_PAD_SAMPLES,
    timeout_s: float = 30.0,
) -> np.ndarray:
    """Frames -> one complex64 burst (e.g. for file/zmq/SDR replay): what OfdmTransmitter emits for them.

    Packet numbers count from 0, as from a fresh transmitter. No flowgraph is started; ``timeout_s`` is kept for
    callers of the earlier flowgraph version and ignored.
    """
    del timeout_s
    _check_padding(pre_pad, post_pad)
    ofdm.get_modulation(modulation)
    checked = [ofdm.check_packet(f) for f in frames]
    if not checked:
        return np.zeros(0, dtype=np.complex64)
    return np.concatenate(
        [modulate_packet(f, modulation, i & 0xFF, pre_pad=pre_pad, post_pad=post_pad) for i, f in enumerate(checked)]
    )
