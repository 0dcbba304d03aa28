"""proto.numerology: the one place for OFDM sizes, modulations and airtime (pure Python, no numpy or GNU Radio).

That the counts equal what the GNU Radio transmitter emits is checked in tests/test_ofdm.py (needs GNU Radio).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from proto import numerology as nm
from proto.framing import MAX_FRAME_BYTES

PAD = nm.DEFAULT_PRE_PAD_SAMPLES + nm.DEFAULT_POST_PAD_SAMPLES


def test_importing_it_loads_neither_numpy_nor_gnuradio_nor_torch():
    code = "import sys, proto.numerology; print(sorted({'numpy', 'gnuradio', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_modulation_sets():
    assert nm.MODULATION_NAMES == ("bpsk", "qpsk", "8psk")
    assert tuple(nm.BITS_PER_SYMBOL) == nm.MODULATION_NAMES
    assert tuple(nm.MODEM_BITS_PER_SYMBOL) == nm.MODEM_MODULATION_NAMES == ("bpsk", "qpsk", "8psk", "16qam")
    assert all(nm.MODEM_BITS_PER_SYMBOL[m] == b for m, b in nm.BITS_PER_SYMBOL.items())
    assert [nm.check_modulation(m) for m in nm.MODULATION_NAMES] == list(nm.MODULATION_NAMES)
    for bad in ("16qam", "QPSK", "", None, 2):
        with pytest.raises(ValueError, match="unknown modulation"):
            nm.check_modulation(bad)
    assert nm.modem_bits_per_symbol("16qam") == 4
    with pytest.raises(ValueError, match="unknown modulation"):
        nm.modem_bits_per_symbol("64qam")


def test_the_sizes():
    assert (nm.FFT_LEN, nm.CP_LEN, nm.SYMBOL_SAMPLES) == (64, 16, 80)
    assert (nm.N_DATA_CARRIERS, nm.N_PILOT_CARRIERS, nm.N_ACTIVE_CARRIERS) == (48, 4, 52)
    assert 0 not in nm.OCCUPIED_CARRIERS and not set(nm.OCCUPIED_CARRIERS) & set(nm.PILOT_CARRIERS)
    assert nm.OVERHEAD_SYMBOLS == 3 and nm.HEADER_BITS == 48 and nm.PHY_CRC_BYTES == 4
    assert nm.MAX_PACKET_BYTES >= MAX_FRAME_BYTES
    assert nm.MAX_PACKET_BYTES + nm.PHY_CRC_BYTES <= 0xFFF  # BPSK: the header's 12-bit length field
    assert nm.MAX_FRAME_SAMPLES == nm.packet_samples(nm.MAX_PACKET_BYTES, "bpsk", pre_pad_samples=0, post_pad_samples=0)


def test_packet_samples_and_airtime():
    # 1000 B + 4 CRC = 8032 bits; QPSK carries 96 bits per OFDM symbol -> 84 symbols, + 3 overhead, + padding
    assert nm.packet_samples(1000, "qpsk") == (84 + 3) * 80 + PAD
    assert nm.packet_samples(1000, "bpsk") == (168 + 3) * 80 + PAD  # 48 bits per OFDM symbol
    assert nm.packet_samples(1000, "8psk") == (56 + 3) * 80 + PAD  # 144
    assert nm.packet_samples(1000, "16qam") == (42 + 3) * 80 + PAD  # 192
    assert nm.packet_samples(0, "qpsk") == 4 * 80 + PAD  # the CRC alone takes a symbol
    assert nm.packet_samples(92, "qpsk") == (8 + 3) * 80 + PAD  # 96 B = 768 bits: exactly 8 symbols
    assert nm.packet_samples(93, "qpsk") == (9 + 3) * 80 + PAD
    assert nm.packet_samples(1000, "qpsk", pre_pad_samples=0, post_pad_samples=100) == (84 + 3) * 80 + 100
    assert nm.packet_airtime_s(1000, "qpsk", 1e6) == pytest.approx(((84 + 3) * 80 + 240) / 1e6)
    assert nm.packet_airtime_s(1000, "qpsk", 5e5) == pytest.approx(2 * nm.packet_airtime_s(1000, "qpsk", 1e6))
    assert nm.packet_airtime_s(1000, "qpsk", 1.0, pre_pad_samples=0, post_pad_samples=0) == (84 + 3) * 80
    sizes = [1000, 0, 4020, 17]
    assert nm.burst_samples(sizes, "8psk") == sum(nm.packet_samples(n, "8psk") for n in sizes)
    assert nm.burst_airtime_s(sizes, "8psk", 2e5) == pytest.approx(nm.burst_samples(sizes, "8psk") / 2e5)
    assert nm.burst_samples([], "qpsk") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: nm.packet_samples(10, "qam"),
        lambda: nm.packet_samples(-1, "qpsk"),
        lambda: nm.packet_samples(nm.MAX_PACKET_BYTES + 1, "bpsk"),
        lambda: nm.packet_samples(10.5, "qpsk"),
        lambda: nm.packet_samples(True, "qpsk"),
        lambda: nm.packet_samples(10, "qpsk", pre_pad_samples=-1),
        lambda: nm.packet_airtime_s(10, "qpsk", 0),
        lambda: nm.burst_airtime_s([10], "qpsk", -1e6),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_the_modem_draws_exactly_these_modulations():
    pytest.importorskip("numpy")
    from phy.constellations import CONSTELLATIONS

    assert {m: c.bits_per_symbol for m, c in CONSTELLATIONS.items()} == nm.MODEM_BITS_PER_SYMBOL
    assert all(len(c.points) == 2**c.bits_per_symbol for c in CONSTELLATIONS.values())
