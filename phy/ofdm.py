"""OFDM packet format and symbol mapping shared by phy.ofdm_tx and phy.ofdm_rx.

Everything here is plain numpy (GNU Radio is imported lazily, only for the receiver's header formatter), so the
packet format can be unit-tested without a flowgraph and both ends agree. The sizes (FFT, cyclic prefix,
carriers, overhead symbols, padding, packet limit, PHY CRC) and a packet's sample count and airtime are
proto.numerology's; the payload constellations and hard decisions are phy.constellations'. The sizes and
look-ups the flowgraph modules use are re-exported here, because they address the waveform through ``phy.ofdm``.

Waveform (gr-digital defaults, so spectra and airtime match the stock blocks): 64-point FFT, cyclic prefix 16,
48 data + 4 pilot carriers (802.11a layout, DC unused), two Schmidl & Cox sync symbols, then one BPSK header
symbol, then the payload symbols.

Header: gr-digital's packet header, with the modulation signalled in it
----------------------------------------------------------------------
The header is the stock ``packet_header_ofdm`` format (12-bit length,
12-bit packet number, CRC-8, scrambled, one BPSK OFDM symbol), so the
receiver parses it with the stock C++ ``packet_headerparser_b``: the
header/payload handshake of ``header_payload_demux`` then involves no Python
(the demux busy-waits for the parser's answer, so a slow parser burns CPU and
stalls the stream). Two fields are repurposed so every packet can
use its own payload modulation while the stock parser still computes the
right number of payload OFDM symbols:

* length field L = ceil((len + 4) / bps): the byte count of a BPSK packet
  with the same number of symbols. The parser is built with
  bits_per_payload_sym = 1, so it derives ceil(8 L / 48) payload OFDM symbols,
  which equals ceil(ceil(8 (len + 4) / bps) / 48) for every bps.
* packet-number field = (bps - 1) << 10 | r << 8 | seq, with
  r = L * bps - (len + 4) in 0..bps-1 (recovers the exact byte count) and
  seq = packet number mod 256.

The price: CRC-8 instead of a 16-bit check (1 in 256 corrupted headers
passes; the payload CRC-32 still rejects the packet) and a 4091-byte cap
(L <= 4095 for BPSK), above proto.framing's 4020-byte frames.

8PSK length rule (docs/pitfalls.md §4)
--------------------------------------
The stock chain repacks bytes into 3-bit symbols and back, so a packet whose
(len + 4) * 8 bits is not a multiple of 3 loses its tail (~2/3 of 8PSK packets
fail CRC). Here the mapper pads the *bit* stream with zero bits up to a whole
symbol and the receiver truncates back to the byte count carried in the
header, so any length works with every modulation and nothing has to be
stripped from the frame. ``pad_for_stock_8psk`` implements the stock rule
(trailing zero bytes; safe for our data-plane Frame because Frame.payload_len
tells where the real data ends, see ``strip_stock_8psk_padding``) and is used
only when driving the stock ``digital.ofdm_tx``/``ofdm_rx`` (benchmarks).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from phy.constellations import CONSTELLATIONS
from phy.constellations import decide as decide
from phy.constellations import get_modulation as get_modulation
from proto.numerology import CP_LEN as CP_LEN
from proto.numerology import FFT_LEN as FFT_LEN
from proto.numerology import HEADER_BITS as HEADER_BITS
from proto.numerology import MAX_FRAME_OFDM_SYMBOLS as MAX_FRAME_OFDM_SYMBOLS
from proto.numerology import MAX_FRAME_SAMPLES as MAX_FRAME_SAMPLES
from proto.numerology import MAX_PACKET_BYTES as MAX_PACKET_BYTES
from proto.numerology import MODEM_BITS_PER_SYMBOL, PHY_CRC_BYTES
from proto.numerology import N_ACTIVE_CARRIERS as N_ACTIVE_CARRIERS
from proto.numerology import N_DATA_CARRIERS as N_DATA_CARRIERS
from proto.numerology import N_HEADER_SYMBOLS as N_HEADER_SYMBOLS
from proto.numerology import N_SYNC_SYMBOLS as N_SYNC_SYMBOLS
from proto.numerology import OCCUPIED_CARRIERS as OCCUPIED_CARRIERS
from proto.numerology import PILOT_CARRIERS as PILOT_CARRIERS
from proto.numerology import SYMBOL_SAMPLES as SYMBOL_SAMPLES
from proto.numerology import payload_symbols as payload_symbols

# Tag / metadata keys used inside the flowgraphs.
PACKET_LEN_KEY = "packet_len"  # TX tagged streams (symbols, then samples)
FRAME_LEN_KEY = "frame_len"  # RX tagged streams: payload OFDM symbols
PACKET_NUM_KEY = "packet_num"  # header's packet-number field (see PacketHeader.fields)
META_PACKET_NUM = "ofdm_packet_num"  # PDU metadata: our 8-bit packet number
META_MODULATION = "modulation"

BPS_TO_MODULATION: dict[int, str] = {bps: name for name, bps in MODEM_BITS_PER_SYMBOL.items()}


# --------------------------------------------------------------------------- scrambler
def _lfsr_bytes(n_bytes: int, seed: int) -> np.ndarray:
    """802.11 additive scrambler x^7 + x^4 + 1 as a byte sequence (MSB first)."""
    state = seed & 0x7F
    bits = np.empty(n_bytes * 8, dtype=np.uint8)
    for i in range(bits.size):
        fb = ((state >> 6) ^ (state >> 3)) & 1
        bits[i] = fb
        state = ((state << 1) | fb) & 0x7F
    return np.packbits(bits)


_SCRAMBLE = _lfsr_bytes(MAX_PACKET_BYTES + PHY_CRC_BYTES, 0x7F)


def scramble(data: np.ndarray) -> np.ndarray:
    """Whiten payload+CRC bytes (self-inverse). Avoids PAPR spikes for repetitive frames (e.g. zeros)."""
    return np.bitwise_xor(data, _SCRAMBLE[: data.size])


# --------------------------------------------------------------------------- carriers, pilots, sync words
def fft_bin(carrier: int) -> int:
    """Index of a DC-relative carrier in an fft-shifted vector (DC at FFT_LEN // 2)."""
    return carrier + FFT_LEN // 2


# 802.11a pilot polarity: the scrambler's first 127 bits from the all-ones state, 0 -> +1 and 1 -> -1. One pilot
# set per OFDM symbol (header = symbol 0), cycling with period 127; equal to gr-digital's _def_pilot_symbols.
_PILOT_POLARITY = tuple(1 - 2 * int(b) for b in np.unpackbits(_lfsr_bytes(16, 0x7F))[:127])
PILOT_SYMBOLS: tuple[tuple[int, int, int, int], ...] = tuple((x, x, x, -x) for x in _PILOT_POLARITY)
DATA_BINS = np.array([fft_bin(c) for c in OCCUPIED_CARRIERS], dtype=np.intp)
# Fixed per-data-carrier rotation by j**r (r pseudo-random) applied to payload symbols. With real BPSK symbols
# on every carrier an OFDM symbol is conjugate-symmetric in time, which makes Schmidl & Cox plateaus inside
# BPSK payloads (false triggers that retune the receiver's mixer mid-packet); rotating breaks the symmetry.
# 90-degree steps keep every constellation used here on itself.
CARRIER_ROTATION = (1j ** np.random.RandomState(0x0FD).randint(0, 4, N_DATA_CARRIERS)).astype(np.complex64)
CARRIER_DEROTATION = np.conj(CARRIER_ROTATION)
PILOT_BINS = np.array([fft_bin(c) for c in PILOT_CARRIERS], dtype=np.intp)
PILOT_VALUES = np.array(PILOT_SYMBOLS, dtype=np.complex64)  # (127, 4)


def _sync_words() -> tuple[np.ndarray, np.ndarray]:
    """gr-digital's default Schmidl & Cox words (fft-shifted), without touching numpy's global RNG.

    digital.ofdm_txrx._make_sync_word{1,2} reseed the *global* numpy RNG with 42;
    a private RandomState(42) gives the identical sequence.
    """
    active = {c % FFT_LEN for c in OCCUPIED_CARRIERS + PILOT_CARRIERS}
    rng = np.random.RandomState(42)
    sw1 = [
        (math.sqrt(2) if rng.randint(2) == 0 else -math.sqrt(2)) if (x in active and x % 2) else 0.0
        for x in range(FFT_LEN)
    ]
    rng = np.random.RandomState(42)
    sw2 = [(1.0 if rng.randint(2) == 0 else -1.0) if x in active else 0.0 for x in range(FFT_LEN)]
    sw2[0] = 0.0
    return (np.fft.fftshift(np.array(sw1, dtype=np.complex64)), np.fft.fftshift(np.array(sw2, dtype=np.complex64)))


SYNC_WORD1, SYNC_WORD2 = _sync_words()


# --------------------------------------------------------------------------- header
@dataclass(frozen=True)
class PacketHeader:
    payload_len: int  # bytes, PHY CRC not included
    bits_per_symbol: int
    packet_num: int  # 0..255

    @property
    def modulation(self) -> str:
        return BPS_TO_MODULATION[self.bits_per_symbol]

    @property
    def payload_symbols(self) -> int:
        """Constellation symbols carrying payload + CRC32 (last one zero-bit padded)."""
        return payload_symbols(self.payload_len, self.bits_per_symbol)

    @property
    def payload_ofdm_symbols(self) -> int:
        return math.ceil(self.payload_symbols / N_DATA_CARRIERS)

    def fields(self) -> tuple[int, int]:
        """(length field, packet-number field) of the stock header (see module docstring)."""
        q = self.payload_len + PHY_CRC_BYTES
        length = -(-q // self.bits_per_symbol)
        r = length * self.bits_per_symbol - q
        return length, ((self.bits_per_symbol - 1) << 10) | (r << 8) | (self.packet_num & 0xFF)

    @classmethod
    def from_fields(cls, length: int, number: int, max_payload_len: int = MAX_PACKET_BYTES) -> PacketHeader | None:
        """Inverse of fields(); None for combinations our transmitter never sends."""
        bps = ((number >> 10) & 0x3) + 1
        r = (number >> 8) & 0x3
        if bps not in BPS_TO_MODULATION or r >= bps:
            return None
        payload_len = length * bps - r - PHY_CRC_BYTES
        if not 0 <= payload_len <= max_payload_len:
            return None
        return cls(payload_len, bps, number & 0xFF)


def _gr_lfsr_bits(mask: int, seed: int, reg_len: int, n: int) -> np.ndarray:
    """gr::digital::lfsr(mask, seed, reg_len).next_bit() n times (Fibonacci LFSR, output = LSB)."""
    reg, out = seed, np.empty(n, dtype=np.uint8)
    for i in range(n):
        out[i] = reg & 1
        newbit = bin(reg & mask).count("1") & 1
        reg = (reg >> 1) | (newbit << reg_len)
    return out


def _crc8(data: bytes, poly: int = 0x07, init: int = 0xFF) -> int:
    """CRC-8 of gr-digital's packet_header_default (poly 0x07, init 0xFF, no reflection, no final xor)."""
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


_HEADER_SCRAMBLE = _gr_lfsr_bits(0x8A, 0x6F, 7, HEADER_BITS)  # packet_header_ofdm(scramble_header=True)


def header_bits(header: PacketHeader) -> np.ndarray:
    """48 header bits (uint8 0/1) of a packet, see header_bits_from_fields."""
    return header_bits_from_fields(*header.fields())


def header_bits_from_fields(length: int, number: int) -> np.ndarray:
    """48 header bits (uint8 0/1), bit-exact with gr-digital's packet_header_ofdm formatter.

    LSB first: 12-bit length, 12-bit number, CRC-8 over (length, number) as two
    little-endian u16, 16 zero bits; XOR the scrambler mask. tests/test_ofdm.py
    checks it against packet_headergenerator_bb and packet_headerparser_b.
    """
    length, number = length & 0xFFF, number & 0xFFF
    crc = _crc8(bytes((length & 0xFF, length >> 8, number & 0xFF, number >> 8)))
    word = length | (number << 12) | (crc << 24)
    bits = ((word >> np.arange(HEADER_BITS, dtype=np.uint64)) & 1).astype(np.uint8)
    return bits ^ _HEADER_SCRAMBLE


def header_formatter() -> Any:
    """gr-digital's packet_header_ofdm for the receiver's C++ parser (payload bits per symbol fixed to 1)."""
    from gnuradio import digital

    return digital.packet_header_ofdm(
        [list(OCCUPIED_CARRIERS)], N_HEADER_SYMBOLS, PACKET_LEN_KEY, FRAME_LEN_KEY, PACKET_NUM_KEY, 1, 1, True
    )


# --------------------------------------------------------------------------- mapping
def check_packet(data: bytes | bytearray | memoryview, max_packet_bytes: int = MAX_PACKET_BYTES) -> bytes:
    """Validate one packet's bytes; raises ValueError with the reason (never drop silently)."""
    try:
        data = bytes(data)
    except TypeError:
        raise ValueError(f"packet must be bytes-like, got {type(data).__name__}") from None
    if len(data) > max_packet_bytes:
        raise ValueError(
            f"packet of {len(data)} bytes exceeds the OFDM PHY limit of {max_packet_bytes} bytes "
            f"(buffers are sized for it; split the data into smaller frames)"
        )
    return data


def map_packet(data: bytes, modulation: str, packet_num: int = 0) -> np.ndarray:
    """Packet bytes -> complex symbols for the carrier allocator: 48 header + payload symbols.

    Payload = scramble(data + CRC32(data)), bits MSB first, grouped into
    bits_per_symbol labels (last label zero-padded), Gray-mapped, each symbol
    rotated by its data carrier's CARRIER_ROTATION.
    """
    mod = get_modulation(modulation)
    data = check_packet(data)
    header = PacketHeader(len(data), mod.bits_per_symbol, packet_num & 0xFF)
    body = np.frombuffer(data + struct.pack(">I", zlib.crc32(data)), dtype=np.uint8)
    labels = bytes_to_labels(scramble(body), mod.bits_per_symbol)
    out = np.empty(HEADER_BITS + labels.size, dtype=np.complex64)
    out[:HEADER_BITS] = CONSTELLATIONS["bpsk"].points[header_bits(header)]
    np.multiply(mod.points[labels], _rotation(labels.size), out=out[HEADER_BITS:])
    return out


def _rotation(n: int) -> np.ndarray:
    """CARRIER_ROTATION repeated over n payload symbols (the first n of a table sized for the largest packet)."""
    return _ROTATION_TABLE[:n]


_ROTATION_TABLE = np.tile(CARRIER_ROTATION, -(-payload_symbols(MAX_PACKET_BYTES, 1) // N_DATA_CARRIERS))
_SHIFTS = {1: np.array([7, 6, 5, 4, 3, 2, 1, 0], np.uint8), 2: np.array([6, 4, 2, 0], np.uint8)}
_SHIFTS[4] = np.array([4, 0], np.uint8)


def bytes_to_labels(body: np.ndarray, bps: int) -> np.ndarray:
    """Bytes -> bps-bit labels (uint8), bits MSB first, the last label zero-bit padded.

    The same as grouping np.unpackbits(body) into bps-bit numbers; for 1, 2 and 4 bits a label never straddles a
    byte, so it is a shift and a mask per byte.
    """
    body = np.asarray(body, dtype=np.uint8)
    if bps in _SHIFTS:
        return ((body[:, None] >> _SHIFTS[bps]) & ((1 << bps) - 1)).ravel()
    bits = np.unpackbits(body)
    n_sym = -(-bits.size // bps)
    padded = np.zeros(n_sym * bps, dtype=np.uint8)
    padded[: bits.size] = bits
    groups = padded.reshape(n_sym, bps)
    labels = groups[:, 0].copy()
    for k in range(1, bps):
        labels <<= 1
        labels |= groups[:, k]
    return labels


def labels_to_bytes(labels: np.ndarray, bps: int, n_bytes: int) -> np.ndarray:
    """Inverse of bytes_to_labels: the first n_bytes bytes (uint8) carried by bps-bit labels."""
    labels = np.asarray(labels).astype(np.uint8, copy=False)
    if bps in _SHIFTS:
        per_byte = 8 // bps
        groups = labels[: n_bytes * per_byte].reshape(n_bytes, per_byte)
        out = groups[:, 0] << _SHIFTS[bps][0]
        for k in range(1, per_byte):
            out |= groups[:, k] << _SHIFTS[bps][k]
        return out
    bits = np.unpackbits(labels[:, None], axis=1)[:, 8 - bps :].ravel()
    return np.packbits(bits[: n_bytes * 8])


def demap_packet(labels: np.ndarray, header: PacketHeader) -> tuple[bytes, bool]:
    """Payload labels -> (payload bytes, CRC ok). Inverse of map_packet's payload part."""
    n_bytes = header.payload_len + PHY_CRC_BYTES
    body = scramble(labels_to_bytes(labels[: header.payload_symbols], header.bits_per_symbol, n_bytes))
    data, crc = body[: header.payload_len].tobytes(), body[header.payload_len :].tobytes()
    return data, struct.pack(">I", zlib.crc32(data)) == crc


# --------------------------------------------------------------------------- stock-chain helpers
def pad_for_stock_8psk(frame: bytes) -> bytes:
    """Trailing zero bytes so (len + 4) % 3 == 0: the stock 8PSK chain's rule (docs/pitfalls.md §4).

    Only needed for digital.ofdm_tx/ofdm_rx; our own PHY carries the exact length.
    """
    return bytes(frame) + b"\x00" * ((-(len(frame) + PHY_CRC_BYTES)) % 3)


def strip_stock_8psk_padding(data: bytes) -> bytes:
    """Undo pad_for_stock_8psk for a proto.framing.Frame: its payload_len says where the frame ends."""
    from proto.framing import HEADER_BYTES, OVERHEAD_BYTES

    if len(data) < HEADER_BYTES:
        return bytes(data)
    payload_len = struct.unpack_from(">H", data, HEADER_BYTES - 2)[0]
    return bytes(data[: OVERHEAD_BYTES + payload_len])


# --------------------------------------------------------------------------- SNR convention
# Time-domain SNR = mean sample power of the burst (zero padding excluded) / noise power over the
# whole sampled bandwidth fs -- the convention of phy.channel (noise_dbm(bandwidth_hz), sample rate =
# bandwidth). The receiver measures Es/N0 per occupied subcarrier; noise spreads over all 64 bins but
# the signal only over the 52 active ones, so Es/N0 = SNR_td * 64/52 (+0.90 dB).
SUBCARRIER_TO_TIME_DOMAIN_DB = 10.0 * math.log10(N_ACTIVE_CARRIERS / FFT_LEN)  # -0.90 dB


def noise_voltage_for_snr(snr_db: float, signal_power: float = 1.0) -> float:
    """channel_model noise_voltage (complex noise power = v**2, measured) for a time-domain SNR."""
    return math.sqrt(signal_power * 10.0 ** (-snr_db / 10.0))
