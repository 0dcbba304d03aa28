"""Record a run's link trace, replay it: same plans and the same per-frame outcomes; bad traces are named."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from config import ConfigError, load_bench
from phy.channel import DeviceGeometry, PerCurve, SimChannel, TxSetting
from phy.replay import ReplayTrace, ReplayUplinkReceiver, ReplayUplinkTransmitter
from proto.framing import fragment
from proto.link_trace import FrameRow, TraceError, read_trace, row_json
from tests.processes import ENV, REPO, TINY, read_rounds

RUN = [
    *TINY,
    "--set",
    "devices.count=2",
    "--set",
    "round.rounds=3",
    "--set",
    "training.local_steps=2",
    "--set",
    "controller.policy=lyapunov",
    "--set",
    "controller.modulations=[8psk]",  # no way round the far device's losses: ARQ and lost frames in the trace
]


def _launch(run_dir: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "launcher.main", "--run-dir", str(run_dir), *args, *RUN]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr


def _plans(run_dir: Path) -> list[list[tuple]]:
    keys = ("device_id", "status", "rank", "depth", "tx_power_dbm", "bandwidth_hz", "modulation", "keep_fraction")
    return [[tuple(d[k] for k in keys) for d in r["devices"]] for r in read_rounds(run_dir)]


def _outcomes(run_dir: Path) -> list[tuple]:
    return [
        (r.device, r.round, r.attempt, r.seq, r.outcome, r.snr_db)
        for r in read_trace(run_dir / "link_trace.jsonl")
        if isinstance(r, FrameRow)
    ]


@pytest.mark.integration
@pytest.mark.gnuradio
def test_a_gnuradio_run_replayed_on_the_sim_path_plans_and_loses_the_same(tmp_path):
    """3 rounds of lyapunov over the real OFDM modem (a near device, and a far one that loses frames), then the
    same experiment with `phy: replay` from its trace: every plan and every frame's fate and SNR are the same."""
    pytest.importorskip("gnuradio")
    recorded, replayed = tmp_path / "recorded", tmp_path / "replayed"
    devices = "devices=[{distance_m: 10, energy_budget_j: 1000}, {distance_m: 120}]"
    small_frames = "radio.frame_payload_bytes=300"  # enough frames for a mix of delivered and lost ones
    bench = ["--bench", "hw_configs/loopback.yaml", "--bench-set", devices, "--bench-set", small_frames]
    _launch(recorded, *bench, "--record-iq")
    trace = recorded / "link_trace.jsonl"
    _launch(
        replayed,
        "--bench",
        str(recorded / "bench.yaml"),  # the recording's bench, its link swapped for the trace
        "--bench-set",
        "phy=replay",
        "--bench-set",
        f"replay.trace={trace}",
    )
    outcomes = _outcomes(recorded)
    lost = [o for o in outcomes if o[4] == "lost"]
    assert lost and len(lost) < len(outcomes), "the recording should hold both delivered and lost frames"
    assert _plans(replayed) == _plans(recorded)
    assert _outcomes(replayed) == outcomes
    reports = [r for r in read_trace(trace) if not isinstance(r, FrameRow)]
    replayed_rows = [d for r in read_rounds(replayed) for d in r["devices"]]
    assert {(r.device, r.round): r.compute_s for r in reports} == {
        (d["device_id"], r["round"]): d["compute_s"] for r in read_rounds(replayed) for d in r["devices"]
    }
    assert all(d["energy_source"].endswith("+replay") for d in replayed_rows)
    _check_sigmf_recording(recorded, outcomes)


