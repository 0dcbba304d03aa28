"""OFDM parameters, packet format and symbol mapping shared by phy.ofdm_tx and phy.ofdm_rx.

Everything here is plain numpy (GNU Radio is imported lazily, only for the
constellation objects and the receiver's header formatter), so the packet
format can be unit-tested without a flowgraph and both ends agree.

Waveform (gr-digital defaults, so spectra and airtime match the stock blocks
and phy.channel.ofdm_airtime_s): 64-point FFT, cyclic prefix 16, 48 data +
4 pilot carriers (802.11a layout, DC unused), two Schmidl & Cox sync symbols,
then one BPSK header symbol, then the payload symbols.

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

8PSK length rule (pitfall 4)
----------------------------
The stock chain repacks bytes into 3-bit symbols and back, so a packet whose
(len + 4) * 8 bits is not a multiple of 3 loses its tail (~2/3 of 8PSK packets
fail CRC). Here the mapper pads the *bit* stream with zero bits up to a whole
symbol and the receiver truncates back to the byte count carried in the
header, so any length works with every modulation and nothing has to be
stripped from the frame. ``pad_for_stock_8psk`` implements the stock rule
(trailing zero bytes; safe for our data-plane Frame because Frame.payload_len
tells where the real data ends, see ``strip_stock_8psk_padding``) and is used
only when driving the stock ``digital.ofdm_tx``/``ofdm_rx`` (benchmarks).

Constellations (pitfall 3)
--------------------------
Gray-coded and normalised to unit average power (``constellation_qpsk()`` has
power 4 in 3.10.5, which would put the payload 6 dB above the header).
Pilots, sync words and the BPSK header also have unit power per carrier, so
every full OFDM symbol carries the same power and the transmitter scales the
burst to unit mean sample power.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- waveform
FFT_LEN = 64
CP_LEN = 16
SYMBOL_SAMPLES = FFT_LEN + CP_LEN  # 80
# Carrier indices relative to DC (negative = below DC); same as gr-digital's ofdm_txrx defaults.
OCCUPIED_CARRIERS: tuple[int, ...] = (
    tuple(range(-26, -21))
    + tuple(range(-20, -7))
    + tuple(range(-6, 0))
    + tuple(range(1, 7))
    + tuple(range(8, 21))
    + tuple(range(22, 27))
)
PILOT_CARRIERS: tuple[int, ...] = (-21, -7, 7, 21)
N_DATA_CARRIERS = len(OCCUPIED_CARRIERS)  # 48
N_ACTIVE_CARRIERS = N_DATA_CARRIERS + len(PILOT_CARRIERS)  # 52
_PILOT_SCRAMBLE = (
    1,
    1,
    1,
    1,
    -1,
    -1,
    -1,
    1,
    -1,
    -1,
    -1,
    -1,
    1,
    1,
    -1,
    1,
    -1,
    -1,
    1,
    1,
    -1,
    1,
    1,
    -1,
    1,
    1,
    1,
    1,
    1,
    1,
    -1,
    1,
    1,
    1,
    -1,
    1,
    1,
    -1,
    -1,
    1,
    1,
    1,
    -1,
    1,
    -1,
    -1,
    -1,
    1,
    -1,
    1,
    -1,
    -1,
    1,
    -1,
    -1,
    1,
    1,
    1,
    1,
    1,
    -1,
    -1,
    1,
    1,
    -1,
    -1,
    1,
    -1,
    1,
    -1,
    1,
    1,
    -1,
    -1,
    -1,
    1,
    1,
    -1,
    -1,
    -1,
    -1,
    1,
    -1,
    -1,
    1,
    -1,
    1,
    1,
    1,
    1,
    -1,
    1,
    -1,
    1,
    -1,
    1,
    -1,
    -1,
    -1,
    -1,
    -1,
    1,
    -1,
    1,
    1,
    -1,
    1,
    -1,
    1,
    1,
    1,
    -1,
    -1,
    1,
    -1,
    -1,
    -1,
    1,
    1,
    1,
    -1,
    -1,
    -1,
    -1,
    -1,
    -1,
    -1,
)
# One pilot set per OFDM symbol (header = symbol 0), cycling with period 127 (802.11a polarity sequence).
PILOT_SYMBOLS: tuple[tuple[float, float, float, float], ...] = tuple((x, x, x, -x) for x in _PILOT_SCRAMBLE)
N_SYNC_SYMBOLS = 2
N_HEADER_SYMBOLS = 1
OVERHEAD_SYMBOLS = N_SYNC_SYMBOLS + N_HEADER_SYMBOLS  # = phy.channel.ofdm_airtime_s's default
PHY_CRC_BYTES = 4
HEADER_BITS = N_DATA_CARRIERS  # one BPSK symbol
MAX_PACKET_BYTES = 4091  # 12-bit header length field (BPSK); >= proto.framing.MAX_FRAME_BYTES (4020)
# Largest packet in OFDM symbols (BPSK) and samples, for set_min_output_buffer (pitfall 2).
MAX_PAYLOAD_OFDM_SYMBOLS = math.ceil((MAX_PACKET_BYTES + PHY_CRC_BYTES) * 8 / N_DATA_CARRIERS)
MAX_FRAME_OFDM_SYMBOLS = MAX_PAYLOAD_OFDM_SYMBOLS + OVERHEAD_SYMBOLS
MAX_FRAME_SAMPLES = MAX_FRAME_OFDM_SYMBOLS * SYMBOL_SAMPLES

# Tag / metadata keys used inside the flowgraphs.
PACKET_LEN_KEY = "packet_len"  # TX tagged streams (symbols, then samples)
FRAME_LEN_KEY = "frame_len"  # RX tagged streams: payload OFDM symbols
PACKET_NUM_KEY = "packet_num"  # header's packet-number field (see PacketHeader.fields)
META_PACKET_NUM = "ofdm_packet_num"  # PDU metadata: our 8-bit packet number
META_MODULATION = "modulation"

# Default zero padding before/after every packet (pitfall 5, gnuradio issue 6891; see phy.gr_loopback).
# 240 samples per packet in all (3.3 % of a 1000-byte QPSK packet; ofdm_airtime_s(pad_samples=240)).
# After the last packet of a burst the receiver needs 80 + 8 samples (data delay) + up to 127 (the plateau
# detector's look-ahead) before it can release the payload, hence the post padding of 224.
DEFAULT_PRE_PAD = 16
DEFAULT_POST_PAD = 224


def fft_bin(carrier: int) -> int:
    """Index of a DC-relative carrier in an fft-shifted vector (DC at FFT_LEN // 2)."""
    return carrier + FFT_LEN // 2


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


# --------------------------------------------------------------------------- constellations
def _gray(n: int) -> int:
    return n ^ (n >> 1)


def _psk_points(m: int) -> np.ndarray:
    """points[label] for Gray-coded M-PSK: neighbours on the circle differ in one bit."""
    pts = np.empty(m, dtype=np.complex128)
    for k in range(m):  # k = position on the circle
        pts[_gray(k)] = np.exp(2j * np.pi * k / m)
    return pts


def _qam16_points() -> np.ndarray:
    level = {0b00: -3.0, 0b01: -1.0, 0b11: 1.0, 0b10: 3.0}  # Gray per axis
    pts = np.array([level[lab >> 2] + 1j * level[lab & 3] for lab in range(16)])
    return pts / math.sqrt(10.0)


@dataclass(frozen=True)
class Modulation:
    """One payload constellation: points indexed by their Gray bit label, unit mean power."""

    name: str
    bits_per_symbol: int
    points: np.ndarray  # complex64, len 2**bits_per_symbol

    def gr_constellation(self) -> Any:
        """The same points as a gr-digital constellation object (power-normalised, unit power)."""
        return _gr_constellation(self.name)


def _make_modulations() -> dict[str, Modulation]:
    table = {
        "bpsk": np.array([1.0, -1.0], dtype=np.complex128),  # bit 0 -> +1
        "qpsk": np.array([1 + 1j, 1 - 1j, -1 + 1j, -1 - 1j]) / math.sqrt(2.0),  # MSB -> I sign, LSB -> Q sign
        "8psk": _psk_points(8) * np.exp(1j * np.pi / 8),  # no point on the axes, like gr's 8PSK
        "16qam": _qam16_points(),
    }
    out = {}
    for name, pts in table.items():
        pts = pts / math.sqrt(np.mean(np.abs(pts) ** 2))
        out[name] = Modulation(name, int(round(math.log2(len(pts)))), pts.astype(np.complex64))
    return out


MODULATIONS: dict[str, Modulation] = _make_modulations()
BPS_TO_MODULATION: dict[int, str] = {m.bits_per_symbol: n for n, m in MODULATIONS.items()}


def get_modulation(name: str) -> Modulation:
    try:
        return MODULATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown modulation {name!r}; expected one of {sorted(MODULATIONS)}") from None


@cache
def _gr_constellation(name: str) -> Any:
    from gnuradio import digital

    mod = get_modulation(name)
    pts = [complex(p) for p in mod.points]
    const = digital.constellation_calcdist(pts, list(range(len(pts))), 1, 1, digital.constellation.POWER_NORMALIZATION)
    return const


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


def payload_symbols(payload_len: int, bits_per_symbol: int) -> int:
    return math.ceil((payload_len + PHY_CRC_BYTES) * 8 / bits_per_symbol)


def packet_samples(
    payload_len: int, modulation: str, pre_pad: int = DEFAULT_PRE_PAD, post_pad: int = DEFAULT_POST_PAD
) -> int:
    """Exact number of samples our transmitter emits for one packet (= ofdm_airtime_s * fs)."""
    bps = get_modulation(modulation).bits_per_symbol
    n_ofdm = math.ceil(payload_symbols(payload_len, bps) / N_DATA_CARRIERS) + OVERHEAD_SYMBOLS
    return n_ofdm * SYMBOL_SAMPLES + pre_pad + post_pad


def burst_airtime_s(frame_sizes: Sequence[int], modulation: str, sample_rate_hz: float) -> float:
    """Seconds our transmitter needs for these packets at this sample rate (padding included)."""
    return sum(packet_samples(n, modulation) for n in frame_sizes) / sample_rate_hz


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
    bits = np.unpackbits(scramble(body))
    labels = _bits_to_labels(bits, mod.bits_per_symbol)
    hdr = MODULATIONS["bpsk"].points[header_bits(header)]
    payload = mod.points[labels] * CARRIER_ROTATION[np.arange(labels.size) % N_DATA_CARRIERS]
    return np.concatenate([hdr, payload]).astype(np.complex64)


def _bits_to_labels(bits: np.ndarray, bps: int) -> np.ndarray:
    n_sym = math.ceil(bits.size / bps)
    padded = np.zeros(n_sym * bps, dtype=np.uint8)
    padded[: bits.size] = bits
    weights = (1 << np.arange(bps - 1, -1, -1)).astype(np.uint8)
    return padded.reshape(n_sym, bps) @ weights


def _labels_to_bits(labels: np.ndarray, bps: int) -> np.ndarray:
    return np.unpackbits(labels.astype(np.uint8)[:, None], axis=1)[:, 8 - bps :].ravel()


# Decision look-up tables (sign/magnitude slicing is ~10x faster than angles or distances in numpy).
# 8PSK: sector k (angle in [k*pi/4, (k+1)*pi/4)) from (imag < 0, real < 0, |real| < |imag|), then Gray label.
_8PSK_SECTOR = np.array([0, 1, 3, 2, 7, 6, 4, 5], dtype=np.intp)
_8PSK_LUT = _8PSK_SECTOR ^ (_8PSK_SECTOR >> 1)
_QAM16_AXIS_LUT = np.array([0b00, 0b01, 0b11, 0b10], dtype=np.intp)  # level index (-3,-1,1,3) -> Gray bits
_QAM16_T = 2.0 / math.sqrt(10.0)


def decide(symbols: np.ndarray, modulation: str) -> np.ndarray:
    """Nearest-point hard decisions: Gray labels of the points closest to the (unit-power) symbols."""
    re, im = symbols.real, symbols.imag
    if modulation == "bpsk":
        return (re < 0).astype(np.intp)
    if modulation == "qpsk":
        return ((re < 0).astype(np.intp) << 1) | (im < 0)
    if modulation == "8psk":
        idx = ((im < 0).astype(np.intp) << 2) | ((re < 0).astype(np.intp) << 1) | (np.abs(re) < np.abs(im))
        return _8PSK_LUT[idx]
    if modulation == "16qam":
        i_re = (re > -_QAM16_T).astype(np.intp) + (re > 0) + (re > _QAM16_T)
        i_im = (im > -_QAM16_T).astype(np.intp) + (im > 0) + (im > _QAM16_T)
        return (_QAM16_AXIS_LUT[i_re] << 2) | _QAM16_AXIS_LUT[i_im]
    mod = get_modulation(modulation)
    return np.argmin(np.abs(symbols[..., None] - mod.points[None, :]), axis=-1)


def demap_packet(labels: np.ndarray, header: PacketHeader) -> tuple[bytes, bool]:
    """Payload labels -> (payload bytes, CRC ok). Inverse of map_packet's payload part."""
    bits = _labels_to_bits(np.asarray(labels, dtype=np.intp)[: header.payload_symbols], header.bits_per_symbol)
    n_bytes = header.payload_len + PHY_CRC_BYTES
    body = scramble(np.packbits(bits[: n_bytes * 8]))
    data, crc = body[: header.payload_len].tobytes(), body[header.payload_len :].tobytes()
    return data, struct.pack(">I", zlib.crc32(data)) == crc


# --------------------------------------------------------------------------- stock-chain helpers
def pad_for_stock_8psk(frame: bytes) -> bytes:
    """Trailing zero bytes so (len + 4) % 3 == 0: the stock 8PSK chain's rule (pitfall 4).

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
