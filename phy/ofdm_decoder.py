"""The payload end of the OFDM receiver: per-packet decode in a GNU Radio block, and its output PDU format.

PayloadDecoder takes the soft-equalized payload symbols (tagged per packet by the header parser), decodes each
packet with phy.ofdm_demod and publishes one PDU on message port ``out``: u8vector = decoded payload (also when
the CRC failed), metadata ``crc_ok`` (bool), ``modulation`` (str), ``snr_db`` (float, calibrated), ``snr_raw_db``
(before the offset), ``ofdm_packet_num`` (int, 8 bits), ``payload_len``. ``pdu_to_result`` reads one back.
A header that passed the stock CRC-8 but is impossible for our transmitter is counted in ``bad_headers`` and its
payload dropped.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import numpy as np
import pmt
from gnuradio import gr

from phy import ofdm
from phy.ofdm_demod import DecodedPacket, decode_payload

log = logging.getLogger(__name__)


def _u8_pmt(data: bytes) -> pmt.pmt_t:
    """bytes -> pmt u8vector via deserialisation (~6x faster than init_u8vector's per-element conversion)."""
    return pmt.deserialize_str(b"\x0a\x00" + struct.pack(">I", len(data)) + b"\x01\x00" + data)


def pdu_to_result(msg: pmt.pmt_t) -> tuple[bytes, dict]:
    """Receiver PDU -> (payload bytes, metadata dict of Python values)."""
    meta = pmt.to_python(pmt.car(msg)) or {}
    vec = pmt.cdr(msg)
    raw = pmt.serialize_str(vec) if pmt.is_u8vector(vec) else b""
    if raw[:2] == b"\x0a\x00" and raw[6:8] == b"\x01\x00":  # fast path: u8vector header, 1 pad byte (_u8_pmt)
        return raw[8:], meta
    return bytes(pmt.u8vector_elements(vec)), meta


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

    def work(self, input_items: Sequence[np.ndarray], output_items: Sequence[np.ndarray]) -> int:
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
                    assert self._header is not None  # set together with _buf
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