def _check_sigmf_recording(run_dir: Path, outcomes: list[tuple]) -> None:
    """The IQ at the BS receiver reads back with the sigmf package: one annotation per frame the trace holds,
    labelled with that frame, its span holding the packet's power above the noise that follows it."""
    from sigmf import sigmffile

    (meta,) = (run_dir / "iq").glob("*.sigmf-meta")
    recording = sigmffile.fromfile(str(meta.with_suffix("")))
    samples = recording.read_samples()
    annotations = recording.get_annotations()
    labels = [a["core:label"] for a in annotations]
    assert sorted(labels) == sorted(f"device {d} round {r} attempt {a} seq {s}" for d, r, a, s, _, _ in outcomes)
    ok_in_comments = sum(": ok, measured" in a["core:comment"] for a in annotations)
    assert ok_in_comments == sum(o[4] == "ok" for o in outcomes)
    last = annotations[-1]
    assert last["core:sample_start"] + last["core:sample_count"] <= len(samples)
    for a in annotations[:: max(1, len(annotations) // 20)]:
        start, count = a["core:sample_start"], a["core:sample_count"]
        packet = samples[start + 16 : start + count - 224]  # numerology's default padding either side
        tail = samples[start + count - 200 : start + count]  # the post-padding: noise only
        assert (abs(packet) ** 2).mean() > 1.2 * (abs(tail) ** 2).mean(), a


def _trace_file(tmp_path: Path, rows: list[FrameRow]) -> Path:
    path = tmp_path / "link_trace.jsonl"
    path.write_text("".join(row_json(r) + "\n" for r in rows))
    return path


def _row(seq: int, outcome: str, snr_db: float | None, **kw: object) -> FrameRow:
    fields = dict(time_s=0.0, device=0, round=1, attempt=1, seq=seq, total=3, modulation="qpsk")
    fields |= dict(tx_power_dbm=0.0, bandwidth_hz=250e3, frame_bytes=300, outcome=outcome, crc_ok=outcome == "ok")
    return FrameRow(**(fields | kw), snr_db=snr_db)  # type: ignore[arg-type]


def _send_and_receive(trace: ReplayTrace, setting: TxSetting, frames: list[bytes]) -> list[float | None]:
    ctx = zmq.Context()
    rx = ReplayUplinkReceiver(bind_address="tcp://127.0.0.1:0", trace=trace, per_curve=PerCurve.default(), context=ctx)
    bench = load_bench("hw_configs/sim.yaml")
    tx = ReplayUplinkTransmitter(
        bs_data_address=rx.address,
        geometry=DeviceGeometry(device_id=0, distance_m=10.0),
        channel=SimChannel(bench.channel, seed=0),
        per_curve=PerCurve.default(),
        seed=0,
        context=ctx,
    )
    try:
        tx.send(frames, setting, round_idx=1)
        got: list[float | None] = []
        for _ in range(50):
            got += [f.snr_db for f in rx.recv(0.1)]
            if rx.counts.total() >= len(frames):
                break
        return got
    finally:
        tx.close()
        rx.close()
        ctx.term()


def test_recorded_frames_keep_their_fate_and_others_follow_the_traced_channel(tmp_path):
    """Through real sockets: a traced (attempt, seq) sent at its recorded setting is delivered with its recorded SNR
    or dropped; the same transmission at another power, or one the trace does not hold, is judged on the traced SNR
    moved by the change in power and bandwidth."""
    rows = [_row(0, "ok", 12.0), _row(1, "lost", None), _row(2, "ok", 14.0)]
    trace = ReplayTrace.load(_trace_file(tmp_path, rows))
    frames = [f.to_bytes() for f in fragment(b"x" * 700, 0, 1, 300)]  # seqs 0, 1, 2 of round 1, attempt 0
    recorded = [replace(f, attempt=1).to_bytes() for f in fragment(b"x" * 700, 0, 1, 300)]
    assert _send_and_receive(trace, TxSetting(0.0, 250e3, "qpsk"), recorded) == [12.0, 14.0]
    # the recorded transmissions 20 dB louder: the lost one gets through too, at the median + 20 dB
    assert _send_and_receive(trace, TxSetting(20.0, 250e3, "qpsk"), recorded) == [pytest.approx(33.0)] * 3
    # attempt 0 is not in the trace: the median traced SNR (13 dB) + 20 dB of power: every frame arrives
    got = _send_and_receive(trace, TxSetting(20.0, 250e3, "qpsk"), frames)
    assert got == [pytest.approx(33.0)] * 3
    # four times the recorded bandwidth: 6 dB more noise; at -40 dBm nothing gets through
    assert _send_and_receive(trace, TxSetting(20.0, 1e6, "qpsk"), frames) == [pytest.approx(33.0 - 6.02, abs=0.01)] * 3
    assert _send_and_receive(trace, TxSetting(-40.0, 250e3, "qpsk"), frames) == []


def test_a_bad_trace_is_named_with_its_line(tmp_path):
    path = _trace_file(tmp_path, [_row(0, "ok", 12.0)])
    path.write_text(path.read_text() + '{"kind": "frame", "device": -1}\n')
    with pytest.raises(TraceError, match=r"link_trace.jsonl:2: "):
        ReplayTrace.load(path)
    path.write_text("not json\n")
    with pytest.raises(TraceError, match=r":1: not JSON"):
        list(read_trace(path))
    with pytest.raises(ConfigError, match=r"replay.trace = 'missing.jsonl': no such file"):
        load_bench("hw_configs/sim.yaml", ["phy=replay", "replay.trace=missing.jsonl"])
    with pytest.raises(ConfigError, match="replay.trace"):
        load_bench("hw_configs/sim.yaml", ["phy=replay"])
    bench = tmp_path / "bench.yaml"
    bench.write_text(json.dumps({"phy": "replay", "replay": {"trace": "link_trace.jsonl"}}))
    assert load_bench(bench).replay.trace == str(path.resolve())  # relative to the bench file's folder


def test_the_trace_marks_unacknowledged_frames_lost_bounds_floods_and_resumes(tmp_path):
    """What a burst listed and never arrived is `lost` (its size from its received siblings); rejected frames
    beyond MAX_EXTRA_ROWS are counted, not kept; a resume drops the rows of the round that runs again."""
    from bs_node.rounds.link_trace import MAX_EXTRA_ROWS, LinkTracer
    from bs_node.rounds.state import Pending
    from proto.control import Plan

    tracer = LinkTracer(tmp_path)
    frames = [replace(f, attempt=1) for f in fragment(b"y" * 700, 0, 1, 300)]
    tracer.burst_ended(0, 1, 1, [0, 1, 2], 3)
    tracer.frame(frames[0], 320, 20.0, "ok")
    tracer.frame(frames[2], 120, 21.0, "ok")
    for _ in range(MAX_EXTRA_ROWS + 5):
        tracer.frame(frames[0], 320, None, "rejected:forged")
    plan = Plan(
        round=1,
        deadline_s=10,
        participate=True,
        rank=8,
        depth=2,
        tx_power_dbm=3.0,
        bandwidth_hz=250e3,
        modulation="qpsk",
        keep_fraction=1.0,
        local_steps=2,
    )
    written = tracer.close_round(1, {0: plan}, {0: Pending(plan)})
    assert written == 3 + MAX_EXTRA_ROWS
    rows = [r for r in read_trace(tmp_path / "link_trace.jsonl") if isinstance(r, FrameRow)]
    ok0, lost1, ok2 = rows[:3]
    assert (ok0.outcome, lost1.outcome, ok2.outcome) == ("ok", "lost", "ok")
    assert lost1.frame_bytes == 320 and not lost1.crc_ok and lost1.snr_db is None
    assert lost1.tx_power_dbm == 3.0 and lost1.airtime_s is not None and lost1.airtime_s > ok2.airtime_s
    assert tracer.extra_unrecorded == {}  # cleared for the next round (5 were counted in this one)
    tracer.burst_ended(0, 2, 1, [0], 1)
    tracer.close_round(2, {}, {})
    tracer.resume(2)
    assert {r.round for r in read_trace(tmp_path / "link_trace.jsonl")} == {1}
