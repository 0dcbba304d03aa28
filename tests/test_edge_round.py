"""The edge's round without sockets (tiny model): a plan becomes training, frames sent with ARQ, and a typed report
whose update the BS can decode; a bad plan becomes a failed report, never a crash."""

from __future__ import annotations

import pytest
import torch

from bs_node.global_model import GlobalModel
from config import load_bench, load_experiment
from edge_node.round import EdgeRounds
from fedlora.partition import device_splits
from fedlora.training import train_local
from phy.uplink import TxReport, UplinkTransmitter
from proto.control import AGGREGATED_WINDOW_ROUNDS, Plan
from proto.framing import Frame, Reassembler

TINY = ["model.name_or_path=tiny", "task.test_size=50", "task.max_train=400", "devices.count=2"]


class RecordingTx(UplinkTransmitter):
    """Every frame arrives; 1 ms of airtime per frame."""

    def __init__(self):
        self.frames: list[bytes] = []
        self.last_true_snr_db = 12.5

    def send(self, frames, setting, *, round_idx):
        self.frames.extend(frames)
        return TxReport(len(frames), sum(len(f) for f in frames), 1e-3 * len(frames))


class RecordingLink:
    def __init__(self):
        self.heartbeats: list[tuple[str, int | None]] = []
        self.bursts: list[tuple[int, int, list[int], int]] = []

    def heartbeat(self, state, *, round_idx=None, step=None, steps=None, loss=None):
        self.heartbeats.append((state, round_idx))

    def request_ack(self, round_idx, attempt, seqs, total, timeout_s):
        self.bursts.append((round_idx, attempt, list(seqs), total))
        return set(range(total))


@pytest.fixture(scope="module")
def setup():
    exp = load_experiment(None, [*TINY, "training.local_steps=2", "round.heartbeat_s=0.001"])
    bench = load_bench()
    bs = GlobalModel(exp)
    return exp, bench, bs


def plan(bs: GlobalModel, **change) -> Plan:
    fields = dict(
        round=1,
        deadline_s=60.0,
        participate=True,
        rank=bs.max_rank,
        depth=bs.num_layers,
        tx_power_dbm=10.0,
        bandwidth_hz=2.5e5,
        modulation="qpsk",
        keep_fraction=1.0,
        local_steps=2,
    )
    return Plan(**{**fields, **change})


def test_a_planned_round_is_trained_sent_and_reported(setup):
    exp, bench, bs = setup
    tx, link = RecordingTx(), RecordingLink()
    rounds = EdgeRounds(exp, bench, 1, tx, link=link)
    p = plan(bs)
    report = rounds.run(p, bs.adapter_view(p.rank, p.depth, p.round))

    assert report is not None and (report.device_id, report.round, report.status, report.error) == (1, 1, "ok", None)
    m = report.measurements
    assert m.frames_sent == len(tx.frames) and m.arq_attempts == 1 and m.frames_lost == 0
    assert m.airtime_s == pytest.approx(1e-3 * len(tx.frames)) and m.true_snr_db == 12.5
    assert m.energy_j == pytest.approx(m.compute_energy_j + m.transmit_energy_j) and m.train_examples > 0
    assert link.bursts == [(1, 1, list(range(len(tx.frames))), len(tx.frames))]
    assert ("sending", 1) in link.heartbeats and ("training", 1) in link.heartbeats
    reassembler = Reassembler()
    for data in tx.frames:
        reassembler.add(Frame.from_bytes(data))
    payload = reassembler.pop(1, 1)
    assert len(payload) == m.update_bytes
    update = bs.decode_update(payload, rank=p.rank, depth=p.depth, round_idx=1, device_id=1)  # what the BS does
    assert update.weight == bs.examples(1)


