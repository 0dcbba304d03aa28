"""An edge blocked in send() while its burst waits for a lagging air keeps heartbeating, so the BS does not drop it
for silence: one real edge round (tiny model) through a real ZmqIqTransmitter, BsClient and ZmqTransport, against
an air that answers ``done`` well after the BS's silence timeout. The control case, a transmitter that does not
take the heartbeat (as before), is dropped: the test can tell."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from proto.air import BurstDone, BurstHeader, ChunkFrames, Listen, decode_request

pytest.importorskip("gnuradio")

SILENCE_S = 2.0  # the BS's silence timeout here (30 s by default; > a loaded machine's modulation time, ~1 s)
AIR_DELAY_S = 4.5  # how long the air holds each burst's `done` beyond its arrival
HEARTBEAT_S = 0.1


class LaggingAir:
    """The air's request socket only: every burst is answered `done`, AIR_DELAY_S after its header arrived."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bursts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due: list[tuple[float, bytes, BurstDone]] = []
        while not self._stop.is_set():
            if self.sock.poll(20):
                identity, *frames = self.sock.recv_multipart()
                request = decode_request(frames)
                if isinstance(request, (Listen, ChunkFrames)):  # where it listens for the downlink; a burst's IQ
                    continue
                assert isinstance(request, BurstHeader)
                h = request
                self.bursts += 1
                done = BurstDone(device_id=h.device_id, round=h.round, burst_id=h.burst_id, medium_end=0, snr_db=30.0)
                due.append((time.monotonic() + AIR_DELAY_S, identity, done))
            for item in [d for d in due if d[0] <= time.monotonic()]:
                due.remove(item)
                self.sock.send_multipart([item[1], item[2].encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)


class Bs:
    """The BS's control plane (ZmqTransport, real sockets) served from a thread: it acks every burst_end with all
    its frames and records, at every poll, whether the transport would drop device 0 for silence."""

    def __init__(self, ctx: zmq.Context) -> None:
        from bs_node.live_view import LiveView
        from bs_node.transport import ZmqTransport
        from phy.uplink import RxFrame, UplinkReceiver

        class NoUplink(UplinkReceiver):
            address = "tcp://127.0.0.1:1"

            def recv(self, timeout_s: float) -> list[RxFrame]:
                return []

        welcome = {"experiment": {}, "bench": {}, "run_id": "keepalive", "data_address": "tcp://127.0.0.1:1"}
        self.transport = ZmqTransport(
            control_address="tcp://127.0.0.1:*",
            uplink=NoUplink(),
            device_count=1,
            welcome=welcome,
            view=LiveView(status_every_s=1e9),
            silence_timeout_s=SILENCE_S,
            context=ctx,
        )
        self.address = self.transport.control_endpoint
        self.silent_s: list[float] = []  # every time the BS would have dropped device 0: how long it was silent
        self.heartbeats: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from bs_node.rounds.ports import FromEdge
        from proto.control import Ack, BurstEnd, Heartbeat

        while not self._stop.is_set():
            for event in self.transport.poll(0.05):
                if isinstance(event, FromEdge) and isinstance(event.message, BurstEnd):
                    m = event.message
                    self.transport.send(0, Ack(round=m.round, attempt=m.attempt, received=list(range(m.total))))
                elif isinstance(event, FromEdge) and isinstance(event.message, Heartbeat):
                    self.heartbeats.append(time.monotonic())
            silent = self.transport.silent_for_s(0)
            if silent is not None:
                self.silent_s.append(silent)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.transport.close()


@pytest.fixture(scope="module")
def model() -> Iterator[tuple]:
    from bs_node.global_model import GlobalModel
    from config import load_bench, load_experiment
    from tests.processes import REPO

    exp = load_experiment(
        None,
        [
            "model.name_or_path=tiny",
            "task.test_size=50",
            "task.max_train=200",
            "devices.count=1",
            "training.local_steps=1",
            f"round.heartbeat_s={HEARTBEAT_S}",
        ],
    )
    bench = load_bench(REPO / "hw_configs" / "zmq_iq.yaml", ["security.mode=none"])
    yield exp, bench, GlobalModel(exp)


@pytest.mark.gnuradio
@pytest.mark.parametrize("keepalive", [True, False], ids=["heartbeats", "control-without"])
def test_an_edge_waiting_on_a_lagging_air_is_not_dropped_for_silence(model, keepalive):
    from edge_node.client import BsClient
    from edge_node.round import EdgeRounds
    from phy.channel import DeviceGeometry
    from phy.gr_zmq_iq_tx import ZmqIqTransmitter
    from proto.control import Plan

    exp, bench, bs_model = model
    ctx = zmq.Context()
    air, bs = LaggingAir(ctx), Bs(ctx)
    tx = ZmqIqTransmitter(air_address=air.address, geometry=DeviceGeometry(0, 10.0), context=ctx)
    if not keepalive:  # the transmitter as it was: nothing to call while it waits
        tx.set_keepalive = lambda keepalive, every_s: None  # type: ignore[method-assign]
    client = BsClient(bs.address, 0, context=ctx)
    try:
        assert client.register() is not None
        client.heartbeat("ready")
        rounds = EdgeRounds(exp, bench, 0, tx, link=client)
        plan = Plan(
            round=1,
            deadline_s=60.0,
            participate=True,
            rank=bs_model.max_rank,
            depth=bs_model.num_layers,
            tx_power_dbm=10.0,
            bandwidth_hz=250e3,
            modulation="qpsk",
            keep_fraction=1.0,
            local_steps=1,
        )
        t0 = time.monotonic()
        report = rounds.run(plan, bs_model.adapter_view(plan.rank, plan.depth, plan.round))
        took_s = time.monotonic() - t0
    finally:
        client.close()
        tx.close()
        bs.close()
        air.close()
        ctx.term()
    assert report is not None and report.status == "ok" and air.bursts == 1, report
    assert took_s > AIR_DELAY_S > 2 * SILENCE_S  # the edge really was held, for over twice the timeout
    if keepalive:
        assert bs.silent_s == [], f"the BS would have dropped the edge after {max(bs.silent_s):.1f} s of silence"
        gaps = [b - a for a, b in zip(bs.heartbeats, bs.heartbeats[1:])]
        assert max(gaps) < SILENCE_S, gaps
    else:
        assert max(bs.silent_s) > SILENCE_S  # held in send() without a word: dropped, as before the fix
