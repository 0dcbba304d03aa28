import random

import pytest
import zmq

from link.arq import AckTimers, send_with_arq
from phy.channel import ChannelConfig, DeviceGeometry, PerCurve, SimChannel, TxSetting
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from phy.uplink import TxReport, UplinkTransmitter
from proto.framing import Frame, FrameError, Reassembler, fragment

SETTING = TxSetting(tx_power_dbm=10.0, bandwidth_hz=1e6)
AIRTIME_PER_FRAME_S = 1.0


class FakeTx(UplinkTransmitter):
    """Loses frames by a rule; the 'receiver' is a set of delivered seqs."""

    def __init__(self, lose, *, knows_airtime=False):
        self.lose = lose  # (attempt, seq) -> bool
        self.knows_airtime = knows_airtime
        self.received: set[int] = set()
        self.sent: list[list[int]] = []
        self.snapshots: list[set[int]] = []  # received after each attempt

    def send(self, frames, setting, *, round_idx):
        attempt = len(self.sent) + 1
        assert attempt <= 100, "runaway ARQ loop"
        seqs = [Frame.from_bytes(f).seq for f in frames]
        self.sent.append(seqs)
        self.received |= {s for s in seqs if not self.lose(attempt, s)}
        self.snapshots.append(set(self.received))
        return TxReport(len(frames), sum(len(f) for f in frames), AIRTIME_PER_FRAME_S * len(frames))

    def estimate_airtime_s(self, frame_sizes, setting):
        return AIRTIME_PER_FRAME_S * len(frame_sizes) if self.knows_airtime else None

    def ack(self, attempt, seqs):
        assert attempt == len(self.sent)
        assert seqs == self.sent[-1]
        return set(self.received)


def make_frames(n=10, round_idx=5):
    return fragment(bytes(range(256)) * n, device_id=2, round_idx=round_idx, frame_payload_bytes=256)


def run(tx, frames=None, **kw):
    frames = frames if frames is not None else make_frames()
    args = dict(round_idx=5, request_ack=tx.ack, max_attempts=10, airtime_budget_s=None)
    args.update(kw)
    return send_with_arq(tx, frames, SETTING, **args)


def test_lossless_one_attempt():
    tx = FakeTx(lambda a, s: False)
    res = run(tx)
    assert (res.delivered, res.attempts, res.frames_sent, res.frames_lost) == (True, 1, 10, 0)
    assert res.airtime_s == 10 * AIRTIME_PER_FRAME_S
    assert res.bytes_sent == sum(len(f.to_bytes()) for f in make_frames())
    assert res.stop_reason == "delivered"


@pytest.mark.parametrize("seed", range(20))
def test_random_loss_delivered_selective_repeat(seed):
    rng = random.Random(seed)
    tx = FakeTx(lambda a, s: rng.random() < 0.4)
    res = run(tx, frames=make_frames(40), max_attempts=30)
    assert res.delivered and tx.received == set(range(40))
    assert res.attempts == len(tx.sent) <= 30
    assert res.frames_sent == sum(len(s) for s in tx.sent) == 40 + res.frames_lost
    # Selective repeat: each attempt resends exactly what was still missing.
    have: set[int] = set()
    for seqs, after in zip(tx.sent, tx.snapshots):
        assert seqs == [s for s in range(40) if s not in have]
        have = after


def test_max_attempts_respected():
    tx = FakeTx(lambda a, s: True)
    res = run(tx, max_attempts=3)
    assert (res.delivered, res.attempts, res.frames_sent, res.frames_lost) == (False, 3, 30, 30)
    assert len(tx.sent) == 3
    assert res.stop_reason == "max_attempts"


def test_last_attempt_can_succeed():
    tx = FakeTx(lambda a, s: a < 3)
    res = run(tx, max_attempts=3)
    assert res.delivered and res.attempts == 3


@pytest.mark.parametrize("knows_airtime", [False, True])
def test_airtime_budget_stops_before_overrun(knows_airtime):
    tx = FakeTx(lambda a, s: True, knows_airtime=knows_airtime)
    res = run(tx, airtime_budget_s=15.0)  # attempt 1 costs 10 s, a second full one would hit 20 s
    assert res.attempts == 1 and not res.delivered
    assert res.airtime_s <= 15.0
    assert res.stop_reason == "airtime_budget"


@pytest.mark.parametrize("knows_airtime", [False, True])
def test_airtime_budget_allows_what_fits(knows_airtime):
    # Attempt 1 loses the even seqs (5 frames); resending them costs 5 s: 15 s fits exactly.
    tx = FakeTx(lambda a, s: a == 1 and s % 2 == 0, knows_airtime=knows_airtime)
    res = run(tx, airtime_budget_s=15.0)
    assert res.delivered and res.attempts == 2 and res.airtime_s == 15.0
    tx = FakeTx(lambda a, s: a == 1 and s % 2 == 0, knows_airtime=knows_airtime)
    res = run(tx, airtime_budget_s=14.9)
    assert not res.delivered and res.attempts == 1