def test_the_edge_trains_only_on_its_training_part_and_the_bs_weights_and_validates_by_the_same_split(
    setup, monkeypatch
):
    exp, bench, bs = setup
    assert exp.devices.validation_fraction > 0  # the default holds data out
    splits = device_splits([ex.label for ex in bs.task.train], exp.devices, exp.seed)
    trained_on: list = []

    def recording_train_local(model, tokenizer, examples, cfg, **kwargs):
        trained_on.extend(examples)
        return train_local(model, tokenizer, examples, cfg, **kwargs)

    monkeypatch.setattr("edge_node.round.train_local", recording_train_local)
    held_out_everywhere = {bs.task.train[i] for split in splits for i in split.validation}
    for device_id, split in enumerate(splits):
        rounds = EdgeRounds(exp, bench, device_id, RecordingTx(), link=RecordingLink())
        held_out = {bs.task.train[i] for i in split.validation}
        assert held_out and rounds.examples == [bs.task.train[i] for i in split.train]  # the edge's own split
        assert bs.examples(device_id) == len(rounds.examples) == len(split.train)  # the BS's update weight
        assert not held_out & set(rounds.examples)
        trained_on.clear()
        report = rounds.run(plan(bs), bs.adapter_view(bs.max_rank, bs.num_layers, 1))
        assert report is not None and report.status == "ok" and trained_on
        assert not held_out_everywhere & set(trained_on)  # no held-out example was ever trained on
    union = sorted(i for split in splits for i in split.validation)  # 40 examples: under the max_validation cap
    assert bs.validation == [bs.task.train[i] for i in union]  # the BS validates on the held-out parts' union


def test_bad_plans_are_reported_as_failed_and_sitting_out_sends_nothing(setup):
    exp, bench, bs = setup
    tx, link = RecordingTx(), RecordingLink()
    rounds = EdgeRounds(exp, bench, 0, tx, link=link)
    report = rounds.run(plan(bs), None)
    assert report is not None and report.status == "failed"
    assert report.error == "ValueError: plan carries no global adapter view"
    assert report.measurements.energy_j is None
    wrong = rounds.run(plan(bs, rank=1), bs.adapter_view(bs.max_rank, bs.num_layers, 1))
    assert wrong is not None and wrong.status == "failed" and "adapter view is for module" in wrong.error
    assert rounds.run(plan(bs, participate=False), None) is None
    assert link.heartbeats[-1] == ("idle", 1) and tx.frames == []


def test_a_stop_request_ends_the_round_without_a_report(setup):
    exp, bench, bs = setup
    rounds = EdgeRounds(exp, bench, 0, RecordingTx(), link=RecordingLink(), stopping=lambda: True)
    assert rounds.run(plan(bs), bs.adapter_view(bs.max_rank, bs.num_layers, 1)) is None


def test_the_edge_round_imports_no_sockets():
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "edge_node" / "round.py"
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any(str(m).split(".")[0] == "zmq" for m in imported), imported


def test_every_plan_settles_what_the_edge_sent_before(setup):
    """Error feedback on the edge: a plan that does not list a round folds its update back, a plan without a
    verdict keeps it pending, and an update older than the plan's window counts as delivered."""
    exp, bench, bs = setup
    rounds = EdgeRounds(exp, bench, 0, RecordingTx(), link=RecordingLink())
    fb = rounds.sparsifier.feedback
    view = bs.adapter_view(bs.max_rank, bs.num_layers, 1)
    rounds.run(plan(bs, round=1), view)
    sent = {k: v.clone() for k, v in fb.pending[1].items()}
    assert fb.norm() == 0  # dense: nothing withheld
    assert rounds.run(plan(bs, round=2, participate=False), None) is None and list(fb.pending) == [1]  # no verdict
    assert rounds.run(plan(bs, round=3, participate=False, aggregated_rounds=[]), None) is None  # sitting out too
    assert not fb.pending and all(torch.equal(fb.take(k, v), v) for k, v in sent.items())  # folded back, whole

    rounds.run(plan(bs, round=4), view)  # carries round 1's update; round 4's own is held
    assert list(fb.pending) == [4] and fb.norm() == 0
    rounds.run(plan(bs, round=5, participate=False, aggregated_rounds=[4]), None)
    assert not fb.pending and fb.norm() == 0  # aggregated: dropped, never sent again

    rounds.run(plan(bs, round=6), view)
    rounds.run(plan(bs, round=6 + AGGREGATED_WINDOW_ROUNDS + 1, participate=False, aggregated_rounds=[]), None)
    assert not fb.pending and fb.norm() == 0  # out of the window: nobody can say, counted as delivered
