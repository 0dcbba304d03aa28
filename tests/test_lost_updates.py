"""Error feedback that loses nothing, through the real edge round and the BS's round logic (in-memory transport,
fake clock, tiny model): an update the BS closed its round without goes out with the device's next one, one it
aggregated is never sent again. Each plan is also run by a twin edge that never hears a verdict: what the device
would have sent without the fix."""

from __future__ import annotations

import json

import pytest
import torch

from bs_node.rounds import FrameReceived, FromEdge
from edge_node.round import EdgeRounds
from fedlora.lora import AdapterState
from phy.uplink import TxReport, UplinkTransmitter
from proto.codec import decode_update
from proto.control import AGGREGATED_WINDOW_ROUNDS, MessageError, Plan, decode_control, encode
from proto.framing import Frame, Reassembler
from tests.bs_fakes import MemoryTransport, frame_key_of, make_station, sends_update
from trust.sealing import FrameGate, FrameSealer

LOST_ROUND = 1  # device 0's frames never reach the BS in this round


class AirTx(UplinkTransmitter):
    """Frames reach the BS a second later, except in the lost round; every frame sent is kept per round."""

    def __init__(self, transport: MemoryTransport | None):
        self.transport = transport
        self.sent: dict[int, list[bytes]] = {}

    def send(self, frames, setting, *, round_idx):
        self.sent.setdefault(round_idx, []).extend(frames)
        if self.transport is not None and round_idx != LOST_ROUND:
            for data in frames:
                self.transport.deliver(FrameReceived(data, 20.0), 1.0)
        return TxReport(len(frames), sum(len(f) for f in frames), 1e-3 * len(frames))


class AckLink:
    """The BS's acks as the edge would get them: nothing of the lost round, everything otherwise."""

    def __init__(self, lossy: bool):
        self.lossy = lossy

    def heartbeat(self, state, *, round_idx=None, step=None, steps=None, loss=None):
        pass

    def request_ack(self, round_idx, attempt, seqs, total, timeout_s):
        return set() if self.lossy and round_idx == LOST_ROUND else set(range(total))


def what_went(edge: EdgeRounds, round_idx: int) -> tuple[AdapterState, AdapterState]:
    """(what the edge sent in round_idx, its residual after it), both in the view's shapes."""
    fb = edge.sparsifier.feedback
    sent = {k: v.clone() for k, v in fb.pending[round_idx].items()}
    return sent, {k: fb.take(k, v) for k, v in sent.items()}


DENSE, TOPK = ["codec.sparsifier=dense"], ["codec.sparsifier=topk", "controller.keep_fraction=0.5"]


