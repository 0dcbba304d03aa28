"""rf PHY without a radio: the slot plans, the plan's carriers, the bench files, --dry-run, the real flowgraphs wired
to stand-ins (edge bursts into vector sinks, summed with noise, into the BS flowgraph through a vector source; and
phy.rf_standin's radios), and the radio blocks' underrun/overrun counters."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from phy import fdma
from phy.rf_plan import next_slot_start, plan_center_freqs_hz, rf_subbands, slot_groups
from tests.processes import ENV, REPO

B210 = REPO / "hw_configs" / "usrp_b210.yaml"
HACKRF = REPO / "hw_configs" / "hackrf_one.yaml"


def load_bench(*args, **kwargs):
    from config import load_bench

    return load_bench(*args, **kwargs)


def test_rf_subbands_are_fixed_slots_with_planned_widths():
    plan = rf_subbands(1e6, 4, {1: 100e3, 2: 400e3})
    assert [plan[k].center_hz for k in range(4)] == [-375e3, -125e3, 125e3, 375e3]
    assert plan[1].bandwidth_hz == 100e3
    assert plan[2].bandwidth_hz == 250e3  # capped at the slot: no overlap with a neighbour
    assert plan[0].bandwidth_hz == 250e3


def test_plan_carriers_follow_the_controllers_shares_as_in_the_air():
    bench = load_bench(B210)  # 2.45 GHz, 1 MHz band
    widths = {0: 100e3, 2: 400e3, 3: 250e3}  # device 1 sits this round out; 400 kHz is more than an equal slot
    centres = plan_center_freqs_hz(bench, widths)
    # side by side from the lower band edge, in device-id order: -450, -200, +125 kHz
    assert centres == pytest.approx({0: 2.45e9 - 450e3, 2: 2.45e9 - 200e3, 3: 2.45e9 + 125e3})
    layout = fdma.plan_subbands(1e6, widths)  # the same layout the air uses (one concept, phy.fdma)
    assert {k: c - 2.45e9 for k, c in centres.items()} == pytest.approx({k: sb.center_hz for k, sb in layout.items()})
    assert plan_center_freqs_hz(bench, {k: 250e3 for k in range(4)}) == pytest.approx(
        {k: 2.45e9 + sb.center_hz for k, sb in rf_subbands(1e6, 4).items()}  # equal shares: the fixed slots
    )
    with pytest.raises(ValueError, match="more than"):
        plan_center_freqs_hz(bench, {0: 600e3, 1: 600e3})
    assert plan_center_freqs_hz(load_bench(HACKRF), widths) == {0: 2.45e9, 2: 2.45e9, 3: 2.45e9}  # tdma


def test_tdma_slots_cycle_over_devices():
    # 4 devices, 0.5 s slots: device 2 owns [1.0, 1.5) + 2k
    assert next_slot_start(0.0, 2, 4, 0.5) == pytest.approx(1.0)
    assert next_slot_start(1.2, 2, 4, 0.5) == pytest.approx(3.0)
    assert next_slot_start(3.0, 2, 4, 0.5) == pytest.approx(3.0)
    starts = {next_slot_start(10.01, k, 4, 0.5) % 2.0 for k in range(4)}
    assert starts == {0.0, 0.5, 1.0, 1.5}


def test_slot_groups_fit_the_usable_slot():
    groups = slot_groups([1000] * 20, "qpsk", 1e6, 0.03)  # ~7.3 ms per 1000-byte QPSK packet at 1 Msps
    assert sum(len(g) for g in groups) == 20 and [i for g in groups for i in g] == list(range(20))
    assert all(len(g) == 4 for g in groups[:-1])
    assert slot_groups([4000], "bpsk", 1e5, 0.001) == [[0]]  # a packet longer than a slot still goes alone


def test_rf_benches_load_and_bad_values_name_the_field():
    from config import ConfigError

    assert load_bench(B210).rf.access == "fdma"
    hackrf = load_bench(HACKRF)
    assert hackrf.rf.driver == "soapy" and hackrf.rf.access == "tdma"
    for override, field in (
        ("rf.sample_rate_hz=1e5", "rf.sample_rate_hz"),
        ("rf.guard_s=0.6", "rf.guard_s"),
        ("rf.edge_device_args=[serial=1]", "rf.edge_device_args"),
        ("rf.access=cdma", "rf.access"),
        ("rf.center_freq_hz=0", "rf.center_freq_hz"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_bench(HACKRF, [override])


@pytest.mark.gnuradio
@pytest.mark.parametrize("bench", [B210, HACKRF], ids=["usrp_b210", "hackrf_one"])
def test_dry_run_prints_both_flowgraphs_and_opens_no_radio(bench):
    pytest.importorskip("gnuradio")
    out = subprocess.run(
        [sys.executable, "-m", "phy.rf", "--bench", str(bench), "--dry-run"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "BS flowgraph:" in text and "edge 3" in text
    radio = "uhd.usrp_source" if bench == B210 else "soapy.source"
    assert f"{radio}(" in text and "OfdmReceiver(dev 0)" in text and "--> FrameCollector(dev 0):in" in text
    assert text.count("--> OfdmReceiver(dev") == (4 if bench == B210 else 1)  # tdma: one receiver, whole band
    assert f"{radio}(" in text.split("--> OverrunCounter(rx_rate re-tags)")[0].splitlines()[-1]


@pytest.mark.gnuradio
@pytest.mark.integration
@pytest.mark.parametrize("access", ["fdma", "tdma"])
def test_flowgraphs_wired_to_stand_ins_deliver_frames(access, monkeypatch):
    pytest.importorskip("gnuradio")
    from gnuradio import blocks

    from phy.channel import DeviceGeometry, TxSetting
    from phy.rf import RfUplinkReceiver, RfUplinkTransmitter
    from proto.framing import Frame, fragment

    bench = load_bench(B210, [f"rf.access={access}", "rf.slot_s=0.05", "rf.guard_s=0.01"])
    monkeypatch.setattr("phy.rf.time.sleep", lambda s: None)  # slots: no waiting in a test
    sinks: dict[int, list] = {}

    def stand_in_sink(device_id):
        def factory(spec):
            assert spec.direction == "tx" and spec.sample_rate_hz == bench.rf.sample_rate_hz
            sink = blocks.vector_sink_c()
            sinks.setdefault(device_id, []).append(sink)
            return sink

        return factory

    rng = np.random.default_rng(0)
    sent = {}
    for k in (0, 2):
        tx = RfUplinkTransmitter(bench, DeviceGeometry(k, 10.0), device_count=4, sink_factory=stand_in_sink(k))
        frames = [f.to_bytes() for f in fragment(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), k, 1, 1000)]
        report = tx.send(frames, TxSetting(10.0, 250e3, "qpsk"), round_idx=1)
        assert report.frames_sent == len(frames) and report.airtime_s > 0
        sent[k] = frames
    # the air, by hand: the two radios' samples one after the other (tdma) or summed (fdma), plus noise
    bursts = {k: np.concatenate([np.asarray(s.data(), dtype=np.complex64) for s in sinks[k]]) for k in sinks}
    if access == "tdma":
        medium = np.concatenate([bursts[0], bursts[2]])
    else:
        n = max(map(len, bursts.values()))
        medium = np.zeros(n, dtype=np.complex64)
        for b in bursts.values():
            medium[: len(b)] += b
    medium = np.concatenate([np.zeros(2000, np.complex64), medium, np.zeros(20000, np.complex64)])
    medium += (rng.standard_normal(len(medium)) + 1j * rng.standard_normal(len(medium))).astype(np.complex64) * 1e-4
    source = blocks.vector_source_c(medium.tolist(), False)
    rx = RfUplinkReceiver(bench, device_count=4, source=source)
    try:
        rx.flowgraph.tb.wait()
        got = rx.recv(2.0)
        got += rx.recv(0.5)
    finally:
        rx.close()
    by_device: dict[int, list] = {}
    for f in got:
        by_device.setdefault(Frame.from_bytes(f.data).device_id, []).append(f)
    assert {k: len(v) for k, v in by_device.items()} == {k: len(v) for k, v in sent.items()}
    assert all(f.snr_db > 25 for v in by_device.values() for f in v)


def _standin_rx(bench, radios):
    from phy.rf_radio import RadioSpec

    rf = bench.rf
    spec = RadioSpec(rf.driver, "rx", rf.bs_device_args, rf.center_freq_hz, rf.sample_rate_hz, rf.rx_gain_db, "")
    return radios.open(spec)


def _collect(rx, n, timeout_s=20.0):
    import time

    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += rx.recv(0.25)
    return got


@pytest.mark.gnuradio
def test_edges_and_bs_follow_the_plans_carriers():
    """Unequal shares (one wider than an equal slot) at the carriers plan_center_freqs_hz gives: both devices'
    frames arrive, each through its own channelizer, on stand-in radios joined by a cable."""
    pytest.importorskip("gnuradio")
    from phy.channel import DeviceGeometry, TxSetting
    from phy.rf import RfUplinkReceiver, RfUplinkTransmitter
    from phy.rf_standin import StandInConfig, StandInRadios
    from proto.framing import Frame, fragment

    bench = load_bench(B210)
    radios = StandInRadios(bench, 75.0, StandInConfig(lo_offset_hz=0.0))
    widths = {0: 100e3, 2: 400e3}
    centres = plan_center_freqs_hz(bench, widths)
    rx = RfUplinkReceiver(bench, device_count=4, source=_standin_rx(bench, radios))
    try:
        assert rx.start_round(1, widths) == centres  # what the BS puts in the plans
        assert rx.flowgraph.channelizers[2].subband == fdma.Subband(2, -200e3, 400e3)
        sent = {}
        for k, width in widths.items():
            tx = RfUplinkTransmitter(bench, DeviceGeometry(k, 10.0), device_count=4, sink_factory=radios.open)
            with pytest.raises(ValueError, match="leaves the band"):
                tx.set_center_freq_hz(2.45e9 + 460e3)  # its top edge beyond +500 kHz
                tx.send([b"x"], TxSetting(0.0, width, "qpsk"), round_idx=1)
            tx.set_center_freq_hz(centres[k])
            frames = [f.to_bytes() for f in fragment(bytes(range(256)) * 6, k, 1, 1000)]
            tx.send(frames, TxSetting(0.0, width, "qpsk"), round_idx=1)
            sent[k] = frames
        got = _collect(rx, sum(map(len, sent.values())))
    finally:
        rx.close()
    by_device: dict[int, list[bytes]] = {}
    for f in got:
        by_device.setdefault(Frame.from_bytes(f.data).device_id, []).append(f.data)
    assert {k: sorted(v) for k, v in by_device.items()} == {k: sorted(v) for k, v in sent.items()}


@pytest.mark.gnuradio
def test_radio_counters_count_what_the_radio_blocks_report():
    pytest.importorskip("gnuradio")
    import pmt
    from gnuradio import blocks, gr

    from phy.rf_counters import overrun_counter, uhd_event_codes, underrun_counter

    # overruns: every rx_rate re-tag after the stream's first sample (the start's own tag does not count);
    # the counter passes the stream on (it sits in series before the receivers)
    tags = []
    for offset in (0, 100, 4000):
        tag = gr.tag_t()
        tag.offset, tag.key, tag.value = offset, pmt.intern("rx_rate"), pmt.from_double(1e6)
        tags.append(tag)
    other = gr.tag_t()
    other.offset, other.key, other.value = 50, pmt.intern("rx_time"), pmt.from_double(0.0)
    tb = gr.top_block()
    overruns = overrun_counter()
    tb.connect(blocks.vector_source_c([0j] * 5000, False, 1, [*tags, other]), overruns, blocks.null_sink(8))
    tb.run()
    assert overruns.take() == 2 and overruns.take() == 0

    # underruns: gr-uhd's async messages; those queued after a flowgraph stopped are counted too
    def uhd_msg(*codes):
        events = pmt.PMT_NIL
        for code in reversed(codes):
            events = pmt.cons(pmt.intern(code), events)
        return pmt.cons(pmt.intern("uhd_async_msg"), pmt.dict_add(pmt.make_dict(), pmt.intern("event_code"), events))

    assert uhd_event_codes(uhd_msg("underflow", "seq_error")) == ["underflow", "seq_error"]
    assert uhd_event_codes(pmt.intern("nonsense")) == []
    underruns = underrun_counter()
    for msg in (uhd_msg("underflow", "seq_error"), uhd_msg("underflow_in_packet"), uhd_msg("time_error")):
        underruns._post(pmt.intern("in"), msg)
    assert underruns.take() == 2 and underruns.take() == 0


@pytest.mark.gnuradio
@pytest.mark.parametrize("bench_file", [B210, HACKRF], ids=["uhd", "soapy"])
def test_rf_link_reports_radio_counts_per_round(bench_file):
    """take_radio_counts: a gr-uhd sink's underflows (async_msgs), None for gr-soapy's sink (it only prints 'sU');
    the BS source's overflows (re-tags); each call starts the next round's count."""
    pytest.importorskip("gnuradio")
    from phy.channel import DeviceGeometry, TxSetting
    from phy.rf import RfUplinkReceiver, RfUplinkTransmitter
    from phy.rf_standin import StandInConfig, StandInRadios

    bench = load_bench(bench_file, ["rf.slot_s=0.02", "rf.guard_s=0.005"])
    radios = StandInRadios(bench, 80.0, StandInConfig(overflows=2, underflows_per_burst=1))
    rx = RfUplinkReceiver(bench, device_count=4, source=_standin_rx(bench, radios))
    try:
        tx = RfUplinkTransmitter(bench, DeviceGeometry(0, 10.0), device_count=4, sink_factory=radios.open)
        assert tx.take_radio_counts() == {"underruns": None, "overruns": None}  # no radio opened yet
        tx.send([bytes(500)], TxSetting(bench.radio.max_tx_power_dbm, 250e3, "qpsk"), round_idx=1)
        assert len(_collect(rx, 1)) == 1
        underruns = 1 if bench.rf.driver == "uhd" else None
        assert tx.take_radio_counts() == {"underruns": underruns, "overruns": None}
        assert rx.take_radio_counts() == {"underruns": None, "overruns": 2}
        assert rx.take_radio_counts()["overruns"] == 0
        assert tx.take_radio_counts()["underruns"] == (0 if underruns else None)
    finally:
        rx.close()
