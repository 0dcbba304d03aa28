"""The run folder: config snapshot, one JSON line per round, a plot, the adapter checkpoint, a summary.

Records are appended and flushed as each round closes, so a run cut off by Ctrl-C or a crash keeps every
round it finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from bs_node.measurements import RoundRecord


class RunRecorder:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.run_dir / "rounds.jsonl"
        self.records: list[RoundRecord] = []
        self.initial_accuracy: float | None = None  # before fine-tuning: round 0 of the plot

    def snapshot_config(
        self, experiment: dict, bench: dict, provenance: dict[str, Any], *, resumed_at: int | None = None
    ) -> None:
        """What the run is (the resolved configs) and where it came from (code, packages, host, radios). A resumed
        run keeps the first provenance and adds its own, `provenance.resumed-at-<round>.json`."""
        (self.run_dir / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
        (self.run_dir / "bench.yaml").write_text(yaml.safe_dump(bench, sort_keys=False))
        name = "provenance.json" if resumed_at is None else f"provenance.resumed-at-{resumed_at}.json"
        (self.run_dir / name).write_text(json.dumps(provenance, indent=1) + "\n")

    def resume(self, next_round: int) -> None:
        """Keep the records of rounds before next_round (a crash may have left the record of a round that the
        checkpoint does not hold: that round runs again), rewriting rounds.jsonl atomically."""
        lines = self.rounds_path.read_text().splitlines() if self.rounds_path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["round"] < next_round]
        tmp = self.rounds_path.with_name("rounds.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.rounds_path)
        self.records = [RoundRecord.from_dict(json.loads(line)) for line in kept]

    def write_round(self, record: RoundRecord) -> None:
        self.records.append(record)
        with self.rounds_path.open("a") as fh:
            fh.write(json.dumps(_finite(record.as_dict())) + "\n")
            fh.flush()
        self.plot()

    def save_adapter(self, state: dict[str, torch.Tensor], name: str = "adapter.pt") -> None:
        tmp = self.run_dir / (name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.run_dir / name)

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")

    def plot(self) -> None:
        """plot.png: accuracy (test, and validation when devices hold data out), uplink bytes and energy per round
        (per device stacked)."""
        if not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.records]
        device_ids = sorted({d.device_id for r in self.records for d in r.devices})
        fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
        acc = [r.accuracy * 100 if r.accuracy is not None else math.nan for r in self.records]
        if self.initial_accuracy is not None:
            axes[0].plot([0, *rounds], [self.initial_accuracy * 100, *acc], marker="o")
        else:
            axes[0].plot(rounds, acc, marker="o")
        val = [r.val_accuracy * 100 if r.val_accuracy is not None else math.nan for r in self.records]
        if any(math.isfinite(v) for v in val):
            axes[0].plot(rounds, val, marker=".", linestyle="--", label="validation")
            axes[0].lines[0].set_label("test")
            axes[0].legend(fontsize=8)
        axes[0].set_ylabel("held-out accuracy (%)")
        axes[0].grid(alpha=0.3)
        for ax, field, scale, label in (
            (axes[1], "uplink_bytes", 1e-3, "uplink on air (kB)"),
            (axes[2], "energy_j", 1.0, "energy (J)"),
        ):
            bottom = [0.0] * len(rounds)
            for dev in device_ids:
                vals = [sum(getattr(d, field) for d in r.devices if d.device_id == dev) * scale for r in self.records]
                ax.bar(rounds, vals, bottom=bottom, label=f"edge {dev}")
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
        axes[1].legend(fontsize=8, ncol=min(4, max(1, len(device_ids))))
        axes[2].set_xlabel("round")
        fig.suptitle(f"{self.run_dir.name}: policy {self.records[-1].policy}")
        fig.tight_layout()
        fig.savefig(self.run_dir / "plot.png", dpi=90)
        plt.close(fig)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
