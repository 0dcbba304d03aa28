"""The pieces of checkpoint and resume without processes: every policy's state survives a checkpoint, the BS's
round logic goes on from one (in memory, fake clock), records are cut back to the checkpoint, a checkpoint of
another configuration is refused naming the keys, and an edge's error feedback rolls back a round a resumed BS
replays."""

from __future__ import annotations

import json
import typing

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bs_node.checkpoint import CheckpointError, differences, load, run_configuration
from bs_node.controllers import make_controller
from bs_node.measurements import RoundRecord
from bs_node.state_codec import decode, encode
from config import load_bench, load_experiment
from config.experiment import Policy
from fedlora.lora import ModuleSpec
from fedlora.sparsify import make_sparsifier
from proto.control import Plan
from tests.bs_fakes import make_station, sends_update
from tests.test_controllers import bench, row, state


@pytest.mark.parametrize("policy", typing.get_args(Policy))
def test_every_policy_decides_the_same_after_a_checkpoint(policy):
    b = bench()
    exp = load_experiment(None, [f"controller.policy={policy}"])
    ctrl = make_controller(exp, b)
    for r in (1, 2):
        ctrl.decide(state(b, r))
        rows = [row(k, snr_db=10.0 + 5 * k, energy=80.0 + k) for k in range(4)]
        ctrl.observe(RoundRecord(r, 0.6, 0.6, 1.0, policy, 0, rows))
    saved = _roundtrip(ctrl.state_dict())  # as the checkpoint file holds it: JSON and safetensors
    again = make_controller(exp, b)
    again.load_state_dict(saved)
    assert again.decide(state(b, 3)) == ctrl.decide(state(b, 3))
    assert json.dumps(again.explain(), sort_keys=True, default=str) == json.dumps(
        ctrl.explain(), sort_keys=True, default=str
    )


def _roundtrip(obj):
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(encode(obj, tensors), allow_nan=False))
    return decode(tree, load_tensors(save_tensors(tensors)))


def test_the_round_logic_goes_on_from_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["round.rounds=4", "devices.count=2", "round.stale_rounds=2"]
    bs = make_station(run_dir, overrides)
    t = bs.transport
    t.join(0, sends_update(t, 0, 0.01))
    t.join(1, sends_update(t, 1, 0.02))
    bs.runner._start()  # what run() does first: the accuracy before fine-tuning
    bs.runner.wait_for_devices()
    for r in (1, 2):
        bs.runner.run_round(r)
    adapter = {k: v.clone() for k, v in bs.model.adapter_state().items()}
    exp, bench_cfg = bs.runner.exp, bs.runner.bench
    checkpoint = load(run_dir, exp, bench_cfg)
    assert checkpoint.next_round == 3 and checkpoint.run_id == "test"
    # the record of round 3 was written, then the BS died before its checkpoint: round 3 runs again
    with (run_dir / "rounds.jsonl").open("a") as fh:
        fh.write(json.dumps({**json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[-1]), "round": 3}) + "\n")

    again = make_station(run_dir, overrides)
    again.runner.resume_from = checkpoint
    t2 = again.transport
    t2.join(0, sends_update(t2, 0, 0.01))
    t2.join(1, sends_update(t2, 1, 0.02))
    summary = again.runner.run()
    assert summary["resumed_at_round"] == 3 and summary["rounds"] == 4
    lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert len(again.runner.recorder.records) == 4
    assert again.runner.closer.rounds_participated == {0: 4, 1: 4}  # counted across the restart
    assert [p.round for p in again.transport.sent_to(0, Plan)] == [3, 4]
    assert not all(torch.equal(adapter[k], again.model.adapter_state()[k]) for k in adapter)  # it trained on
    assert summary["initial_accuracy"] == checkpoint.initial["accuracy"]


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    bs = make_station(run_dir, ["round.rounds=1", "devices.count=1"])
    bs.transport.join(0, sends_update(bs.transport, 0, 0.01))
    bs.runner.wait_for_devices()
    bs.runner.run_round(1)
    other = load_experiment(
        None,
        [
            *("model.name_or_path=tiny", "task.test_size=50", "task.max_train=400"),
            "devices.count=1",
            "round.rounds=3",
            "training.lr=0.01",
        ],
    )
    with pytest.raises(CheckpointError) as err:
        load(run_dir, other, bs.runner.bench)
    assert "experiment.round.rounds: 1 in the checkpoint, 3 now" in str(err.value)
    assert "experiment.training.lr" in str(err.value)
    moved = load_bench(None, ["addresses.control=tcp://10.0.0.1:9999", "security.keys_dir=/elsewhere"])
    assert load(run_dir, bs.runner.exp, moved).next_round == 2  # addresses and key folders may differ
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load(tmp_path / "nothing", bs.runner.exp, bs.runner.bench)
    (run_dir / "checkpoint.json").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load(run_dir, bs.runner.exp, bs.runner.bench)


def test_differences_name_dotted_keys():
    exp = load_experiment(None)
    config = run_configuration(exp, load_bench(None))
    assert differences(config, config) == []
    changed = run_configuration(load_experiment(None, ["seed=4"]), load_bench(None))
    assert differences(config, changed) == ["experiment.seed: 0 in the checkpoint, 4 now"]


def test_an_edge_rolls_back_what_it_sent_in_a_round_a_resumed_bs_replays():
    sp = make_sparsifier("topk", seed=0, device_id=0)
    spec = ModuleSpec(2, 1)
    key_a, key_b = (
        "bert.encoder.layer.0.attention.self.query.lora_A",
        "bert.encoder.layer.0.attention.self.query.lora_B",
    )
    delta = {key_a: torch.randn(2, 8), key_b: torch.randn(8, 2)}
    sp.sparsify(delta, delta, spec, 0.5, round_idx=3)
    state = sp.state_dict()
    restored = make_sparsifier("topk", seed=0, device_id=0)
    restored.load_state_dict(_roundtrip(state))
    assert restored.feedback.norm() == pytest.approx(sp.feedback.norm())
    assert set(restored.feedback.pending) == {3}
    assert restored.rollback(3) == [3]  # what EdgeRounds does: back to before round 3 (no residual then)
    assert not restored.feedback.pending and restored.feedback.norm() == 0.0