@pytest.mark.parametrize("codec", [DENSE, TOPK], ids=["dense", "topk"])
def test_a_lost_update_goes_out_with_the_next_one_and_an_aggregated_one_never_again(tmp_path, codec):
    bs = make_station(tmp_path / "run", ["devices.count=2", "training.local_steps=2", *codec])
    t = bs.transport
    exp, bench = bs.runner.exp, bs.runner.bench
    tx, twin_tx = AirTx(t), AirTx(None)
    edge = EdgeRounds(exp, bench, 0, tx, link=AckLink(lossy=True))
    edge.encode = FrameSealer(frame_key_of(0), 0).seal  # as the node sets it from its registration
    twin = EdgeRounds(exp, bench, 0, twin_tx, link=AckLink(lossy=False))  # never told anything: today's edge
    went: dict[int, tuple[AdapterState, AdapterState]] = {}
    twin_went: dict[int, tuple[AdapterState, AdapterState]] = {}

    def device_0(plan: Plan, attachment: bytes | None) -> None:
        report = edge.run(plan, attachment)
        twin.run(plan.model_copy(update={"aggregated_rounds": None}), attachment)
        went[plan.round], twin_went[plan.round] = what_went(edge, plan.round), what_went(twin, plan.round)
        assert report is not None
        t.deliver(FromEdge(0, report), 2.0)

    t.join(0, device_0)
    t.join(1, sends_update(t, 1, 0.001))
    bs.runner.wait_for_devices()
    records = [bs.runner.run_round(r) for r in (1, 2, 3)]
    assert [r.devices[0].status for r in records] == ["undelivered", "ok", "ok"]
    assert [p.aggregated_rounds for p in t.sent_to(0, Plan)] == [[], [], [2]]

    # round 1: both edges trained and sent the same (same view, same seeds); the BS never got it
    sent1 = went[1][0]
    assert all(torch.equal(sent1[k], v) for k, v in twin_went[1][0].items())
    assert any(bool(v.any()) for v in sent1.values())

    # round 2: the plan said round 1 was not aggregated; everything the twin had, plus what round 1 sent
    (sent2, res2), (twin_sent2, twin_res2) = went[2], twin_went[2]
    for k in sent2:
        torch.testing.assert_close(sent2[k] + res2[k], twin_sent2[k] + twin_res2[k] + sent1[k], rtol=0, atol=1e-6)
    if codec == DENSE:  # nothing withheld: the lost update rides whole on the next one
        for k in sent2:
            torch.testing.assert_close(sent2[k], twin_sent2[k] + sent1[k], rtol=0, atol=1e-6)
    on_air, gate = Reassembler(), FrameGate(sealed=True)  # and it is what the BS aggregated
    gate.admit(0, frame_key_of(0))
    for data in tx.sent[2]:
        on_air.add(gate.open(Frame.from_bytes(data)))
    received = decode_update(on_air.pop(0, 2)).state
    for k in sent2:
        torch.testing.assert_close(received[k], sent2[k], rtol=2e-3, atol=1e-5)  # fp16 on the air

    # round 3: round 2 was aggregated, so it is dropped, not sent again; the edge differs from the twin only by
    # the residuals they carried into the round
    (sent3, res3), (twin_sent3, twin_res3) = went[3], twin_went[3]
    assert sorted(edge.sparsifier.feedback.pending) == [3] and edge.sparsifier.feedback.norm() == pytest.approx(
        sum(float(v.double().pow(2).sum()) for v in res3.values()) ** 0.5, rel=1e-6
    )
    for k in sent3:
        torch.testing.assert_close(
            sent3[k] + res3[k] - twin_sent3[k] - twin_res3[k], res2[k] - twin_res2[k], rtol=0, atol=1e-6
        )
    if codec == DENSE:
        assert all(torch.equal(sent3[k], v) for k, v in twin_sent3.items())
    lines = [json.loads(line) for line in (bs.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [line["devices"][0]["status"] for line in lines] == ["undelivered", "ok", "ok"]


def test_plans_carry_the_verdict_strictly():
    base = dict(
        round=20,
        deadline_s=60.0,
        participate=False,
        rank=2,
        depth=1,
        tx_power_dbm=10.0,
        bandwidth_hz=2.5e5,
        modulation="qpsk",
        keep_fraction=1.0,
        local_steps=2,
    )
    plan = Plan(**base, aggregated_rounds=[4, 19])
    assert decode_control(encode(plan)) == plan
    assert Plan(**base).aggregated_rounds is None  # absent: no verdict
    wire = json.loads(encode(plan))
    for bad, says in [
        ([20], "plan.aggregated_rounds: Value error, rounds [20] are not in [round - 16, round) = [4, 20)"),
        ([3, 5], "rounds [3] are not in"),
        ([True], "plan.aggregated_rounds.0: Input should be a valid integer"),
        (["5"], "plan.aggregated_rounds.0: Input should be a valid integer"),
        ([-1], "plan.aggregated_rounds.0: Input should be greater than or equal to 0"),
        (list(range(4, 21)), f"at most {AGGREGATED_WINDOW_ROUNDS} items"),
        (5, "plan.aggregated_rounds: Input should be a valid list"),
    ]:
        with pytest.raises(MessageError, match=None) as err:
            decode_control(json.dumps({**wire, "aggregated_rounds": bad}).encode())
        assert says in str(err.value), (bad, str(err.value))
