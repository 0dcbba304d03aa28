"""report.md: per bench, every arm's metrics as mean ± 95 % CI over seeds, and paired differences against the
baseline arm (same bench and seed): accuracy, energy, bytes, the energy an arm spent to reach the baseline's final
accuracy, and accuracy at equal energy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from sweep.metrics import METRICS
from sweep.results import TrialResult
from sweep.spec import SweepSpec
from sweep.stats import Estimate, estimate, paired

PERCENT = {"final_accuracy", "selected_accuracy", "final_val_accuracy"}
_DIGITS = {"max_budget_ratio": 3, "uplink_bytes": 3}


def by_bench_arm(results: list[TrialResult]) -> dict[str, dict[str, dict[int, TrialResult]]]:
    """bench -> arm -> seed -> result, arms in the order they first appear."""
    out: dict[str, dict[str, dict[int, TrialResult]]] = defaultdict(dict)
    for r in results:
        out[r.row["bench"]].setdefault(r.row["arm"], {})[int(r.row["seed"])] = r
    return out


def fmt(e: Estimate, metric: str = "", scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± ci (n)`; accuracies in percent (points), the rest in the metric's unit times `scale`."""
    if e.n == 0:
        return "–"
    k = 100.0 if metric in PERCENT else scale
    ci = f" ± {e.ci95 * k:.{digits}f}" if math.isfinite(e.ci95) else ""
    return f"{e.mean * k:.{digits}f}{ci} ({e.n})"


def write_report(
    results: list[TrialResult], spec: SweepSpec, path: Path, *, planned: int, failed: dict[str, str]
) -> str:
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"{len(results)} of {planned} trials finished"
        + (f", {len(failed)} failed (below)" if failed else "")
        + f"; seeds {list(spec.seeds)}; baseline arm `{spec.baseline_label()}`.",
        "Cells are mean ± 95 % CI half-width (Student's t over seeds), with the number of seeds in brackets.",
        "Accuracies in percent on the test set; `selected` is the test accuracy at the round of best *validation*",
        "accuracy (the setting chosen on validation data). Energy in J, bytes in MB, both over all devices and rounds.",
        "",
    ]
    for bench, arms in by_bench_arm(results).items():
        lines += [f"## Bench `{bench}`", "", _arm_table(arms), ""]
        base = arms.get(spec.baseline_label())
        if base is None:
            lines += [f"(no finished trial of the baseline arm `{spec.baseline_label()}` on this bench)", ""]
            continue
        lines += [f"### Paired against `{spec.baseline_label()}` (same seed)", "", _paired_table(arms, base), ""]
        if spec.target_accuracy is not None:
            lines += [_target_table(arms, spec.target_accuracy), ""]
    if failed:
        lines += ["## Failed trials (run the sweep again to retry them)", ""]
        lines += [f"- `{t}`: {why.splitlines()[0]}" for t, why in failed.items()] + [""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _arm_table(arms: dict[str, dict[int, TrialResult]]) -> str:
    shown = [m for m in METRICS if m not in ("rounds", "wall_s")]
    scales = {"uplink_bytes": 1e-6}
    head = "| arm | " + " | ".join(METRICS[m] for m in shown) + " |"
    rows = [head, "|" + "---|" * (len(shown) + 1)]
    for arm, seeds in arms.items():
        cells = [
            fmt(
                estimate([r.row[m] for r in seeds.values()]), m, scales.get(m, 1.0), 3 if m == "max_budget_ratio" else 1
            )
            for m in shown
        ]
        rows.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pairs(
    arm: dict[int, TrialResult], base: dict[int, TrialResult], f: Callable[[TrialResult, TrialResult], float]
) -> Estimate:
    seeds = sorted(set(arm) & set(base))
    return estimate([f(arm[s], base[s]) for s in seeds])


def _paired_table(arms: dict[str, dict[int, TrialResult]], base: dict[int, TrialResult]) -> str:
    rows = [
        "| arm | Δ final acc (pts) | Δ selected acc (pts) | energy ratio | bytes ratio "
        "| energy to baseline's final acc (ratio; reached) | Δ acc at equal energy (pts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, arm in arms.items():
        seeds = sorted(set(arm) & set(base))
        d_final = paired([arm[s].row["final_accuracy"] for s in seeds], [base[s].row["final_accuracy"] for s in seeds])
        d_sel = paired(
            [arm[s].row["selected_accuracy"] for s in seeds], [base[s].row["selected_accuracy"] for s in seeds]
        )
        energy = _pairs(arm, base, lambda a, b: _ratio(a.row["total_energy_j"], b.row["total_energy_j"]))
        nbytes = _pairs(arm, base, lambda a, b: _ratio(a.row["uplink_bytes"], b.row["uplink_bytes"]))
        to_acc = _pairs(
            arm,
            base,
            lambda a, b: _ratio(a.curves.energy_to_accuracy(b.row["final_accuracy"]), b.row["total_energy_j"]),
        )
        equal = _pairs(arm, base, _accuracy_at_equal_energy)
        rows.append(
            f"| `{label}` | {fmt(d_final, 'final_accuracy')} | {fmt(d_sel, 'selected_accuracy')} "
            f"| {fmt(energy, digits=3)} | {fmt(nbytes, digits=4)} | {fmt(to_acc, digits=3)}; {to_acc.n}/{len(seeds)} "
            f"| {fmt(equal, 'final_accuracy')} |"
        )
    return "\n".join(rows)


def _accuracy_at_equal_energy(a: TrialResult, b: TrialResult) -> float:
    """Accuracy difference at the smaller of the two total energies (each run's last round within it, or its
    accuracy before fine-tuning if even its first round cost more)."""
    level = min(a.row["total_energy_j"], b.row["total_energy_j"])
    return a.curves.accuracy_at_energy(level) - b.curves.accuracy_at_energy(level)


def _target_table(arms: dict[str, dict[int, TrialResult]], target: float) -> str:
    rows = [f"| arm | energy to {target:.0%} test accuracy (J; reached) |", "|---|---|"]
    for label, seeds in arms.items():
        e = estimate([r.curves.energy_to_accuracy(target) for r in seeds.values()])
        rows.append(f"| `{label}` | {fmt(e, digits=0)}; {e.n}/{len(seeds)} |")
    return "\n".join(rows)


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
