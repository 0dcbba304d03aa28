"""One trial's numbers, read from its run folder's records: the row of the results table and its curves.

Settings are chosen on validation data: `selected_round` is the round of best validation accuracy (early
stopping), and `selected_accuracy` the *test* accuracy there. `final_accuracy` is the test accuracy after the last
round. Energy is what the edges measured (J), summed over devices and rounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

# the result table's numeric columns, in order, with how the report names them
METRICS: dict[str, str] = {
    "final_accuracy": "final test accuracy",
    "selected_accuracy": "test accuracy at the best-validation round",
    "final_val_accuracy": "final validation accuracy",
    "total_energy_j": "energy (J)",
    "uplink_bytes": "uplink bytes on air",
    "max_budget_ratio": "max device energy / budget",
    "rounds": "rounds",
    "wall_s": "wall time (s)",
}


@dataclass(frozen=True)
class Curves:
    """Per round: test and validation accuracy, cumulative energy (J) and uplink bytes; the accuracy before
    fine-tuning is where every run stands at zero energy."""

    initial_accuracy: float
    accuracy: list[float]
    val_accuracy: list[float]
    energy_j: list[float]
    uplink_bytes: list[float]

    def accuracy_at_energy(self, energy_j: float) -> float:
        """Test accuracy after the last round whose cumulative energy is within `energy_j` (none: the initial)."""
        within = [a for a, e in zip(self.accuracy, self.energy_j) if e <= energy_j * (1 + 1e-9)]
        return within[-1] if within else self.initial_accuracy

    def energy_to_accuracy(self, accuracy: float) -> float:
        """Cumulative energy when test accuracy first reached `accuracy` (NaN: never)."""
        for a, e in zip(self.accuracy, self.energy_j):
            if a >= accuracy - 1e-9:
                return e
        return math.nan


def parse_rounds(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curves(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> Curves:
    def num(x: Any) -> float:
        return float(x) if x is not None else math.nan

    energy, uplink, e, b = [], [], 0.0, 0.0
    for r in rounds:
        e += sum(d["energy_j"] for d in r["devices"])
        b += sum(d["uplink_bytes"] for d in r["devices"])
        energy.append(e)
        uplink.append(b)
    return Curves(
        initial_accuracy=num(summary.get("initial_accuracy")),
        accuracy=[num(r.get("accuracy")) for r in rounds],
        val_accuracy=[num(r.get("val_accuracy")) for r in rounds],
        energy_j=energy,
        uplink_bytes=uplink,
    )


def trial_row(files: dict[str, str]) -> dict[str, Any]:
    """The metrics of one finished run, from its rounds.jsonl, summary.json and bench.yaml contents."""
    rounds = parse_rounds(files["rounds.jsonl"])
    summary = json.loads(files["summary.json"])
    bench = yaml.safe_load(files["bench.yaml"])
    c = curves(rounds, summary)
    val = [v if math.isfinite(v) else -math.inf for v in c.val_accuracy]
    # the earliest round of best validation accuracy; none without validation data (nothing to choose on)
    selected = max(range(len(val)), key=lambda i: (val[i], -i)) if any(math.isfinite(v) for v in val) else None
    budgets = [d.get("energy_budget_j") for d in bench.get("devices", [])]
    ratios = []
    for k in sorted({d["device_id"] for r in rounds for d in r["devices"]}):
        budget = budgets[k % len(budgets)] if budgets else None
        if budget:
            spent = sum(d["energy_j"] for r in rounds for d in r["devices"] if d["device_id"] == k)
            ratios.append(spent / len(rounds) / budget)
    return {
        "rounds": len(rounds),
        "initial_accuracy": c.initial_accuracy,
        "final_accuracy": c.accuracy[-1] if rounds else math.nan,
        "final_val_accuracy": c.val_accuracy[-1] if rounds else math.nan,
        "selected_round": selected + 1 if selected is not None else None,
        "selected_accuracy": c.accuracy[selected] if selected is not None else math.nan,
        "total_energy_j": c.energy_j[-1] if rounds else 0.0,
        "uplink_bytes": c.uplink_bytes[-1] if rounds else 0.0,
        "max_budget_ratio": max(ratios) if ratios else math.nan,
        "wall_s": float(summary.get("wall_s") or math.nan),
        "stopped_early": bool(summary.get("stopped_early")),
    }
