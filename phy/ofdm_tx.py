"""OFDM transmitter: PDUs (one PHY packet each) in, complex baseband out.

Signal chain (one line of ``connect`` in OfdmTransmitter)::

    PDU --msg--> PacketSource --symbols--> ofdm_carrier_allocator_cvc --> IFFT --> ofdm_cyclic_prefixer
        --> BurstPadder (zero padding) --> multiply_const (unit power) --> tag_gate --> out

PacketSource (Python) maps each packet with phy.ofdm.map_packet (header +
payload symbols in the packet's own constellation) and writes the symbols
straight into its output buffer with a ``packet_len`` tag. It replaces the
stock ``pdu_to_tagged_stream`` + crc32_bb + headergenerator + repack +
chunks_to_symbols front end because (a) the constellation changes per packet
and (b) PMT vector conversion in Python costs ~0.4 us per element, so
symbol PDUs would be slower than the whole C++ chain; bytes in, numpy out.

Pitfalls handled here (docs/pitfalls.md §1, §2, §5, §7):
  §1 length tags never leave the block: ``blocks.tag_gate`` at the output
     (``propagate_tags=True`` only for sinks that want burst tags);
  §2 every tagged-stream port gets ``set_min_output_buffer(port, n)`` sized for
     MAX_PACKET_BYTES in BPSK, the longest packet;
  §5 each packet is padded with zeros (pre_pad before, post_pad after): the
     Schmidl & Cox detector sees a rising edge, the receiver is flushed past the
     last packet of a burst, and ``header_payload_demux`` never swallows the
     next trigger with the current payload (the mechanism behind gnuradio
     issue 6891, see phy.gr_loopback);
  §7 ``send`` queues packets in Python, not as thousands of PMTs in a block's
     message queue; PacketSource only emits what the output buffer can take.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pmt
from gnuradio import blocks, digital, fft, gr

from phy import ofdm
from proto import numerology

log = logging.getLogger(__name__)

_TX_SCALE = 1.0 / math.sqrt(numerology.N_ACTIVE_CARRIERS)  # un-normalised IFFT of 52 unit carriers -> unit power


class PacketSource(gr.basic_block):
    """Packet bytes -> tagged stream of constellation symbols (header + payload) for the allocator.

    Input: message port ``in``: a PDU (metadata dict, u8vector; metadata may
    hold ``modulation`` and ``ofdm_packet_num``), or ``enqueue()`` from Python.
    Output: complex symbols, ``packet_len`` tag on each packet's first symbol.

    Scheduling (GNU Radio 3.10): a source whose work returns 0 sleeps until a
    message arrives or ``blkd_input_timer_value`` expires; freed output space
    does not wake it. So work never returns 0 while symbols are queued (a
    packet may be written across several calls), and ``enqueue`` posts a
    wake-up message (PMT_NIL) on ``in`` after queuing from another thread.
    """

    def __init__(self, default_modulation: str = "qpsk", max_packet_bytes: int = numerology.MAX_PACKET_BYTES) -> None:
        gr.basic_block.__init__(self, name="ofdm_packet_source", in_sig=None, out_sig=[np.complex64])
        ofdm.get_modulation(default_modulation)
        self.default_modulation = default_modulation
        self.max_packet_bytes = max_packet_bytes
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._offset = 0  # symbols of self._queue[0] already written
        self._next_num = 0
        self._port = pmt.intern("in")
        self._len_key = pmt.intern(ofdm.PACKET_LEN_KEY)
        self._src_id = pmt.intern("ofdm_tx")
        self.packets_emitted = 0
        self.rejected = 0
        self.message_port_register_in(self._port)
        self.set_msg_handler(self._port, self._handle_msg)
        max_symbols = numerology.HEADER_BITS + numerology.payload_symbols(max_packet_bytes, 1)
        self.set_min_output_buffer(0, 2 * max_symbols)

    # ----------------------------------------------------------------- input side
    def enqueue(
        self, data: bytes, modulation: str | None = None, packet_num: int | None = None, *, wake: bool = True
    ) -> int:
        """Map one packet and queue it; returns its 8-bit packet number. Raises ValueError if invalid."""
        data = ofdm.check_packet(data, self.max_packet_bytes)
        modulation = modulation or self.default_modulation
        with self._lock:
            if packet_num is None:
                packet_num = self._next_num
            self._next_num = (packet_num + 1) & 0xFF
        symbols = ofdm.map_packet(data, modulation, packet_num)
        with self._lock:
            self._queue.append(symbols)
        if wake:
            self.to_basic_block()._post(self._port, pmt.PMT_NIL)
        return packet_num

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
        with self._lock:
            return len(self._queue)

    # ----------------------------------------------------------------- stream side
    def general_work(self, input_items, output_items):  # noqa: ANN001 (gr signature)
        out = output_items[0]
        produced = 0
        with self._lock:
            while self._queue and produced < len(out):
                sym = self._queue[0]
                if self._offset == 0:
                    self.add_item_tag(
                        0, self.nitems_written(0) + produced, self._len_key, pmt.from_long(len(sym)), self._src_id
                    )
                n = min(len(sym) - self._offset, len(out) - produced)
                out[produced : produced + n] = sym[self._offset : self._offset + n]
                produced += n
                self._offset += n
                if self._offset == len(sym):
                    self._queue.popleft()
                    self._offset = 0
                    self.packets_emitted += 1
        return produced  # 0 only when idle: the block then sleeps until the next message


class BurstPadder(gr.basic_block):
    """Tagged packets in -> the same samples with pre_pad zeros before and post_pad zeros after each packet.

    Replaces ``digital.burst_shaper_cc``, which only writes a packet's post
    padding when the *next* packet's samples arrive: the last packet of a
    burst would leave without its trailing zeros and stay stuck in the
    receiver (docs/pitfalls.md §5). Here the trailing zeros go out in the
    same call as the packet's last sample. The output ``packet_len`` tag covers the padding.
    """

    def __init__(self, pre_pad: int, post_pad: int, len_tag_key: str = ofdm.PACKET_LEN_KEY) -> None:
        gr.basic_block.__init__(self, name="ofdm_burst_padder", in_sig=[np.complex64], out_sig=[np.complex64])
        self.pre_pad, self.post_pad = int(pre_pad), int(post_pad)
        self._key = pmt.intern(len_tag_key)
        self._src_id = pmt.intern("ofdm_burst_padder")
        self._zeros = 0  # zeros still to write
        self._remaining = 0  # samples of the current packet still to copy
        self._gap = 0  # extra zeros requested on the "gap" port, written at the next packet boundary
        self.set_tag_propagation_policy(gr.TPP_DONT)
        self.message_port_register_in(pmt.intern("gap"))
        self.set_msg_handler(pmt.intern("gap"), self._handle_gap)

    def _handle_gap(self, msg: pmt.pmt_t) -> None:
        self._gap += max(int(pmt.to_long(msg)), 0)

    def forecast(self, noutput_items: int, ninputs: int) -> list[int]:  # noqa: D401
        # Pending zeros need no input; otherwise wait for at least one sample.
        return [0 if (self._zeros or self._gap) else 1] * ninputs

    def general_work(self, input_items, output_items):  # noqa: ANN001 (gr signature)
        inp, out = input_items[0], output_items[0]
        n_in, n_out = len(inp), len(out)
        consumed = produced = 0
        while produced < n_out:
            if self._zeros:
                n = min(self._zeros, n_out - produced)
                out[produced : produced + n] = 0
                self._zeros -= n
                produced += n
            elif self._remaining:
                n = min(self._remaining, n_in - consumed, n_out - produced)
                if n == 0:
                    break
                out[produced : produced + n] = inp[consumed : consumed + n]
                consumed += n
                produced += n
                self._remaining -= n
                if self._remaining == 0:
                    self._zeros = self.post_pad
            else:
                if self._gap:
                    self._zeros, self._gap = self._gap, 0
                    continue
                if consumed >= n_in:
                    break
                start = self.nitems_read(0) + consumed
                tags = self.get_tags_in_range(0, start, start + 1, self._key)
                if not tags:  # untagged samples between packets should not exist; pass them through
                    self._remaining = 1
                    continue
                self._remaining = int(pmt.to_long(tags[0].value))
                self._zeros = self.pre_pad
                self.add_item_tag(
                    0,
                    self.nitems_written(0) + produced,
                    self._key,
                    pmt.from_long(self.pre_pad + self._remaining + self.post_pad),
                    self._src_id,
                )
                if self._remaining == 0:
                    self._zeros += self.post_pad
        self.consume(0, consumed)
        return produced


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
        if pre_pad < 0 or post_pad < 0:
            raise ValueError("pre_pad and post_pad must be >= 0 samples")
        if not 0 < max_packet_bytes <= numerology.MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be in 1..{numerology.MAX_PACKET_BYTES}")
        self.default_modulation = default_modulation
        self.pre_pad, self.post_pad = pre_pad, post_pad
        self.max_packet_bytes = max_packet_bytes
        self.message_port_register_hier_in("in")

        self.source = PacketSource(default_modulation, max_packet_bytes)
        allocator = digital.ofdm_carrier_allocator_cvc(
            numerology.FFT_LEN,
            [list(numerology.OCCUPIED_CARRIERS)],
            [list(numerology.PILOT_CARRIERS)],
            [list(p) for p in ofdm.PILOT_SYMBOLS],
            [ofdm.SYNC_WORD1.tolist(), ofdm.SYNC_WORD2.tolist()],
            ofdm.PACKET_LEN_KEY,
        )
        ifft = fft.fft_vcc(numerology.FFT_LEN, False, (), True)
        cyclic_prefixer = digital.ofdm_cyclic_prefixer(
            numerology.FFT_LEN, numerology.SYMBOL_SAMPLES, 0, ofdm.PACKET_LEN_KEY
        )
        # Python blocks must stay referenced from Python, or the gateway calls into a freed object.
        self.padder = padder = BurstPadder(pre_pad, post_pad)
        scale = blocks.multiply_const_cc(_TX_SCALE)
        gate = blocks.tag_gate(gr.sizeof_gr_complex, propagate_tags)

        # docs/pitfalls.md §2: whole packets must fit in every tagged-stream buffer; set each port explicitly.
        max_vectors = 2 * numerology.MAX_FRAME_OFDM_SYMBOLS
        max_samples = 2 * (numerology.MAX_FRAME_SAMPLES + pre_pad + post_pad)
        allocator.set_min_output_buffer(0, max_vectors)
        ifft.set_min_output_buffer(0, max_vectors)
        for block in (cyclic_prefixer, padder, scale, gate):
            block.set_min_output_buffer(0, max_samples)

        self.blocks = {
            "source": self.source,
            "allocator": allocator,
            "ifft": ifft,
            "cyclic_prefixer": cyclic_prefixer,
            "padder": padder,
            "scale": scale,
            "tag_gate": gate,
        }  # for perf counters / debugging
        self.msg_connect(self, "in", self.source, "in")
        self.connect(self.source, allocator, ifft, cyclic_prefixer, padder, scale, gate, self)
        self._out_block = gate

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
        """Emit n_samples zeros at the next packet boundary (flushes a channel's buffered noise, idles a link)."""
        self.padder.to_basic_block()._post(pmt.intern("gap"), pmt.from_long(int(n_samples)))

    def burst_samples(self, frame_sizes: Sequence[int], modulation: str | None = None) -> int:
        """Samples the transmitter will emit for packets of these sizes."""
        modulation = modulation or self.default_modulation
        return numerology.burst_samples(
            frame_sizes, modulation, pre_pad_samples=self.pre_pad, post_pad_samples=self.post_pad
        )

    def samples_out(self) -> int:
        """Samples emitted so far (for pacing the sender against the receiver)."""
        return int(self._out_block.nitems_written(0))

    def pending_packets(self) -> int:
        return self.source.pending()


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
    """Run a throwaway flowgraph: frames -> one complex64 burst (e.g. for file/zmq/SDR replay)."""
    tx = OfdmTransmitter(modulation, pre_pad=pre_pad, post_pad=post_pad)
    expected = tx.burst_samples([len(f) for f in frames], modulation)
    tb = gr.top_block("ofdm_modulate")
    sink = blocks.vector_sink_c(1, max(expected, 1))
    tb.connect(tx, sink)
    tx.send(frames, modulation)
    tb.start()
    try:
        deadline = time.monotonic() + timeout_s
        # wait for what the sink consumed, not what the transmitter produced: stopping the flowgraph drops
        # whatever is still in the buffer between them (seen on a busy machine: an empty result)
        while sink.nitems_read(0) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"transmitter produced {tx.samples_out()}/{expected} samples, the sink took {sink.nitems_read(0)}"
                )
            time.sleep(0.002)
    finally:
        tb.stop()
        tb.wait()
    return np.asarray(sink.data(), dtype=np.complex64)[:expected]
