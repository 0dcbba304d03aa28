"""BS rounds driven in-process with fabricated edges and uplink frames: what is complete is used, what is bad is
named, a device sitting out is averaged in with its latest update (or as a zero update)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bs_node.controllers import Controller, DevicePlan, RoundState
from bs_node.controllers.fixed import FixedController
from bs_node.rounds import FrameReceived
from proto.control import Ack, Measurements, Plan, ReportAck
from tests.bs_fakes import make_station, sends_update, update_frames


def test_round_uses_complete_updates_and_names_bad_ones(tmp_path):
    bs = make_station(tmp_path / "run")
    t = bs.transport
    corrupted: list[bytes] = []

    def device_0(plan: Plan, attachment: bytes | None) -> None:
        sends_update(t, 0, 0.01, measurements=Measurements(energy_j=5.0, frames_sent=3))(plan, attachment)
        frame = bytearray(update_frames(plan, attachment, 0, 0.01)[0])
        frame[30] ^= 0xFF
        corrupted.append(bytes(frame))
        t.deliver(FrameReceived(bytes(frame), 20.0), 1.5)  # a corrupted retransmission: the CRC catches it

    t.join(0, device_0)
    t.join(1, sends_update(t, 1, 0.01, report=None))  # complete, but the edge died before reporting
    t.join(2, sends_update(t, 2, 0.01, drop_last=True, report="undelivered", measurements=Measurements()))
    # a broken counter: more lost than sent (a NaN or a negative energy cannot even be built: see test_messages)
    negative = Measurements(energy_j=2.0, frames_sent=1, frames_lost=5)
    t.join(3, sends_update(t, 3, 0.01, wrong_shape=True, measurements=negative))  # not the module that was planned
    bs.runner.wait_for_devices()
    before = {k: v.clone() for k, v in bs.model.adapter.state.items()}

    record = bs.runner.run_round(1)

    assert corrupted and bs.runner.bad_frames == 1
    rows = {d.device_id: d for d in record.devices}
    assert rows[0].status == "ok" and rows[0].energy_j == 5.0 and rows[0].snr_db == pytest.approx(20.0)
    assert rows[1].status == "ok" and "no report" in rows[1].error
    assert rows[2].status == "undelivered" and rows[2].frames_received == rows[0].frames_received - 1
    assert rows[3].status == "bad_update" and "does not match the expected" in rows[3].error
    assert rows[3].frames_lost == 0 and rows[3].energy_j == 2.0  # the impossible count refused, the rest kept
    assert record.wall_s == pytest.approx(bs.runner.exp.round.deadline_s)  # device 1 never reported
    # every burst was answered with what the BS holds, every report acknowledged
    for k in range(4):
        (ack,) = bs.transport.sent_to(k, Ack)
        assert isinstance(ack, Ack) and (ack.round, ack.attempt) == (1, 1)
        assert len(ack.received) == rows[k].frames_received
    assert [len(t.sent_to(k, ReportAck)) for k in range(4)] == [1, 0, 1, 1]
    # devices 0 and 1 sent the same delta; 2 and 3 were planned but sent nothing usable, so they count as zero
    # updates (the eligibility rule, docs/aggregation.md): the step is that delta scaled by the share of the weight
    # that arrived
    w = {k: float(bs.model.examples(k)) for k in range(4)}
    share = (w[0] + w[1]) / sum(w.values())
    assert 0 < share < 1
    for key, value in bs.model.adapter.state.items():
        torch.testing.assert_close(value, before[key] + 0.01 * share)
    (line,) = (bs.run_dir / "rounds.jsonl").read_text().splitlines()
    assert [d["status"] for d in json.loads(line)["devices"]] == ["ok", "ok", "undelivered", "bad_update"]


def test_frames_for_another_round_or_device_are_ignored(tmp_path):
    bs = make_station(tmp_path / "run", ["devices.count=1"])
    t = bs.transport

    def stale_and_foreign(plan: Plan, attachment: bytes | None) -> None:
        for data in update_frames(plan.model_copy(update={"round": plan.round - 1}), attachment, 0, 0.01):
            t.deliver(FrameReceived(data, 10.0), 1.0)  # a stale round
        for data in update_frames(plan, attachment, 3, 0.01):
            t.deliver(FrameReceived(data, 10.0), 1.0)  # a device not in this round

    t.join(0, stale_and_foreign)
    bs.runner.wait_for_devices()
    before = {k: v.clone() for k, v in bs.model.adapter.state.items()}
    record = bs.runner.run_round(2)
    (row,) = record.devices
    assert (row.status, row.frames_received, row.snr_db) == ("timeout", 0, None)
    assert bs.runner.bad_frames == 0  # well-formed, just not expected: ignored, not counted as bad
    for key, value in bs.model.adapter.state.items():
        torch.testing.assert_close(value, before[key])


class TakeTurns(Controller):
    """The fixed policy, but device 1 sits rounds 2 and 3 out."""

    name = "take_turns"

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        plans = FixedController(self.experiment, self.bench).decide(state)
        return {d: dataclasses.replace(p, participate=d != 1 or state.round_idx == 1) for d, p in plans.items()}


@pytest.mark.parametrize("stale_rounds", [0, 1])
def test_a_device_sitting_out_is_averaged_in_with_its_latest_update_for_stale_rounds(tmp_path, stale_rounds):
    bs = make_station(tmp_path / "run", ["devices.count=2", f"round.stale_rounds={stale_rounds}"], controller=TakeTurns)
    t = bs.transport
    t.join(0, sends_update(t, 0, {1: 0.01, 2: 0.02, 3: 0.02}))
    t.join(1, sends_update(t, 1, {1: 0.03}))
    bs.runner.wait_for_devices()
    w = {k: float(bs.model.examples(k)) for k in range(2)}
    key = next(iter(bs.model.adapter.state))

    def round_(r: int):
        before = bs.model.adapter.state[key].clone()
        record = bs.runner.run_round(r)
        return float((bs.model.adapter.state[key] - before).flatten()[0]), record

    step, _ = round_(1)
    assert step == pytest.approx((w[0] * 0.01 + w[1] * 0.03) / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    step, record = round_(2)  # device 1 sits round 2 out
    assert record.devices[1].status == "not_selected" and not record.devices[1].participated
    if stale_rounds:  # its round-1 update counts again
        assert record.stale_updates == {1: 1}
        assert step == pytest.approx((w[0] * 0.02 + w[1] * 0.03) / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    else:  # it counts as a zero update
        assert record.stale_updates == {}
        assert step == pytest.approx(w[0] * 0.02 / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    step, record = round_(3)  # two rounds old: too stale for stale_rounds = 1
    assert record.stale_updates == {}
    assert step == pytest.approx(w[0] * 0.02 / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    assert record.wall_s < 3  # both participants settled: the round closed without waiting for its deadline
    # a device sitting out gets its plan, without an adapter view
    sit_out = [(m, a) for d, m, a in t.sent if d == 1 and isinstance(m, Plan) and not m.participate]
    assert len(sit_out) == 2 and all(a is None for _, a in sit_out)
