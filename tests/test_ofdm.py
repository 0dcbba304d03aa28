"""GNU Radio OFDM PHY: packet format, transmitter, receiver, loopback, calibration sweep.

Fast tests check the packet format against gr-digital's own blocks; the ones
marked ``gnuradio`` run real flowgraphs (one shared loopback for most).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

pytest.importorskip("gnuradio")

import pmt  # noqa: E402
from gnuradio import blocks, digital, gr  # noqa: E402

from phy import ofdm  # noqa: E402
from phy.channel import PerCurve  # noqa: E402
from phy.gr_loopback import LoopbackModem, measure_back_to_back_loss  # noqa: E402
from phy.ofdm_demod import decode_payload  # noqa: E402
from phy.ofdm_tx import OfdmTransmitter, make_pdu, modulate  # noqa: E402
from proto import numerology  # noqa: E402
from proto.framing import MAX_FRAME_BYTES, MAX_FRAME_PAYLOAD, Frame, fragment  # noqa: E402
from trust.sealing import FrameSealer  # noqa: E402

MODS = ("bpsk", "qpsk", "8psk", "16qam")


def _random_frames(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]


def _intact(frames: list[bytes], got) -> set[int]:
    return {p.index for p in got if p.crc_ok and 0 <= p.index < len(frames) and p.data == frames[p.index]}


# --------------------------------------------------------------------------- format (no flowgraph)
def test_sync_words_equal_gr_digital_and_leave_global_rng_alone():
    from gnuradio.digital import ofdm_txrx

    state = np.random.get_state()
    try:
        w1 = ofdm_txrx._make_sync_word1(64, ofdm_txrx._def_occupied_carriers, ofdm_txrx._def_pilot_carriers)
        w2 = ofdm_txrx._make_sync_word2(64, ofdm_txrx._def_occupied_carriers, ofdm_txrx._def_pilot_carriers)
    finally:
        np.random.set_state(state)
    assert np.allclose(w1, ofdm.SYNC_WORD1) and np.allclose(w2, ofdm.SYNC_WORD2)
    assert list(ofdm.OCCUPIED_CARRIERS) == list(ofdm_txrx._def_occupied_carriers[0])
    assert ofdm.PILOT_SYMBOLS == ofdm_txrx._def_pilot_symbols


@pytest.mark.parametrize("mod", MODS)
def test_constellations_unit_power_gray_and_gr_object_agrees(mod):
    m = ofdm.get_modulation(mod)
    assert np.isclose(np.mean(np.abs(m.points) ** 2), 1.0, atol=1e-6)  # docs/pitfalls.md §3
    d = np.abs(m.points[:, None] - m.points[None, :])
    dmin = d[d > 0].min()
    for i, j in zip(*np.nonzero(np.isclose(d, dmin))):
        assert bin(i ^ j).count("1") == 1  # nearest neighbours differ in one bit
    assert np.allclose(np.array(m.gr_constellation().points()), m.points, atol=1e-6)
    z = (np.random.default_rng(1).standard_normal(4000) * (1 + 1j)).astype(np.complex64)
    assert np.array_equal(ofdm.decide(z, mod), np.argmin(np.abs(z[:, None] - m.points[None, :]), axis=1))


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 37, 1000, 1001, 1002, ofdm.MAX_PACKET_BYTES])
def test_map_demap_roundtrip_any_length(mod, size):
    """No (len + 4) % 3 rule for our 8PSK (docs/pitfalls.md §4): the header carries the exact byte count."""
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    sym = ofdm.map_packet(data, mod, 201)
    header = ofdm.PacketHeader(size, ofdm.get_modulation(mod).bits_per_symbol, 201)
    assert len(sym) == ofdm.HEADER_BITS + header.payload_symbols
    length, number = header.fields()
    assert ofdm.PacketHeader.from_fields(length, number) == header
    assert math.ceil(length * 8 / ofdm.N_DATA_CARRIERS) == header.payload_ofdm_symbols  # what the stock parser computes
    labels = ofdm.decide(sym[ofdm.HEADER_BITS :] * ofdm.CARRIER_DEROTATION[np.arange(len(sym) - 48) % 48], mod)
    assert ofdm.demap_packet(labels, header) == (data, True)


def test_stock_8psk_padding_helpers_roundtrip_a_frame():
    frame = Frame(1, 2, 0, 1, b"x" * 981).to_bytes()  # 1001 bytes
    padded = ofdm.pad_for_stock_8psk(frame)
    assert (len(padded) + 4) % 3 == 0 and padded.startswith(frame)
    assert ofdm.strip_stock_8psk_padding(padded) == frame
    assert Frame.from_bytes(ofdm.strip_stock_8psk_padding(padded)).payload == b"x" * 981


def test_header_bits_equal_gr_digital_formatter_and_parse_with_stock_parser():
    """Our Python header writer is bit-exact with packet_header_ofdm, and the stock C++ parser reads it."""
    fmt = ofdm.header_formatter()
    # 1) the stock generator: length field = input packet length, number field = its counter (0, 1, 2, ...)
    lengths = [1, 5, 100, 1004, 4095, 37, 2, 2048]
    data, tags, off = [], [], 0
    for length in lengths:
        data += [0] * length
        tags.append(
            gr.tag_utils.python_to_tag((off, pmt.intern(ofdm.PACKET_LEN_KEY), pmt.from_long(length), pmt.intern("t")))
        )
        off += length
    tb = gr.top_block()
    src = blocks.vector_source_b(data, False, 1, tags)
    gen = digital.packet_headergenerator_bb(fmt.formatter(), ofdm.PACKET_LEN_KEY)
    sink = blocks.vector_sink_b()
    tb.connect(src, gen, sink)
    tb.run()
    stock = np.array(sink.data(), dtype=np.uint8).reshape(-1, ofdm.HEADER_BITS)
    for i, length in enumerate(lengths):
        assert np.array_equal(ofdm.header_bits_from_fields(length, i), stock[i])
    # 2) the stock parser on headers of our packets (+ one corrupt header)
    headers = [
        ofdm.PacketHeader(n, bps, num)
        for n, bps, num in [(0, 1, 0), (1000, 2, 77), (1001, 3, 255), (4091, 1, 3), (37, 4, 128), (2, 3, 9)]
    ]
    bits = np.concatenate([ofdm.header_bits(h) for h in headers] + [np.ones(48, np.uint8)])
    parser = digital.packet_headerparser_b(fmt.formatter())
    parser.set_log_level("warn")
    dbg = blocks.message_debug()
    tb = gr.top_block()
    tb.connect(blocks.vector_source_b(bits.tolist(), False), parser)
    tb.msg_connect(parser, "header_data", dbg, "store")
    tb.run()
    msgs = [dbg.get_message(i) for i in range(dbg.num_messages())]
    assert len(msgs) == len(headers) + 1 and pmt.equal(msgs[-1], pmt.PMT_F)
    for h, msg in zip(headers, msgs):
        d = pmt.to_python(msg)
        assert d[ofdm.FRAME_LEN_KEY] == h.payload_ofdm_symbols
        assert ofdm.PacketHeader.from_fields(d[ofdm.PACKET_LEN_KEY] // 8, d[ofdm.PACKET_NUM_KEY]) == h


@pytest.mark.gnuradio
@pytest.mark.parametrize("mod", MODS)
def test_the_airtime_model_counts_the_samples_the_transmitter_emits(mod):
    """proto.numerology's packet/burst sample count and airtime == what OfdmTransmitter really emits, padding too."""
    rate_hz = 250e3
    for sizes in ([0], [1], [37], [1000], [MAX_FRAME_BYTES], [ofdm.MAX_PACKET_BYTES], [1000, 0, 92, 93, 1001, 4020]):
        frames = [bytes(n) for n in sizes]
        emitted = len(modulate(frames, mod))
        assert emitted == numerology.burst_samples(sizes, mod), (mod, sizes)
        assert emitted == sum(numerology.packet_samples(n, mod) for n in sizes)
        assert numerology.burst_airtime_s(sizes, mod, rate_hz) == pytest.approx(emitted / rate_hz)
        assert sum(numerology.packet_airtime_s(n, mod, rate_hz) for n in sizes) == pytest.approx(emitted / rate_hz)
    frames = [bytes(100), bytes(3)]  # other padding: the transmitter and the count move together
    emitted = len(modulate(frames, mod, pre_pad=0, post_pad=80))
    assert emitted == numerology.burst_samples([100, 3], mod, pre_pad_samples=0, post_pad_samples=80)