def test_first_attempt_always_sent_even_over_budget():
    tx = FakeTx(lambda a, s: False)
    res = run(tx, airtime_budget_s=1.0)
    assert res.delivered and res.attempts == 1


def test_stops_on_no_answer():
    tx = FakeTx(lambda a, s: s == 0)
    calls = []

    def no_answer(attempt, seqs):
        calls.append(attempt)
        return None

    res = run(tx, request_ack=no_answer)
    assert not res.delivered and res.attempts == 1 and calls == [1]
    assert res.frames_lost == 10  # nothing was acknowledged
    assert res.stop_reason == "no_ack"


def test_unknown_acked_seqs_ignored_and_empty_message():
    tx = FakeTx(lambda a, s: s == 3)
    res = run(tx, request_ack=lambda a, seqs: {0, 1, 2, 4, 5, 6, 7, 8, 9, 77} | ({3} if a > 1 else set()))
    assert res.delivered and res.attempts == 2 and res.frames_lost == 1
    empty = run(FakeTx(lambda a, s: True), frames=[])
    assert empty.delivered and empty.attempts == 0 and empty.frames_sent == 0


def test_argument_validation():
    tx = FakeTx(lambda a, s: False)
    with pytest.raises(ValueError):
        run(tx, max_attempts=0)
    with pytest.raises(ValueError):
        run(tx, airtime_budget_s=-1.0)
    with pytest.raises(ValueError, match="round_idx"):
        run(tx, round_idx=6)
    with pytest.raises(ValueError, match="duplicate"):
        frames = make_frames()
        run(tx, frames=frames + frames[:1])


def test_bs_answers_a_burst_once_complete_or_at_its_guard_interval():
    held: dict[tuple[int, int], set[int]] = {(1, 7): {0, 1}, (2, 7): {0}}
    received = lambda device, round_idx: set(held.get((device, round_idx), set()))  # noqa: E731
    timers = AckTimers(guard_s=0.2)
    assert timers.next_due_s() is None and timers.take_answerable(0.0, received) == []
    timers.burst_ended(1, 7, 1, [0, 1, 2], now_s=10.0)
    timers.burst_ended(2, 7, 1, [0, 1], now_s=10.05)
    assert len(timers) == 2 and timers.next_due_s() == pytest.approx(10.2)
    # nothing complete, nothing due: no answer yet, and no reason to drain the PHY
    assert timers.take_answerable(10.1, received) == [] and not timers.overdue_with_gaps(10.1, received)
    held[(1, 7)].add(2)  # device 1's last frame arrives before the guard: answered at once
    ((timer, have),) = timers.take_answerable(10.1, received)
    assert (timer.device_id, timer.attempt, have) == (1, 1, {0, 1, 2})
    # device 2's burst falls due with frame 1 missing: drain first, then answer with what is held
    assert timers.overdue_with_gaps(10.25, received)
    ((timer, have),) = timers.take_answerable(10.25, received)
    assert (timer.device_id, have) == (2, {0}) and len(timers) == 0


def test_bs_ack_timers_of_a_closed_round_are_dropped():
    timers = AckTimers(guard_s=1.0)
    timers.burst_ended(1, 3, 1, [0], now_s=0.0)
    timers.burst_ended(1, 4, 1, [0], now_s=0.0)
    timers.discard_round(3)
    assert [t.round_idx for t, _ in timers.take_answerable(5.0, lambda d, r: set())] == [4]
    with pytest.raises(ValueError, match="guard_s"):
        AckTimers(guard_s=-0.1)


@pytest.mark.integration
def test_arq_over_sim_link_end_to_end():
    """Mid-SNR sim link + BS-style reassembly: ARQ recovers the whole message."""
    ctx = zmq.Context()
    rx = SimUplinkReceiver(bind_address="tcp://127.0.0.1:*", context=ctx)
    channel = SimChannel(ChannelConfig(fading="none"), seed=9)
    tx = SimUplinkTransmitter(
        bs_data_address=rx.address,
        geometry=DeviceGeometry(device_id=4, distance_m=1.0),
        channel=channel,
        per_curve=PerCurve.default(),
        seed=9,
        context=ctx,
    )
    setting = TxSetting(tx_power_dbm=13.5 - 65.0, bandwidth_hz=1e6)  # 13.5 dB -> PER(1000 B) = 0.5
    message = random.Random(1).randbytes(60_000)
    frames = fragment(message, device_id=4, round_idx=2, frame_payload_bytes=980)
    reasm = Reassembler()

    def request_ack(attempt, seqs):
        for rxf in rx.drain_until_quiet(quiet_s=0.2, max_wait_s=10.0):
            try:
                reasm.add(Frame.from_bytes(rxf.data))
            except FrameError:
                pass
        return reasm.received_seqs(4, 2)

    try:
        res = send_with_arq(
            tx, frames, setting, round_idx=2, request_ack=request_ack, max_attempts=40, airtime_budget_s=None
        )
        assert res.delivered and res.attempts > 1
        assert res.frames_sent == len(frames) + res.frames_lost
        assert reasm.pop(4, 2) == message
    finally:
        ctx.destroy(linger=0)
