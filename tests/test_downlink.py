"""The downlink over the PHY (gr-zmq-iq): the air's per-device channel, the BS's view ARQ and acks, the edge's
decoder and view ARQ, the controller's downlink time, and two real rounds with a far device that needs resends."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from bs_node.controllers.costs import CostModel, ModelShape
from bs_node.measurements import DeviceRound
from bs_node.rounds.downlink import Downlink
from config import CodecConfig, ConfigError, load_bench, load_experiment
from fedlora.energy import transmit_energy_j
from phy.air_chunks import burst_messages
from phy.air_downlink import LEAD_NOISE_SAMPLES, TAIL_NOISE_SAMPLES, DownlinkAir
from phy.air_physics import Physics
from phy.channel import DeviceGeometry, PerCurve, SimChannel, TxSetting
from phy.uplink import DownlinkBurst, TxReport
from proto.air import DownlinkFrames, DownlinkHeader, Listen, RoundPlan, chunk_count, decode_reply
from proto.control import Ack, Plan, ViewStatus, decode_control
from proto.framing import BS_DEVICE_ID, Frame, Reassembler
from tests.processes import ENV, REPO, TINY, read_rounds

ZMQ_IQ = REPO / "hw_configs" / "zmq_iq.yaml"
gnuradio = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import gnuradio"], capture_output=True).returncode != 0,
    reason="GNU Radio is not installed",
)


# --------------------------------------------------------------------------------------------- config
def test_the_downlink_goes_over_the_phy_by_default_on_gr_zmq_iq_only():
    assert load_bench(ZMQ_IQ).downlink_over_phy
    assert not load_bench(None).downlink_over_phy  # sim: the view rides the control plane
    assert not load_bench(ZMQ_IQ, ["downlink.over_phy=false"]).downlink_over_phy
    with pytest.raises(ConfigError, match="downlink.over_phy"):
        load_bench(None, ["downlink.over_phy=true"])
    with pytest.raises(ConfigError, match="downlink.modulation"):
        load_bench(ZMQ_IQ, ["downlink.modulation=ook"])


# --------------------------------------------------------------------------------------------- BS side
@dataclass
class Sent:
    frames: list[Frame]
    devices: list[int]
    final: bool
    kind: str


def _bs_downlink(*overrides: str, clock=time.monotonic) -> tuple[Downlink, list[Sent]]:
    bench = load_bench(ZMQ_IQ, ["radio.frame_payload_bytes=100", "downlink.burst_frames=4", *overrides])
    sent: list[Sent] = []

    def send(burst: DownlinkBurst) -> TxReport:
        assert burst.setting == TxSetting(bench.downlink.tx_power_dbm, bench.radio.total_bandwidth_hz, "qpsk")
        sent.append(Sent([Frame.from_bytes(f) for f in burst.frames], list(burst.device_ids), burst.final, burst.kind))
        return TxReport(len(burst.frames), sum(len(f) for f in burst.frames), airtime_s=0.01 * len(burst.frames))

    return Downlink(bench, send, clock), sent


def _status(device_id: int, attempt: int, received, total: int = 10, timed_out: bool = False) -> ViewStatus:
    return ViewStatus(
        device_id=device_id, round=5, attempt=attempt, received=sorted(received), total=total, timed_out=timed_out
    )


def test_the_bs_broadcasts_each_view_once_then_resends_only_what_a_device_missed():
    now = [100.0]
    dl, sent = _bs_downlink("arq.max_attempts=3", clock=lambda: now[0])
    views = {(8, 2): bytes(range(256)) * 3 + b"x" * 182, (4, 1): b"b" * 250}  # 950 bytes: 10 frames; 3 frames
    dl.start_round(5, views, {0: (8, 2), 1: (8, 2), 2: (4, 1), 3: (8, 2)})
    assert dl.announce((8, 2)) == {"view_frames": 10, "view_sha256": hashlib.sha256(views[(8, 2)]).hexdigest()}
    dl.broadcast(exclude={3})  # device 3's plan did not go out
    assert [(len(s.frames), s.devices, s.final) for s in sent] == [
        (3, [2], True),
        (4, [0, 1], False),
        (4, [0, 1], False),
        (2, [0, 1], True),
    ]
    assert all(f.device_id == BS_DEVICE_ID and f.round_idx == 5 and f.attempt == 1 for s in sent for f in s.frames)
    del sent[:]
    now[0] = 103.5
    dl.on_status(0, _status(0, 1, range(10)))  # device 0 holds the view: nothing more for it
    dl.on_status(1, _status(1, 1, set(range(10)) - {3, 7}))
    dl.on_status(1, _status(1, 1, set(range(10)) - {3, 7}))  # the same status again: no second resend
    assert [([f.seq for f in s.frames], s.devices, s.final) for s in sent] == [([3, 7], [1], True)]
    assert {f.attempt for f in sent[0].frames} == {2}
    dl.on_status(1, _status(1, 2, set(range(10)) - {7}))
    dl.on_status(1, _status(1, 3, set(range(10)) - {7}))  # three attempts made: the BS stops
    dl.on_status(2, _status(2, 0, [], total=3, timed_out=True))  # device 2 heard nothing: all of it again
    dl.on_status(2, _status(2, 0, [], total=3, timed_out=True))  # and again (its last attempt may be lost)
    dl.on_status(9, _status(9, 1, []))  # not a participant: ignored
    assert [([f.seq for f in s.frames], s.devices) for s in sent] == [
        ([3, 7], [1]),
        ([7], [1]),
        ([0, 1, 2], [2]),
        ([0, 1, 2], [2]),
    ]
    rows = [DeviceRound(d, True, "ok") for d in range(4)]
    for row in rows:
        dl.annotate(row)
    got = [(r.downlink_attempts, r.downlink_frames_lost, r.view_received, r.downlink_wait_s) for r in rows]
    # 13 frames sent to device 1, 9 held; the wait is known for the device that got its view, 3.5 s after the start
    assert got == [(1, 0, True, 3.5), (3, 4, False, None), (3, 9, False, None), (None, None, None, None)]
    totals = dl.totals
    assert totals.bursts == 8 and totals.frames_sent == 3 + 10 + 3 + 3 + 3
    radio = dl.bench.radio
    assert totals.energy_j == pytest.approx(
        transmit_energy_j(20.0, totals.airtime_s, radio.pa_efficiency, radio.radio_on_power_w)
    )


def test_an_ack_goes_down_as_frames_addressed_to_the_device():
    dl, sent = _bs_downlink()
    dl.start_round(5, {}, {})
    ack = Ack(round=5, attempt=2, received=list(range(0, 400, 2)))  # ~1 kB of JSON: several 100-byte frames
    dl.send_ack(3, ack)
    (burst,) = sent
    assert burst.kind == "ack" and burst.devices == [3] and burst.final and len(burst.frames) > 1
    assert {(f.device_id, f.round_idx, f.attempt) for f in burst.frames} == {(3, 5, 2)}
    reassembler = Reassembler()
    for f in burst.frames:
        reassembler.add(f)
    assert decode_control(reassembler.pop(3, 5)) == ack
    assert dl.totals.acks == 1 and dl.totals.airtime_s > 0


# --------------------------------------------------------------------------------------------- the air
def _physics(bench, distances=(10.0, 20.0, 35.0, 50.0)) -> Physics:
    return Physics(bench.radio.total_bandwidth_hz, bench.channel, tuple(distances), 0, 300.0, 1.0, 0.02, 60.0)


def test_the_air_gives_each_listener_the_burst_at_its_own_snr():
    bench = load_bench(ZMQ_IQ, ["channel.fading=none"])
    air = DownlinkAir(noise_seed=1)
    air.listen(0, b"edge-0")
    air.listen(3, b"edge-3")
    iq = (np.exp(1j * np.linspace(0, 40, 5000))).astype(np.complex64)  # unit power
    header = DownlinkHeader(
        round=2,
        burst_id=1,
        devices=[0, 3, 2],
        tx_power_dbm=20.0,
        modulation="qpsk",
        kind="view",
        packets=1,
        final=True,
        samples=5000,
        chunks=1,
    )
    end_s = air.submit(DownlinkFrames(header, iq.tobytes()), _physics(bench), now_s=100.0)
    assert end_s == pytest.approx(100.0 + 5000 / 1e6)  # on the air for its samples at the band's rate
    assert list(air.due(100.0 + 0.001)) == []  # not before its airtime has passed
    out = list(air.due(end_s))
    assert [(identity, h.device_id) for identity, h, _ in out] == [(b"edge-0", 0), (b"edge-3", 3)]
    assert air.stats["not_listening"] == 1  # device 2 never said where it listens
    channel = SimChannel(bench.channel, seed=0)
    for _, h, heard in out:
        distance = 10.0 if h.device_id == 0 else 50.0
        want = channel.snr_db(DeviceGeometry(h.device_id, distance), 2, TxSetting(20.0, 1e6, "qpsk"))
        assert h.snr_db == pytest.approx(want, abs=1e-3)
        assert len(heard) == LEAD_NOISE_SAMPLES + 5000 + TAIL_NOISE_SAMPLES
        noise = np.mean(np.abs(heard[:LEAD_NOISE_SAMPLES]) ** 2)
        assert 10 * np.log10(noise) == pytest.approx(-want, abs=1.0)  # signal power 1 over the noise
    assert out[0][1].snr_db > out[1][1].snr_db + 20  # 10 m vs 50 m: 35 log10(5) = 24.5 dB


def test_downlink_iq_is_bounded_where_it_is_decoded():
    from proto.air import MAX_DOWNLINK_SAMPLES, AirMessageError, decode_request

    header = DownlinkHeader(
        round=1,
        burst_id=1,
        devices=[0],
        tx_power_dbm=20.0,
        modulation="qpsk",
        kind="view",
        packets=1,
        final=True,
        samples=MAX_DOWNLINK_SAMPLES,
        chunks=32,
    )
    assert decode_request([header.encode()]) == header
    too_long = header.encode().replace(b'"samples":4194304', b'"samples":4194305')
    with pytest.raises(
        AirMessageError, match="dl_burst: field 'samples': Input should be less than or equal to 4194304"
    ):
        decode_request([too_long])


@gnuradio
def test_the_air_process_delivers_downlink_bursts_to_listening_edges_only():
    from phy.air_server import Air
    from phy.downlink_rx import DownlinkReceiver
    from phy.ofdm_tx import modulate

    ctx = zmq.Context()
    air = Air(address="tcp://127.0.0.1:0", medium_address="tcp://127.0.0.1:0", context=ctx)
    thread = threading.Thread(target=air.run)
    thread.start()
    bs, edge = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    decoder = DownlinkReceiver()
    try:
        for s in (bs, edge):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(air.address)
        frames = [bytes([k]) * 300 for k in range(6)]
        iq = modulate(frames, "qpsk")
        header = DownlinkHeader(
            round=1,
            burst_id=1,
            devices=[0],
            tx_power_dbm=20.0,
            modulation="qpsk",
            kind="view",
            packets=6,
            final=True,
            samples=len(iq),
            chunks=chunk_count(len(iq)),
        )
        for message in burst_messages(header, iq):  # before any plan: refused (once: its chunks are dropped)
            bs.send_multipart(message)
        assert "no plan from the BS yet" in decode_reply(_recv(bs)).error
        edge.send(Listen(device_id=0).encode())
        plan = RoundPlan(
            round=1,
            total_bandwidth_hz=1e6,
            seed=0,
            channel={"fading": "none"},
            distances_m=[10.0],
            max_cfo_hz=300.0,
            clock_speed=1.0,
            hangover_s=0.02,
            attenuation_db=60.0,
            subbands=[],
        )
        bs.send(plan.encode())
        assert decode_reply(_recv(bs)).type == "plan_ok"
        for message in burst_messages(header, iq):
            bs.send_multipart(message)
        got = decode_reply(_recv(edge))
        assert isinstance(got, DownlinkFrames) and got.header.device_id == 0 and got.header.snr_db > 30
        decoded = decoder.decode(np.frombuffer(got.iq, dtype=np.complex64), got.header.packets)
        assert sorted(rx.data for rx in decoded) == frames  # the real OFDM receiver takes every frame
        assert not bs.poll(300)  # the BS hears nothing back for a burst it sent
    finally:
        air.stop()
        thread.join(10)
        air.close()
        decoder.close()
        bs.close()
        edge.close()
        ctx.term()


def _recv(sock: zmq.Socket, timeout_ms: int = 10_000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no answer from the air"
    return sock.recv_multipart()


# --------------------------------------------------------------------------------------------- edge and BS
class _Loop:
    """The BS's Downlink, the air's DownlinkAir and an edge's EdgeDownlink joined without sockets: what the BS
    sends goes through the air's channel to the edge; the edge's view_status goes straight to the BS."""

    def __init__(self, bench, distance_m: float) -> None:
        self.air = DownlinkAir(noise_seed=3)
        self.air.listen(0, b"edge")
        self.physics = _physics(bench, (distance_m,))
        self.bs = Downlink(bench, self._send)
        self.statuses: list[ViewStatus] = []
        self.lose_all = False

    def _send(self, burst: DownlinkBurst) -> TxReport:
        from phy.ofdm_tx import modulate

        iq = modulate(burst.frames, burst.setting.modulation)
        header = DownlinkHeader(
            round=burst.round_idx,
            burst_id=1,
            devices=list(burst.device_ids),
            tx_power_dbm=burst.setting.tx_power_dbm,
            modulation=burst.setting.modulation,
            kind=burst.kind,
            packets=len(burst.frames),
            final=burst.final,
            samples=len(iq),
            chunks=chunk_count(len(iq)),
        )
        if not self.lose_all:
            self.air.submit(DownlinkFrames(header, iq.tobytes()), self.physics, now_s=0.0)
        return TxReport(len(burst.frames), sum(map(len, burst.frames)), len(iq) / burst.setting.bandwidth_hz)

    # the edge's uplink transmitter, as far as the downlink goes
    def take_downlink(self, timeout_s: float) -> list[DownlinkFrames]:
        got = [DownlinkFrames(h, iq.tobytes()) for _, h, iq in self.air.due(float("inf"))]
        if not got:
            time.sleep(min(timeout_s, 0.01))
        return got

    # the edge's control client, as far as the downlink goes
    def send(self, msg) -> None:
        if isinstance(msg, ViewStatus):
            self.statuses.append(msg)
            self.bs.on_status(0, msg)

    def heartbeat(self, *args, **kwargs) -> None:
        pass

    def moved_on(self) -> bool:
        return False


def _edge(bench, loop: _Loop):
    from edge_node.downlink import EdgeDownlink

    exp = load_experiment(None, ["round.heartbeat_s=0.05"])
    return EdgeDownlink(exp, bench, 0, loop, client=loop)  # type: ignore[arg-type]


def _plan(dl: Downlink, module=(8, 2), **update) -> Plan:
    plan = Plan(
        round=4,
        deadline_s=60.0,
        participate=True,
        rank=module[0],
        depth=module[1],
        tx_power_dbm=10.0,
        bandwidth_hz=250e3,
        modulation="qpsk",
        keep_fraction=1.0,
        local_steps=2,
    )
    return plan.model_copy(update={**dl.announce(module), **update})


@gnuradio
def test_a_far_edge_gets_its_view_whole_after_asking_for_the_missing_frames():
    # 50 m at 5 dBm over 1 MHz: ~10.5 dB, 300-byte frames lost about one in three at QPSK
    bench = load_bench(
        ZMQ_IQ,
        ["channel.fading=none", "radio.frame_payload_bytes=300", "downlink.tx_power_dbm=5", "arq.max_attempts=8"],
    )
    loop = _Loop(bench, 50.0)
    view = np.random.default_rng(0).integers(0, 256, 9000, dtype=np.uint8).tobytes()  # 30 frames
    loop.bs.start_round(4, {(8, 2): view}, {0: (8, 2)})
    loop.bs.broadcast(exclude=set())
    edge = _edge(bench, loop)
    try:
        got, snr_db = edge.receive_view(_plan(loop.bs))
        assert got == view and snr_db == pytest.approx(np.mean(edge.last_snr_db))
        dev = loop.bs.devices[0]
        assert dev.complete and dev.attempts >= 2 and dev.frames_lost > 0  # it needed resends
        assert [s.attempt for s in loop.statuses] == list(range(1, dev.attempts + 1))
        assert len(loop.statuses[0].received) < 30 and len(loop.statuses[-1].received) == 30
        assert 5 < np.median(edge.last_snr_db) < 16  # what its own receiver measured
        # an ack for the uplink comes the same way (the edge asks on the control plane, which this loop drops)
        ack = Ack(round=4, attempt=1, received=[0, 1, 2])
        loop.bs.send_ack(0, ack)
        got = edge.request_ack(4, 1, [0, 1, 2], 3, timeout_s=5.0)
        assert got in ({0, 1, 2}, None)  # a single 1-frame ack is lost about one time in three at this SNR
    finally:
        edge.close()


@gnuradio
def test_a_view_that_does_not_come_or_does_not_match_its_hash_fails_the_round_with_the_reason():
    from edge_node.downlink import ViewNotReceived

    bench = load_bench(ZMQ_IQ, ["channel.fading=none", "arq.max_attempts=2", "arq.ack_timeout_s=0.2"])
    loop = _Loop(bench, 10.0)
    view = b"v" * 2500
    loop.bs.start_round(4, {(8, 2): view}, {0: (8, 2)})
    loop.bs.broadcast(exclude=set())
    edge = _edge(bench, loop)
    try:
        with pytest.raises(ViewNotReceived, match="does not match the plan's view_sha256"):
            edge.receive_view(_plan(loop.bs, view_sha256="00" * 32))
        loop.bs.start_round(4, {(8, 2): view}, {0: (8, 2)})  # bursts of NaN are skipped, not decoded
        loop.bs.broadcast(exclude=set())
        nan = DownlinkFrames(next(iter(loop.air.due(float("inf"))))[1], np.full(9, np.nan, np.complex64).tobytes())
        loop.take_downlink = lambda timeout_s: [nan] if nan is not None else []  # type: ignore[method-assign]
        with pytest.raises(ViewNotReceived, match="0 of 3 frames after 0 attempt"):
            edge.receive_view(_plan(loop.bs))
        del loop.take_downlink
        list(loop.air.due(float("inf")))  # the BS's resends of that phase never reach the edge
        loop.lose_all = True  # nothing reaches the edge any more: it asks again, then gives up
        loop.bs.start_round(4, {(8, 2): view}, {0: (8, 2)})
        loop.bs.broadcast(exclude=set())
        with pytest.raises(ViewNotReceived, match="0 of 3 frames after 0 attempt"):
            edge.receive_view(_plan(loop.bs))
        assert [s.timed_out for s in loop.statuses[-2:]] == [True, True]
    finally:
        edge.close()


# --------------------------------------------------------------------------------------------- controller
def test_the_controller_counts_the_downlink_time_of_a_view_before_training():
    shape = ModelShape.from_shapes(
        {f"bert.encoder.layer.{i}.attention.self.query.lora_{f}": (8, 384) if f == "A" else (384, 8)
         for i in range(4) for f in "AB"},
        4,
    )  # fmt: skip
    codec = CodecConfig()
    sim = CostModel(load_bench(None), PerCurve.default(), shape, 8, (0.3, 0.2, 0.2), codec=codec)
    air = CostModel(load_bench(ZMQ_IQ), PerCurve.default(), shape, 8, (0.3, 0.2, 0.2), codec=codec)
    noise_dbm = -174 + 9 + 60
    gains = np.array([40.0, 8.0]) - 20.0 + noise_dbm  # downlink SNR 40 dB and 8 dB at 20 dBm over 1 MHz
    nodes = np.zeros((2, 1))
    assert not sim.downlink_wait_s(gains, nodes, 4).any()  # views on the control plane: no airtime
    wait = air.downlink_wait_s(gains, nodes, 4)
    assert (wait[:, 0] == 0).all() and (np.diff(wait, axis=1) > 0).all()  # deeper views take longer
    assert (wait[1, 1:] > 2 * wait[0, 1:]).all()  # the far device waits for resends
    assert wait[0, 4] == pytest.approx(
        -(-air.shape.update_bytes(8, 4, 1.0, air.view_encoding) // 1000) * 1.0 * air.downlink_frame_s, rel=1e-9
    )


# --------------------------------------------------------------------------------------------- processes
@gnuradio
@pytest.mark.integration
def test_two_rounds_over_the_air_with_the_view_and_acks_on_the_downlink(tmp_path):
    """The far device (11 dB on the downlink) misses view frames and gets them resent; the near one does not."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launcher.main",
        "--bench",
        str(ZMQ_IQ),
        "--run-dir",
        str(run_dir),
        *TINY,
        "--set",
        "devices.count=2",
        "--set",
        "round.rounds=2",
        "--set",
        "training.local_steps=2",
        "--bench-set",
        "channel.fading=none",
        "--bench-set",
        "devices=[{distance_m: 10}, {distance_m: 50}]",
        "--bench-set",
        "downlink.tx_power_dbm=5.5",
        "--bench-set",
        "radio.frame_payload_bytes=300",
        "--bench-set",
        "arq.max_attempts=8",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    bench = load_bench(ZMQ_IQ)
    for r in rounds:
        near, far = r["devices"]
        assert near["status"] == far["status"] == "ok", r["devices"]
        assert near["view_received"] and far["view_received"]
        assert (near["downlink_attempts"], near["downlink_frames_lost"]) == (1, 0)
        assert far["downlink_wait_s"] > 0 and near["downlink_wait_s"] > 0
        assert near["downlink_snr_db"] > far["downlink_snr_db"] + 15  # what each edge's receiver measured
        dl = r["downlink"]
        # every uplink attempt acked over the air (a lost ack is asked for again: one more)
        assert dl["acks"] >= near["arq_attempts"] + far["arq_attempts"] > 0
        assert dl["energy_j"] == pytest.approx(
            transmit_energy_j(5.5, dl["airtime_s"], bench.radio.pa_efficiency, bench.radio.radio_on_power_w)
        )
        assert r["downlink_bytes"] == dl["bytes_sent"] > 0
    far_rows = [r["devices"][1] for r in rounds]
    assert sum(d["downlink_attempts"] for d in far_rows) > 2 and sum(d["downlink_frames_lost"] for d in far_rows) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_bs_energy_j"] == pytest.approx(sum(r["downlink"]["energy_j"] for r in rounds))
    edge_log = (run_dir / "logs" / "edge-1.log").read_text()
    assert "downlink burst" in edge_log and "channel SNR 11.0 dB" in edge_log
