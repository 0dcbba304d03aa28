"""The real pretrained MiniLM on the real embedded Rotten Tomatoes data, through real BS and edge processes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.processes import Procs, read_rounds

pytestmark = pytest.mark.integration


def test_one_round_of_real_federated_lora(tmp_path):
    procs = Procs(tmp_path)
    run_dir = tmp_path / "run"
    try:
        bs, ep = procs.bs(
            run_dir,
            "--set",
            "model.name_or_path=embedded",
            "--set",
            "devices.count=2",
            "--set",
            "round.rounds=1",
            "--set",
            "training.local_steps=30",
            "--set",
            "training.batch_size=16",
            "--set",
            "task.test_size=300",
            "--set",
            "task.max_train=null",
            "--set",
            "task.max_validation=100",
            "--set",
            "training.lr=0.005",
        )
        for k in range(2):
            procs.edge(ep["control"], k)
        assert bs.wait(timeout=600) == 0, procs.output("bs")
    finally:
        procs.cleanup()
    (record,) = read_rounds(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [d["status"] for d in record["devices"]] == ["ok", "ok"]
    for d in record["devices"]:
        # rank 8 on query/value of 6 layers = 73,728 LoRA values + the 770-value head, fp16 on the air
        assert d["update_bytes"] > 2 * (73_728 + 770)
        assert d["depth"] == 6 and d["compute_s"] > 0
    adapter = torch.load(run_dir / "adapter.pt")
    assert adapter["bert.encoder.layer.5.attention.self.value.lora_B"].shape == (384, 8)
    assert adapter["bert.encoder.layer.5.attention.self.value.lora_B"].abs().sum() > 0
    # 60 real steps of LoRA fine-tuning move a balanced held-out set off chance
    assert summary["initial_accuracy"] < 0.6
    assert record["accuracy"] > summary["initial_accuracy"] + 0.05, (summary["initial_accuracy"], record["accuracy"])
