"""The OFDM chain's fast paths against what they replaced: same samples, same labels, same sums, same metadata.

The transmitter computes allocator -> IFFT -> cyclic prefix -> scale in numpy (phy.ofdm_tx.modulate_packet); the
first test runs gr-digital's own blocks on the same symbols and wants the same samples to float32 rounding. The
others pin the receiver's helpers to their straightforward versions. All cheap: one small flowgraph each.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

pytest.importorskip("gnuradio")

import pmt  # noqa: E402
from gnuradio import blocks, digital, fft, gr  # noqa: E402

from phy import ofdm  # noqa: E402
from phy.ofdm_decoder import _parse_serialized_dict, _u8_pmt, pdu_to_result  # noqa: E402
from phy.ofdm_demod import _window_sum  # noqa: E402
from phy.ofdm_tx import OfdmTransmitter, modulate, modulate_packet  # noqa: E402
from proto import numerology  # noqa: E402

MODS = ("bpsk", "qpsk", "8psk", "16qam")


def _stock_tx_chain(symbol_packets: list[np.ndarray]) -> np.ndarray:
    """Tagged symbols -> ofdm_carrier_allocator_cvc -> fft_vcc(reverse, shift) -> ofdm_cyclic_prefixer -> scale."""
    tags, off = [], 0
    for sym in symbol_packets:
        tags.append(
            gr.tag_utils.python_to_tag((off, pmt.intern(ofdm.PACKET_LEN_KEY), pmt.from_long(len(sym)), pmt.intern("t")))
        )
        off += len(sym)
    src = blocks.vector_source_c(np.concatenate(symbol_packets).tolist(), False, 1, tags)
    allocator = digital.ofdm_carrier_allocator_cvc(
        ofdm.FFT_LEN,
        [list(ofdm.OCCUPIED_CARRIERS)],
        [list(ofdm.PILOT_CARRIERS)],
        [list(p) for p in ofdm.PILOT_SYMBOLS],
        [ofdm.SYNC_WORD1.tolist(), ofdm.SYNC_WORD2.tolist()],
        ofdm.PACKET_LEN_KEY,
    )
    ifft = fft.fft_vcc(ofdm.FFT_LEN, False, (), True)
    prefixer = digital.ofdm_cyclic_prefixer(ofdm.FFT_LEN, ofdm.SYMBOL_SAMPLES, 0, ofdm.PACKET_LEN_KEY)
    scale = blocks.multiply_const_cc(1.0 / math.sqrt(ofdm.N_ACTIVE_CARRIERS))
    sink = blocks.vector_sink_c()
    for block in (allocator, ifft):
        block.set_min_output_buffer(0, 2 * ofdm.MAX_FRAME_OFDM_SYMBOLS)
    prefixer.set_min_output_buffer(0, 2 * ofdm.MAX_FRAME_SAMPLES)
    tb = gr.top_block()
    tb.connect(src, allocator, ifft, prefixer, scale, sink)
    tb.run()
    return np.array(sink.data(), dtype=np.complex64)


@pytest.mark.gnuradio
def test_numpy_modulator_equals_gr_digitals_transmit_blocks():
    """Same symbols in, same samples out as allocator -> IFFT -> prefixer -> multiply_const, to float32 rounding."""
    rng = np.random.default_rng(7)
    packets = [(mod, rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for mod in MODS for n in (0, 1, 43, 1000)]
    packets.append(("bpsk", bytes(ofdm.MAX_PACKET_BYTES)))  # 687 OFDM symbols: the pilot sets wrap around 127
    stock = _stock_tx_chain([ofdm.map_packet(d, mod, i) for i, (mod, d) in enumerate(packets)])
    ours = np.concatenate([modulate_packet(d, mod, i, pre_pad=0, post_pad=0) for i, (mod, d) in enumerate(packets)])
    assert ours.shape == stock.shape
    assert np.max(np.abs(ours - stock)) < 2e-6  # samples have unit power; float32 rounding is ~1e-7


@pytest.mark.gnuradio
def test_transmitter_block_emits_whole_padded_packets_and_gaps_in_order():
    frames = [b"abc", bytes(1000), b""]
    tx = OfdmTransmitter("8psk", propagate_tags=True)
    sink = blocks.vector_sink_c()
    tb = gr.top_block()
    tb.connect(tx, sink)
    tx.send(frames[:2])
    tx.send_gap(100)
    tx.send(frames[2:], "bpsk")
    tb.start()
    try:
        expected = (
            sum(numerology.packet_samples(len(f), "8psk") for f in frames[:2])
            + 100
            + numerology.packet_samples(0, "bpsk")
        )
        deadline = time.monotonic() + 10.0
        while sink.nitems_read(0) < expected and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        tb.stop()
        tb.wait()
    got = np.array(sink.data(), dtype=np.complex64)
    want = np.concatenate([modulate(frames[:2], "8psk"), np.zeros(100, np.complex64), modulate_packet(b"", "bpsk", 2)])
    assert np.array_equal(got, want)
    starts = [t.offset for t in sink.tags() if pmt.symbol_to_string(t.key) == ofdm.PACKET_LEN_KEY]
    sizes = [numerology.packet_samples(len(f), m) for f, m in zip(frames, ("8psk", "8psk", "bpsk"))]
    assert starts == [0, sizes[0], sizes[0] + sizes[1] + 100]
    assert tx.pending_packets() == 0 and tx.samples_out() == len(want)


@pytest.mark.parametrize("bps", [1, 2, 3, 4])
def test_label_packing_equals_grouping_the_bits(bps):
    rng = np.random.default_rng(bps)
    for n in (0, 1, 2, 3, 5, 1004):
        body = rng.integers(0, 256, n, dtype=np.uint8)
        bits = np.unpackbits(body)
        bits = np.concatenate([bits, np.zeros(-bits.size % bps, np.uint8)]).reshape(-1, bps)
        reference = bits @ (1 << np.arange(bps - 1, -1, -1))
        labels = ofdm.bytes_to_labels(body, bps)
        assert labels.dtype == np.uint8 and np.array_equal(labels, reference)
        assert np.array_equal(ofdm.labels_to_bytes(labels.astype(np.intp), bps, n), body)


def test_window_sum_equals_the_direct_sums():
    x = np.random.default_rng(3).standard_normal((40, 5)).astype(np.float32)
    for n, half in ((40, 16), (10, 16), (1, 16), (40, 0)):
        y = x[:n]
        direct = np.stack([y[max(i - half, 0) : i + half + 1].sum(axis=0) for i in range(n)])
        assert np.allclose(_window_sum(y, half), direct, atol=1e-5)


def test_fast_metadata_read_equals_pmt_to_python():
    meta = pmt.make_dict()
    values = {
        "crc_ok": pmt.PMT_T,
        "bad": pmt.PMT_F,
        "modulation": pmt.intern("8psk"),
        "snr_db": pmt.from_double(-3.25),
        "ofdm_packet_num": pmt.from_long(255),
        "big": pmt.from_long(-(2**40)),
        "unsigned": pmt.from_uint64(2**63 + 1),
    }
    for key, value in values.items():
        meta = pmt.dict_add(meta, pmt.intern(key), value)
    assert _parse_serialized_dict(pmt.serialize_str(meta)) == pmt.to_python(meta)
    assert _parse_serialized_dict(pmt.serialize_str(pmt.PMT_NIL)) == {}
    odd = pmt.dict_add(meta, pmt.intern("taps"), pmt.init_c32vector(2, [1j, 2]))
    assert _parse_serialized_dict(pmt.serialize_str(odd)) is None  # not a type it reads: the caller falls back
    data, got = pdu_to_result(pmt.cons(odd, _u8_pmt(b"\x00\xffxyz")))
    assert data == b"\x00\xffxyz" and list(got.pop("taps")) == [1j, 2] and got == pmt.to_python(meta)