@pytest.mark.parametrize("snr_db", [20.0, 30.0])
@pytest.mark.parametrize("mod", MODS)
def test_snr_estimator_unbiased_on_synthetic_frames(mod, snr_db):
    """Per-subcarrier Es/N0 in, estimate out (no flowgraph): the equalizer + EVM estimator itself."""
    rng = np.random.default_rng(int(snr_db))
    data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    sym = ofdm.map_packet(data, mod, 5)[ofdm.HEADER_BITS :]
    header = ofdm.PacketHeader(1000, ofdm.get_modulation(mod).bits_per_symbol, 5)
    n = header.payload_ofdm_symbols
    est = []
    for _ in range(10):
        frame = np.zeros((n, 64), np.complex64)
        cells = np.zeros(n * 48, np.complex64)
        cells[: len(sym)] = sym
        frame[:, ofdm.DATA_BINS] = cells.reshape(n, 48)
        frame[:, ofdm.PILOT_BINS] = ofdm.PILOT_VALUES[(np.arange(n) + 1) % 127]
        frame *= np.exp(1j * (0.4 + 0.01 * np.arange(n)))[:, None]  # residual phase + drift
        noise = rng.standard_normal((n, 64)) + 1j * rng.standard_normal((n, 64))
        frame += (noise * math.sqrt(0.5 * 10 ** (-snr_db / 10))).astype(np.complex64)
        pkt = decode_payload(frame, header)
        assert pkt.crc_ok and pkt.data == data
        est.append(pkt.snr_raw_db - ofdm.SUBCARRIER_TO_TIME_DOMAIN_DB)
    assert abs(np.mean(est) - snr_db) < 0.3


