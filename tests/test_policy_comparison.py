"""benchmarks/policy_comparison.py --analyze: the table reads run folders, a later folder's policy wins, and the
energy to the fixed policy's final accuracy is the cumulative energy of the first round that reached it."""

import importlib.util
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("policy_comparison", ROOT / "benchmarks" / "policy_comparison.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, policy: str, accuracies: list[float], energy_per_device_j: float) -> None:
    run = folder / policy
    run.mkdir(parents=True)
    (run / "bench.yaml").write_text(yaml.safe_dump({"devices": [{"energy_budget_j": 100.0}] * 2}))
    rows = [
        {
            "round": r + 1,
            "accuracy": acc,
            "devices": [
                {"device_id": k, "energy_j": energy_per_device_j, "uplink_bytes": 10, "status": "ok"} for k in range(2)
            ],
        }
        for r, acc in enumerate(accuracies)
    ]
    (run / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_analyze_joins_folders_and_prices_the_fixed_policys_final_accuracy(tmp_path, capsys, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    fake_run(old, "fixed", [0.70, 0.78, 0.77], 200.0)  # 400 J a round; final 77 %
    fake_run(old, "lyapunov", [0.5, 0.5, 0.5], 50.0)  # replaced by the later folder
    fake_run(new, "lyapunov", [0.70, 0.74, 0.76, 0.775], 60.0)  # 120 J a round
    module = load_script(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["policy_comparison.py", "--analyze", str(old), str(new)])
    module.main()
    out = capsys.readouterr().out
    result = json.loads((new / "comparison.json").read_text())
    assert result["lyapunov"]["final_accuracy"] == 0.775
    assert module.energy_to_accuracy(result["lyapunov"], 0.77) == (4, 480.0)
    assert module.energy_to_accuracy(result["fixed"], 0.77) == (2, 800.0)
    assert module.energy_to_accuracy(result["lyapunov"], 0.80) is None
    assert "round  4 of 4:      480 J = 0.40 x fixed" in out  # fixed spent 1,200 J in all
    assert "0:200(100!)[3]" in out and "0:60(100)[4]" in out  # fixed overspends the 100 J budgets, lyapunov not
