"""benchmarks/sparsify_accuracy.py --quick end to end: the table is complete and SOFT's bytes are what the
component codec promises (behaviour only: a tiny random BERT for 2 rounds says nothing about accuracy).

Runs in-process (the script's `main`), so the suite does not pay a second interpreter's torch/peft imports."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "dense_fp32",
    "dense_fp16",
    "soft@0.125",
    "soft@0.25",
    "topk@0.125",
    "topk@0.25",
    "randomk@0.125",
    "randomk@0.25",
    "b_only",
]


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("sparsify_accuracy", ROOT / "benchmarks" / "sparsify_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sparsify_accuracy_quick_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "quick.json"
    threads = torch.get_num_threads()
    try:
        load_script(monkeypatch).main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert "round 2/2 device 6/6" in printed.err  # progress was shown

    lines = printed.out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 2 + len(METHODS)]}
    assert list(rows) == METHODS
    for cells in rows.values():
        assert len(cells) == 7 + 3  # 7 columns + accuracy after rounds 0, 1, 2
        assert all(0.0 <= float(a) <= 1.0 for a in cells[7:])
    assert float(rows["dense_fp32"][4]) == 1.0  # the reference's ratio

    results = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == METHODS
    dense32, dense16 = results["dense_fp32"]["update_bytes"], results["dense_fp16"]["update_bytes"]
    assert results["soft@0.125"]["update_bytes"] < dense32 / 8
    assert results["soft@0.125"]["update_bytes"] < results["soft@0.25"]["update_bytes"] < dense16
    assert results["b_only"]["update_bytes"] < 0.6 * dense16  # A's zeros travel as shapes only
    for r in results.values():
        assert len(r["accuracy"]) == 3 and r["air_bytes"] > r["update_bytes"]
    assert results["soft@0.125"]["kept_fraction"] == 0.125


def test_phy_calibration_quick_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """benchmarks/phy_calibration.py --quick through the real OFDM loopback: both tables, the file, progress."""
    import pytest

    pytest.importorskip("gnuradio")
    spec = importlib.util.spec_from_file_location("phy_calibration", ROOT / "benchmarks" / "phy_calibration.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path / "phy.json"
    module.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr()
    assert "[ 12/12" in printed.err  # progress: 3 modulations x (3 waterfall SNRs + 30 dB)
    assert "(a) PER" in printed.out and "(b) SNR estimate error" in printed.out and "summary" in printed.out
    doc = json.loads(out.read_text())
    points = doc["points"]
    assert [p["modulation"] for p in points] == ["bpsk"] * 4 + ["qpsk"] * 4 + ["8psk"] * 4
    assert all(p["sent"] == 20 and p["frame_bytes"] == 1000 and 0.0 <= p["per_gr"] <= 1.0 for p in points)
    sims = [round(p["per_sim"], 6) for p in points if p["snr_db"] != 30.0]
    assert sims == [0.8, 0.5, 0.15] * 3  # the waterfall SNRs come from the curve file
    for p in points[3::4]:  # 30 dB: every packet through, the estimate close to the configured SNR
        assert p["snr_db"] == 30.0 and p["per_gr"] == 0.0 and p["per_sim"] == 0.0
        assert abs(p["raw_err_mean_db"]) < 1.0 and abs(p["cal_err_mean_db"] - p["raw_err_mean_db"]) < 0.1
    assert set(doc["summary"]) == {"bpsk@1000", "qpsk@1000", "8psk@1000"}


def test_centralized_ceiling_trains_the_federations_budget_in_one_process_and_selects_on_validation(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("centralized_ceiling", ROOT / "benchmarks" / "centralized_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    out = tmp_path / "ceiling.json"
    threads = torch.get_num_threads()
    try:
        module.main(
            [
                "--set",
                "model.name_or_path=tiny",
                "--set",
                "task.test_size=40",
                "--set",
                "task.max_train=160",
                "--set",
                "training.local_steps=2",
                "--set",
                "round.rounds=3",
                "--set",
                "devices.count=2",
                "--seeds",
                "0",
                "1",
                "--lrs",
                "5e-3",
                "1e-3",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    for seed in result["seeds"]:
        assert seed["steps"] == 3 * 2 * 2 and [run["lr"] for run in seed["runs"]] == [5e-3, 1e-3]
        best = {run["lr"]: max(c["val_accuracy"] for c in run["curve"]) for run in seed["runs"]}
        assert all(len(run["curve"]) == 3 for run in seed["runs"])
        assert best[seed["chosen_lr"]] == max(best.values())  # the lr is chosen on validation, not on test
        chosen = next(run for run in seed["runs"] if run["lr"] == seed["chosen_lr"])
        val = [c["val_accuracy"] for c in chosen["curve"]]
        assert seed["selected_round"] == val.index(max(val)) + 1
        assert seed["selected_accuracy"] == chosen["selected_accuracy"]
        assert seed["train_examples"] < 160  # the held-out validation parts are not trained on
    assert result["summary"]["selected_accuracy"]["n"] == 2