# --------------------------------------------------------------------------- transmitter
def test_transmitter_burst_length_padding_and_power():
    frames = [bytes(1000), bytes(range(256)) * 2, b""]
    x = modulate(frames, "qpsk")
    sizes = [numerology.packet_samples(len(f), "qpsk") for f in frames]
    assert len(x) == sum(sizes)
    first = x[: sizes[0]]
    pre, post = numerology.DEFAULT_PRE_PAD_SAMPLES, numerology.DEFAULT_POST_PAD_SAMPLES
    assert np.all(first[:pre] == 0) and np.all(first[-post:] == 0)  # docs/pitfalls.md §5, the last packet too
    assert np.all(x[-post:] == 0) and np.any(x[-post - 16 : -post] != 0)
    assert 0.97 < np.mean(np.abs(first[pre:-post]) ** 2) < 1.01  # unit power: the SNR convention's reference


def test_oversized_frame_is_rejected_loudly(caplog):
    tx = OfdmTransmitter("qpsk")
    with pytest.raises(ValueError, match="exceeds the OFDM PHY limit of 4091 bytes"):
        tx.send([b"ok", bytes(ofdm.MAX_PACKET_BYTES + 1)])
    assert tx.pending_packets() == 0  # nothing of the rejected burst was queued
    with pytest.raises(ValueError, match="unknown modulation"):
        tx.send([b"x"], "64qam")
    with caplog.at_level(logging.ERROR, logger="phy.ofdm_tx"):  # a PDU from a message port: logged + counted
        tx.source._handle_msg(make_pdu(bytes(5000), "qpsk"))
    assert tx.source.rejected == 1 and "exceeds the OFDM PHY limit" in caplog.text


# --------------------------------------------------------------------------- loopback
@pytest.fixture(scope="module")
def modem():
    m = LoopbackModem(30.0)
    yield m
    m.close()


