"""One BS round driven in-process with fabricated uplink frames: what is complete is used, what is bad is named."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from bs_node.controllers import DevicePlan
from bs_node.live_view import LiveView
from bs_node.server import BaseStation, Edge, Pending
from config import load_bench, load_experiment
from fedlora.lora import ModuleSpec
from proto.codec import encode_update
from proto.framing import fragment


@pytest.fixture
def bs(tmp_path):
    exp = load_experiment(
        None, ["model.name_or_path=tiny", "task.test_size=50", "task.max_train=400", "devices.count=4"]
    )
    station = BaseStation(
        exp,
        load_bench(),
        tmp_path / "run",
        control_address="tcp://127.0.0.1:0",
        data_address="tcp://127.0.0.1:0",
        view=LiveView(io.StringIO()),
        threads=1,
    )
    station._prepare_model()
    yield station
    station.uplink.close()
    station.control.close(0)


def plan(device_id: int, spec: ModuleSpec) -> DevicePlan:
    return DevicePlan(device_id, True, spec.rank, spec.depth, 10.0, 2.5e5, "qpsk", 1.0, 5)


def test_round_uses_complete_updates_and_names_bad_ones(bs):
    r = 1
    bs.round_idx = r
    spec = ModuleSpec(bs.global_adapter.max_rank, bs.num_layers)
    view = bs.global_adapter.view(spec)
    plans = {k: plan(k, spec) for k in range(4)}
    for k in range(4):
        bs.edges[k] = Edge(k, f"edge-{k}".encode(), "h", k, state="idle")
        bs.pending[k] = Pending(plans[k])
    delta = {key: torch.full_like(v, 0.01) for key, v in view.items()}

    def send(device_id: int, state, *, drop_last: bool = False) -> list[bytes]:
        frames = fragment(encode_update(state, spec=spec, round_idx=r, device_id=device_id), device_id, r, 500)
        sent = [f.to_bytes() for f in (frames[:-1] if drop_last else frames)]
        for data in sent:
            bs._on_frame(data, 20.0 + device_id)
        return sent

    first = send(0, delta)[0]  # complete, report comes
    bs.pending[0].report = {"status": "ok", "measurements": {"energy_j": 5.0, "frames_sent": 3}, "error": None}
    send(1, delta)  # complete, but the edge died before reporting
    send(2, delta, drop_last=True)  # one frame never arrived
    bs.pending[2].report = {"status": "undelivered", "measurements": {}, "error": None}
    wrong = {key: v[..., :1] if key.endswith("lora_B") else v for key, v in delta.items()}
    send(3, wrong)  # decodes, but is not the module that was planned
    bs.pending[3].report = {"status": "ok", "measurements": {"energy_j": float("nan")}, "error": None}
    corrupted = bytearray(first)
    corrupted[30] ^= 0xFF
    bs._on_frame(bytes(corrupted), 20.0)  # a corrupted retransmission: the CRC catches it; counted and ignored
    assert bs.bad_frames == 1

    before = {k: v.clone() for k, v in bs.global_adapter.state.items()}
    record = bs._close_round(r, plans, downlink_bytes=0, t0=0.0)
    rows = {d.device_id: d for d in record.devices}
    assert rows[0].status == "ok" and rows[0].energy_j == 5.0 and rows[0].snr_db == pytest.approx(20.0)
    assert rows[1].status == "ok" and "no report" in rows[1].error
    assert rows[2].status == "undelivered"
    assert rows[3].status == "bad_update" and "does not match the expected" in rows[3].error
    assert rows[3].energy_j == 0.0  # the NaN measurement was refused
    # devices 0 and 1 sent the same delta; 2 and 3 were planned but sent nothing usable, so they count as zero
    # updates (round.absent_as_zero): the step is that delta scaled by the share of the weight that arrived
    w = {k: float(bs.device_examples[k]) for k in range(4)}
    share = (w[0] + w[1]) / sum(w.values())
    assert 0 < share < 1
    for key, value in bs.global_adapter.state.items():
        torch.testing.assert_close(value, before[key] + 0.01 * share)
    assert (bs.recorder.run_dir / "rounds.jsonl").read_text().count("\n") == 1


def test_frames_for_another_round_or_device_are_ignored(bs):
    bs.round_idx = 2
    spec = ModuleSpec(1, 1)
    bs.pending[0] = Pending(plan(0, spec))
    view = bs.global_adapter.view(spec)
    for frame in fragment(encode_update(view, spec=spec, round_idx=1, device_id=0), 0, 1, 500):
        bs._on_frame(frame.to_bytes(), 10.0)  # stale round
    for frame in fragment(encode_update(view, spec=spec, round_idx=2, device_id=3), 3, 2, 500):
        bs._on_frame(frame.to_bytes(), 10.0)  # device not in this round
    assert not bs.reassembler.received_seqs(0, 1) and not bs.reassembler.received_seqs(3, 2)
    assert bs.pending[0].snr_db == []


@pytest.mark.parametrize("stale_rounds", [0, 1])
def test_a_device_sitting_out_is_averaged_in_with_its_latest_update_for_stale_rounds(bs, stale_rounds):
    bs.exp = dataclasses.replace(bs.exp, round=dataclasses.replace(bs.exp.round, stale_rounds=stale_rounds))
    spec = ModuleSpec(bs.global_adapter.max_rank, bs.num_layers)
    for k in range(2):
        bs.edges[k] = Edge(k, f"edge-{k}".encode(), "h", k, state="idle")
    w = {k: float(bs.device_examples[k]) for k in range(2)}

    def round_(r: int, deltas: dict[int, float]):
        bs.round_idx, bs.pending = r, {}
        plans = {
            k: plan(k, spec) if k in deltas else dataclasses.replace(plan(k, spec), participate=False) for k in range(2)
        }
        view = bs.global_adapter.view(spec)
        for k, value in deltas.items():
            bs.pending[k] = Pending(plans[k])
            state = {key: torch.full_like(v, value) for key, v in view.items()}
            for f in fragment(encode_update(state, spec=spec, round_idx=r, device_id=k), k, r, 500):
                bs._on_frame(f.to_bytes(), 20.0)
            bs.pending[k].report = {"status": "ok", "measurements": {"energy_j": 1.0}, "error": None}
        before = {key: v.clone() for key, v in bs.global_adapter.state.items()}
        record = bs._close_round(r, plans, downlink_bytes=0, t0=0.0)
        key = next(iter(before))
        return float((bs.global_adapter.state[key] - before[key]).flatten()[0]), record

    step, _ = round_(1, {0: 0.01, 1: 0.03})
    assert step == pytest.approx((w[0] * 0.01 + w[1] * 0.03) / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    step, record = round_(2, {0: 0.02})  # device 1 sits round 2 out
    if stale_rounds:  # its round-1 update counts again
        assert record.stale_updates == {1: 1}
        assert step == pytest.approx((w[0] * 0.02 + w[1] * 0.03) / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    else:  # it counts as a zero update
        assert record.stale_updates == {}
        assert step == pytest.approx(w[0] * 0.02 / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
    step, record = round_(3, {0: 0.02})  # two rounds old: too stale for stale_rounds = 1
    assert record.stale_updates == {}
    assert step == pytest.approx(w[0] * 0.02 / (w[0] + w[1]), rel=1e-3)  # fp16 uplink
