"""The run folder: config snapshot, one JSON line per round, a plot, the adapter checkpoint, a summary.

Records are appended, flushed and fsynced as each round closes, so a run cut off by Ctrl-C, a crash or a power cut
keeps every round it finished. A crash in the middle of an append can leave a torn last line: a resume drops it
with a warning (that round had no checkpoint yet, so it runs again); a torn line before the last is an error
naming it. The adapter is written 0600, fsynced and renamed (trust.run_files).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from bs_node.measurements import RoundRecord
from trust.run_files import write_atomic

log = logging.getLogger("bs")


class RecordsError(ValueError):
    """rounds.jsonl cannot be read; the message names the file and the line."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The round records of rounds.jsonl; a torn last line (a crash mid-append) is dropped with a warning, any other
    line that is not a JSON object with an integer `round` is a RecordsError naming it."""
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or type(record.get("round")) is not int:
                raise ValueError("not a record with an integer round")
        except (ValueError, RecursionError) as exc:
            if i == len(numbered) - 1:
                log.warning("%s: line %d is torn (%s); dropped, its round runs again", path, n, exc)
                break
            raise RecordsError(f"{path}: line {n} is not a round record ({exc})") from None
        records.append(record)
    return records


def recorded_rounds(path: Path) -> list[int]:
    """The rounds rounds.jsonl holds (a torn last line dropped)."""
    return [record["round"] for record in read_records(path)]


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
        kept = [record for record in read_records(self.rounds_path) if record["round"] < next_round]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        write_atomic(self.rounds_path, text.encode(), mode=0o644)
        self.records = [RoundRecord.from_dict(record) for record in kept]

    def write_round(self, record: RoundRecord) -> None:
        self.records.append(record)
        with self.rounds_path.open("a") as fh:
            fh.write(json.dumps(_finite(record.as_dict())) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.plot()

    def save_adapter(self, state: dict[str, torch.Tensor], name: str = "adapter.pt") -> None:
        buffer = io.BytesIO()  # read back with torch.load's default weights_only=True: tensors, no code
        torch.save(state, buffer)
        write_atomic(self.run_dir / name, buffer.getvalue())

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