@pytest.mark.gnuradio
def test_qpsk_2000_frames_of_1000_bytes_no_loss_at_30_db(modem):
    frames = [
        Frame(7, 3, i, 2000, bytes(np.random.default_rng(i).integers(0, 256, 978, dtype=np.uint8))).to_bytes()
        for i in range(2000)
    ]
    assert {len(f) for f in frames} == {1000}
    got = modem.run_packets(frames, "qpsk", 30.0)
    assert _intact(frames, got) == set(range(2000))
    assert all(p.crc_ok for p in got) and len(got) == 2000
    assert [Frame.from_bytes(p.data).seq for p in got] == list(range(2000))
    snr = np.array([p.snr_raw_db for p in got])
    assert abs(snr.mean() - 30.0) < 1.0 and snr.std() < 0.5


@pytest.mark.gnuradio
@pytest.mark.parametrize("mod", ["bpsk", "8psk", "16qam"])
def test_other_modulations_no_loss_at_30_db(modem, mod):
    frames = _random_frames(300, 1000, seed=len(mod))
    got = modem.run_packets(frames, mod, 30.0)
    assert _intact(frames, got) == set(range(300))
    assert {p.modulation for p in got} == {mod}


@pytest.mark.gnuradio
def test_mixed_modulations_and_sizes_in_one_run(modem):
    rng = np.random.default_rng(3)
    sizes = [(97 * i) % (ofdm.MAX_PACKET_BYTES + 1) for i in range(80)]  # 0 .. 4091 bytes
    frames = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    mods = [MODS[i % len(MODS)] for i in range(len(frames))]
    got = modem.run_packets(frames, mods, 30.0)
    assert _intact(frames, got) == set(range(len(frames)))
    assert [p.modulation for p in got] == mods


@pytest.mark.gnuradio
def test_many_small_packets_keep_their_order_and_index(modem):
    """More than 256 packets in one run: the 8-bit packet number is unwrapped in arrival order."""
    frames = [i.to_bytes(2, "big") + bytes(18) for i in range(700)] + [b""]
    got = modem.run_packets(frames, "qpsk", 30.0)
    assert _intact(frames, got) == set(range(len(frames)))
    assert [p.index for p in got] == list(range(len(frames)))


@pytest.mark.gnuradio
def test_largest_packets_fit_the_buffers(modem):
    """docs/pitfalls.md §2: a whole BPSK packet of the maximum size must fit every tagged-stream buffer."""
    frames = [bytes(np.random.default_rng(9).integers(0, 256, ofdm.MAX_PACKET_BYTES, dtype=np.uint8))] * 3
    sealer = FrameSealer(bytes(32), 1)
    frames += [sealer.seal(f, 1) for f in fragment(bytes(9000), 1, 0, MAX_FRAME_PAYLOAD)]  # sealed, 4038 bytes
    assert max(len(f) for f in frames[3:]) == MAX_FRAME_BYTES
    got = modem.run_packets(frames, "bpsk", 30.0)
    assert _intact(frames, got) == set(range(len(frames)))
    with pytest.raises(ValueError, match="exceeds"):
        modem.run_packets([bytes(ofdm.MAX_PACKET_BYTES + 1)], "bpsk")


@pytest.mark.gnuradio
def test_snr_estimate_within_1_db_after_the_measured_offset(modem):
    frames = _random_frames(60, 1000, seed=11)
    ref = modem.run_packets(frames, "qpsk", 20.0)
    offset = 20.0 - float(np.mean([p.snr_raw_db for p in ref if p.crc_ok]))  # the calibration step, in small
    assert abs(offset) < 1.0  # the estimator is nearly unbiased to begin with
    for snr_db in (15.0, 25.0):
        for mod in ("bpsk", "qpsk", "8psk"):
            got = modem.run_packets(frames, mod, snr_db)  # every detected packet (8PSK at 15 dB mostly fails CRC)
            assert len(got) >= 50, (mod, snr_db)
            est = np.array([p.snr_raw_db for p in got]) + offset
            assert abs(est.mean() - snr_db) < 1.0 and est.std() < 1.0, (mod, snr_db, est.mean(), est.std())


@pytest.mark.gnuradio
def test_very_high_snr_has_no_false_triggers_in_the_gaps(modem):
    """Near devices reach 60-80 dB in the sim channel: the quiet gaps must not retune the mixer (see SchmidlCoxSync)."""
    frames = _random_frames(40, 1000, seed=8)
    for mod in ("bpsk", "qpsk"):
        got = modem.run_packets(frames, mod, 75.0)
        assert _intact(frames, got) == set(range(40))
        assert min(p.snr_raw_db for p in got) > 55.0  # saturates just below 60 dB, never a corrupted tail


