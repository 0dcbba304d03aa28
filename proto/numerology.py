"""The OFDM air format in numbers: modulations, sizes, and what one packet costs in samples and seconds.

Everything that needs one of these numbers (config validation, the sim, the GNU Radio transmitter and receiver,
the air, the controller's cost model) reads it here, so they cannot disagree between processes or between the
airtime a plan assumes and the samples the transmitter really emits (tests/test_ofdm.py checks the latter against
phy.ofdm_tx.modulate). Pure Python: importing it loads neither numpy nor GNU Radio.

Waveform (gr-digital's ofdm_txrx defaults): 64-point FFT, cyclic prefix 16, 48 data + 4 pilot carriers
(802.11a layout, DC unused). A packet is ``pre_pad`` zero samples, two Schmidl & Cox sync symbols, one BPSK
header symbol, the payload symbols (payload bytes + PHY CRC-32, zero-bit padded to a whole constellation symbol,
then to a whole OFDM symbol), and ``post_pad`` zero samples. The sample rate is the bandwidth (complex baseband),
so halving a subband doubles the airtime of the same packet.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal, cast, get_args

# --------------------------------------------------------------------------- modulations
Modulation = Literal["bpsk", "qpsk", "8psk"]  # what a plan may choose: the ones with a PER curve
MODULATION_NAMES: tuple[str, ...] = get_args(Modulation)
BITS_PER_SYMBOL: dict[str, int] = {"bpsk": 1, "qpsk": 2, "8psk": 3}
# The modem also carries 16QAM (tests, benchmarks, the air); it has no PER curve, so no plan or config uses it.
ModemModulation = Literal["bpsk", "qpsk", "8psk", "16qam"]
MODEM_MODULATION_NAMES: tuple[str, ...] = get_args(ModemModulation)
MODEM_BITS_PER_SYMBOL: dict[str, int] = {**BITS_PER_SYMBOL, "16qam": 4}


def check_modulation(modulation: object) -> Modulation:
    """`modulation` if a plan may use it; ValueError naming the choices otherwise."""
    if not isinstance(modulation, str) or modulation not in MODULATION_NAMES:
        raise ValueError(f"unknown modulation {modulation!r}; expected one of {list(MODULATION_NAMES)}")
    return cast(Modulation, modulation)


def modem_bits_per_symbol(modulation: object) -> int:
    """Bits per constellation symbol of any modulation the modem carries; ValueError otherwise."""
    if not isinstance(modulation, str) or modulation not in MODEM_BITS_PER_SYMBOL:
        raise ValueError(f"unknown modulation {modulation!r}; expected one of {list(MODEM_MODULATION_NAMES)}")
    return MODEM_BITS_PER_SYMBOL[modulation]


# --------------------------------------------------------------------------- sizes
FFT_LEN = 64
CP_LEN = 16
SYMBOL_SAMPLES = FFT_LEN + CP_LEN  # 80
# Carrier indices relative to DC (negative = below DC); the same as gr-digital's ofdm_txrx defaults.
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
N_PILOT_CARRIERS = len(PILOT_CARRIERS)  # 4
N_ACTIVE_CARRIERS = N_DATA_CARRIERS + N_PILOT_CARRIERS  # 52
N_SYNC_SYMBOLS = 2
N_HEADER_SYMBOLS = 1
OVERHEAD_SYMBOLS = N_SYNC_SYMBOLS + N_HEADER_SYMBOLS  # 3 per packet
HEADER_BITS = N_DATA_CARRIERS  # one BPSK symbol
PHY_CRC_BYTES = 4  # the PHY's own CRC-32 after every packet's payload
MAX_PACKET_BYTES = 4091  # 12-bit header length field (BPSK); >= proto.framing.MAX_FRAME_BYTES (4020)
# Zero padding the transmitter puts before/after every packet (docs/pitfalls.md §5, gnuradio issue 6891; see
# phy.gr_loopback): 240 samples per packet in all (3.3 % of a 1000-byte QPSK packet). After the last packet of
# a burst the receiver needs 80 + 8 samples (data delay) + up to 127 (the plateau detector's look-ahead) before
# it can release the payload, hence the post padding of 224.
DEFAULT_PRE_PAD_SAMPLES = 16
DEFAULT_POST_PAD_SAMPLES = 224


def payload_symbols(payload_bytes: int, bits_per_symbol: int) -> int:
    """Constellation symbols carrying payload + PHY CRC (the last one zero-bit padded)."""
    return math.ceil((payload_bytes + PHY_CRC_BYTES) * 8 / bits_per_symbol)


# The largest packet (BPSK) in OFDM symbols and samples without padding, for buffer sizes (docs/pitfalls.md §2).
MAX_PAYLOAD_OFDM_SYMBOLS = math.ceil(payload_symbols(MAX_PACKET_BYTES, 1) / N_DATA_CARRIERS)
MAX_FRAME_OFDM_SYMBOLS = MAX_PAYLOAD_OFDM_SYMBOLS + OVERHEAD_SYMBOLS
MAX_FRAME_SAMPLES = MAX_FRAME_OFDM_SYMBOLS * SYMBOL_SAMPLES


# --------------------------------------------------------------------------- airtime
def payload_ofdm_symbols(payload_bytes: int, modulation: str) -> int:
    """OFDM symbols after the header that carry a packet of payload_bytes in this modulation."""
    if isinstance(payload_bytes, bool):
        raise ValueError(f"payload_bytes must be an int, got {payload_bytes!r}")
    try:
        payload_bytes = operator.index(payload_bytes)
    except TypeError:
        raise ValueError(f"payload_bytes must be an int, got {payload_bytes!r}") from None
    if not 0 <= payload_bytes <= MAX_PACKET_BYTES:
        raise ValueError(f"payload_bytes must be in 0..{MAX_PACKET_BYTES} (the PHY limit), got {payload_bytes}")
    return math.ceil(payload_symbols(payload_bytes, modem_bits_per_symbol(modulation)) / N_DATA_CARRIERS)


def packet_samples(
    payload_bytes: int,
    modulation: str,
    *,
    pre_pad_samples: int = DEFAULT_PRE_PAD_SAMPLES,
    post_pad_samples: int = DEFAULT_POST_PAD_SAMPLES,
) -> int:
    """Samples the transmitter emits for one packet: padding, sync, header and payload OFDM symbols."""
    if pre_pad_samples < 0 or post_pad_samples < 0:
        raise ValueError(f"padding must be >= 0 samples, got {pre_pad_samples} / {post_pad_samples}")
    n_ofdm = payload_ofdm_symbols(payload_bytes, modulation) + OVERHEAD_SYMBOLS
    return n_ofdm * SYMBOL_SAMPLES + pre_pad_samples + post_pad_samples


def packet_airtime_s(
    payload_bytes: int,
    modulation: str,
    bandwidth_hz: float,
    *,
    pre_pad_samples: int = DEFAULT_PRE_PAD_SAMPLES,
    post_pad_samples: int = DEFAULT_POST_PAD_SAMPLES,
) -> float:
    """Seconds one packet occupies a subband of bandwidth_hz (sample rate = bandwidth, padding included)."""
    if not bandwidth_hz > 0:
        raise ValueError(f"bandwidth_hz must be > 0, got {bandwidth_hz}")
    samples = packet_samples(
        payload_bytes, modulation, pre_pad_samples=pre_pad_samples, post_pad_samples=post_pad_samples
    )
    return samples / bandwidth_hz


def burst_samples(
    frame_sizes: Sequence[int],
    modulation: str,
    *,
    pre_pad_samples: int = DEFAULT_PRE_PAD_SAMPLES,
    post_pad_samples: int = DEFAULT_POST_PAD_SAMPLES,
) -> int:
    """Samples the transmitter emits for packets of these sizes sent back to back (one burst)."""
    return sum(
        packet_samples(n, modulation, pre_pad_samples=pre_pad_samples, post_pad_samples=post_pad_samples)
        for n in frame_sizes
    )


def burst_airtime_s(frame_sizes: Sequence[int], modulation: str, sample_rate_hz: float) -> float:
    """Seconds the transmitter needs for these packets at this sample rate (default padding included)."""
    if not sample_rate_hz > 0:
        raise ValueError(f"sample_rate_hz must be > 0, got {sample_rate_hz}")
    return burst_samples(frame_sizes, modulation) / sample_rate_hz
