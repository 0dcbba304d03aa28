"""One BS round driven in-process with fabricated uplink frames: what is complete is used, what is bad is named."""
from __future__ import annotations

import io

import pytest
import torch

from bs_node.controllers import DevicePlan
from bs_node.live_view import LiveView
from bs_node.server import BaseStation, Edge, Pending
from fedlora.codec import encode_update
from fedlora.config import load_bench, load_experiment
from fedlora.lora import ModuleSpec
from phy.framing import fragment


@pytest.fixture
def bs(tmp_path):
    exp = load_experiment(None, ["model.name_or_path=tiny", "task.test_size=50", "task.max_train=400",
                                 "devices.count=4"])
    station = BaseStation(exp, load_bench(), tmp_path / "run", control_address="tcp://127.0.0.1:0",
                          data_address="tcp://127.0.0.1:0", view=LiveView(io.StringIO()), threads=1)
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
    # devices 0 and 1 sent the same delta: whatever their weights, the aggregate is that delta
    for key, value in bs.global_adapter.state.items():
        torch.testing.assert_close(value, before[key] + 0.01)
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
