"""rf PHY without a radio: the slot plans, the bench files, --dry-run, and the real flowgraphs wired to stand-ins
(edge bursts into vector sinks, summed with noise, into the BS flowgraph through a vector source)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from phy.rf import next_slot_start, rf_subbands, slot_groups
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