@pytest.mark.gnuradio
def test_per_is_high_at_5_db(modem):
    frames = _random_frames(60, 1000, seed=5)
    got = modem.run_packets(frames, "qpsk", 5.0, quiet_s=0.3)
    assert len(_intact(frames, got)) <= 3
    modem.set_snr_db(30.0)


@pytest.mark.gnuradio
def test_frequency_offset_is_corrected(modem):
    frames = _random_frames(50, 1000, seed=4)
    with LoopbackModem(25.0, freq_offset=1.3 / ofdm.FFT_LEN) as m:  # 1.3 subcarriers: coarse + fine
        got = m.run_packets(frames, "16qam")
    assert _intact(frames, got) == set(range(50))


@pytest.mark.gnuradio
def test_pdu_interface_in_and_out():
    tx = OfdmTransmitter("bpsk")
    from phy.gr_loopback import PduCollector
    from phy.ofdm_rx import OfdmReceiver

    rx = OfdmReceiver(snr_offset_db=1.5)
    sink = PduCollector()
    tb = gr.top_block()
    tb.connect(tx, rx)
    tb.msg_connect(rx, "out", sink, "in")
    tb.start()
    try:
        for i, mod in enumerate(("qpsk", "8psk")):
            tx.source.to_basic_block()._post(pmt.intern("in"), make_pdu(b"hello %d" % i, mod, packet_num=40 + i))
        tx.send_gap(4 * ofdm.SYMBOL_SAMPLES)  # flush: the receiver releases a packet once more samples arrive
        import time

        deadline = time.monotonic() + 10
        got = []
        while len(got) < 2 and time.monotonic() < deadline:
            got += sink.take(0.05)
    finally:
        tb.stop()
        tb.wait()
    assert [d for d, _ in got] == [b"hello 0", b"hello 1"]
    meta = [m for _, m in got]
    assert [m["modulation"] for m in meta] == ["qpsk", "8psk"]
    assert [m[ofdm.META_PACKET_NUM] for m in meta] == [40, 41]
    assert all(m["crc_ok"] for m in meta)
    assert all(math.isclose(m["snr_db"], m["snr_raw_db"] + 1.5) for m in meta)


@pytest.mark.gnuradio
def test_back_to_back_packets_drop_padded_ones_do_not():
    """gnuradio issue 6891 reproduced: no gap -> the demux swallows the next trigger; padding fixes it."""
    loss = measure_back_to_back_loss(n_packets=200, frame_bytes=100, modulation="qpsk", snr_db=40.0)
    assert loss["padded"] == 0.0
    assert loss["no_padding"] > 0.02


# --------------------------------------------------------------------------- calibration
@pytest.mark.gnuradio
def test_calibration_sweep_writes_a_per_curve_file(tmp_path):
    from calibration.per_sweep import load_estimator_calibration, sweep, write_calibration

    lines: list[str] = []
    result = sweep(["qpsk"], [14.0, 6.0, 10.0], frames_per_point=12, frame_bytes=500, progress=lines.append)
    assert len(lines) == 3 and "qpsk" in lines[0]
    pts = result["curves"]["qpsk"]
    assert [p[0] for p in pts] == [6.0, 10.0, 14.0]
    per = [p[1] for p in pts]
    assert per == sorted(per, reverse=True) and per[0] == 1.0 and per[-1] == 0.0
    assert abs(result["snr_offset_db"]["qpsk"]) < 1.0 and result["snr_sigma_db"]["qpsk"] < 1.0
    curve_file, _ = write_calibration(result, tmp_path / "cal" / "loopback.yaml")
    curve = PerCurve.from_file(curve_file)
    assert curve.ref_frame_bytes == 500 and curve.per(6.0, "qpsk", 500) == 1.0
    est = load_estimator_calibration(curve_file)
    assert est["snr_offset_db"]["qpsk"] == result["snr_offset_db"]["qpsk"]
