"""Results of benchmarks/sparsify_accuracy.py: one row per method, the comparison table, CSV/JSON out and back in."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CSV_COLUMNS = [
    "method",
    "sparsifier",
    "keep_fraction",
    "kept_fraction",
    "update_bytes",
    "air_bytes",
    "final_accuracy",
    "seconds",
]


@dataclass
class Result:
    label: str
    name: str
    keep_fraction: float
    options: dict[str, Any]
    update_bytes: float  # mean encoded update per device per round
    air_bytes: float  # + frame overhead
    kept_fraction: float  # rank components sent / held, over all devices and rounds
    accuracy: list[float] = field(default_factory=list)  # after round 0 (initial), 1, ..., R
    train_loss: list[float] = field(default_factory=list)  # mean local loss per round (devices averaged)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1]


def table(results: Sequence[Result], reference: str = "dense_fp32") -> str:
    """Fixed-width table; ratios and accuracy deltas are against the `reference` row (if it ran)."""
    ref = next((r for r in results if r.label == reference), None)
    rounds = len(results[0].accuracy) - 1 if results else 0
    head = (
        f"{'method':<24} {'keep':>6} {'update B':>9} {'on-air B':>9} {'x fewer':>8} {'final acc':>9} "
        f"{'Δ pts':>6}  acc per round (r0..r{rounds})"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = f"{ref.air_bytes / r.air_bytes:8.2f}" if ref else f"{'n/a':>8}"
        delta = f"{100 * (r.final_accuracy - ref.final_accuracy):+6.1f}" if ref else f"{'n/a':>6}"
        per_round = " ".join(f"{a:.3f}" for a in r.accuracy)
        lines.append(
            f"{r.label:<24} {r.kept_fraction:6.3f} {r.update_bytes:9.0f} {r.air_bytes:9.0f} {ratio} "
            f"{r.final_accuracy:9.4f} {delta}  {per_round}"
        )
    if ref:
        lines.append(
            f"x fewer = on-air bytes of {reference} / method's; Δ pts = final accuracy minus {reference}'s, "
            f"in percentage points; keep = rank components sent / held."
        )
    return "\n".join(lines)


def write_out(path: Path, settings: object, results: Sequence[Result]) -> None:
    """CSV (one row per method) or JSON (settings and results: `--merge` reads it back)."""
    if path.suffix != ".csv":
        rows = [dict(asdict(r), final_accuracy=r.final_accuracy) for r in results]
        doc = {"settings": asdict(settings), "results": rows}  # type: ignore[call-overload]
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + [f"acc_r{i}" for i in range(len(results[0].accuracy) if results else 0)])
        for r in results:
            numbers = (r.kept_fraction, r.update_bytes, r.air_bytes, r.final_accuracy, r.seconds)
            w.writerow(
                [r.label, r.name, r.keep_fraction, *(f"{x:.4f}" for x in numbers), *(f"{a:.4f}" for a in r.accuracy)]
            )


def load_results(paths: Sequence[Path]) -> tuple[dict, list[Result]]:
    """Results of split runs; they must share their settings (same seeds, rounds, devices)."""
    settings: dict | None = None
    results: list[Result] = []
    for path in paths:
        payload = json.loads(path.read_text())
        if settings is not None and payload["settings"] != settings:
            raise SystemExit(f"--merge: {path} was run with other settings than {paths[0]}")
        settings = payload["settings"]
        for r in payload["results"]:
            r.pop("final_accuracy", None)
            results.append(Result(**r))
    return settings or {}, results
