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
import os
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
    head = pmt.car(msg)
    meta = _parse_serialized_dict(pmt.serialize_str(head))
    if meta is None:  # a value type the fast path does not read: the general (~5x slower) conversion
        meta = pmt.to_python(head) or {}
    vec = pmt.cdr(msg)
    raw = pmt.serialize_str(vec) if pmt.is_u8vector(vec) else b""
    if raw[:2] == b"\x0a\x00" and raw[6:8] == b"\x01\x00":  # fast path: u8vector header, 1 pad byte (_u8_pmt)
        return raw[8:], meta
    return bytes(pmt.u8vector_elements(vec)), meta


# pmt's serialisation tags (pmt_serial_tags.h) of the values a receiver PDU's metadata holds
_TRUE, _FALSE, _SYMBOL, _INT32, _DOUBLE, _NULL, _PAIR, _DICT, _UINT64, _INT64 = 0, 1, 2, 3, 4, 6, 7, 9, 11, 13
_FIXED = {_INT32: (">i", 4), _DOUBLE: (">d", 8), _UINT64: (">Q", 8), _INT64: (">q", 8)}


def _parse_serialized_dict(buf: bytes) -> dict | None:
    """pmt.to_python of a serialised dict of symbols -> bools / ints / doubles / symbols; None for anything else.

    pmt.to_python walks the dict through a dozen binding calls per entry (~45 us for a receiver PDU's six);
    reading pmt.serialize_str's bytes takes a few. An empty or nil metadata gives {} (as ``to_python(...) or {}``).
    """
    out: dict = {}
    i, end = 0, len(buf)
    try:
        while buf[i] != _NULL:
            if buf[i] != _DICT or buf[i + 1] != _PAIR or buf[i + 2] != _SYMBOL:
                return None
            n = int.from_bytes(buf[i + 3 : i + 5], "big")
            key = buf[i + 5 : i + 5 + n].decode()
            i += 5 + n
            tag = buf[i]
            if tag in (_TRUE, _FALSE):
                value: object = tag == _TRUE
                i += 1
            elif tag in _FIXED:
                fmt, size = _FIXED[tag]
                value = struct.unpack_from(fmt, buf, i + 1)[0]
                i += 1 + size
            elif tag == _SYMBOL:
                n = int.from_bytes(buf[i + 1 : i + 3], "big")
                value = buf[i + 3 : i + 3 + n].decode()
                i += 3 + n
            else:
                return None
            out[key] = value
    except (IndexError, UnicodeDecodeError, struct.error):
        return None
    return out if i == end - 1 else None


class PayloadDecoder(gr.sync_block):
    """Soft-equalized payload symbols (tagged per packet) -> one PDU per packet on message port ``out``.

    Message port ``headers`` takes the stock header parser's verdicts (it has no counters) and counts them; it sits
    off the demux's critical path, and counting here costs no thread of its own.
    """

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
        self.headers_ok = 0
        self.headers_failed = 0
        self.message_port_register_in(pmt.intern("headers"))
        self.set_msg_handler(pmt.intern("headers"), self._count_header)

    def _count_header(self, msg: pmt.pmt_t) -> None:
        if pmt.is_dict(msg):
            self.headers_ok += 1
        else:
            self.headers_failed += 1

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
                # Let a waiting thread have the core: the header path's blocks, which header_payload_demux spins
                # for (docs/pitfalls.md §15), would otherwise wait for this thread's time slice to run out.
                os.sched_yield()
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
