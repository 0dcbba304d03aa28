"""The sweep's plots, one set per bench: accuracy against energy and against uplink bytes (arm means with 95 %
CI bars over seeds), and per-round curves with CI bands (accuracy by round, and by mean cumulative energy)."""

from __future__ import annotations

import math
from pathlib import Path

from sweep.report import by_bench_arm
from sweep.results import TrialResult
from sweep.stats import estimate


def write_plots(results: list[TrialResult], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for bench, arms in by_bench_arm(results).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, scale, label in (
            (axes[0], "total_energy_j", 1.0, "energy, all devices (J)"),
            (axes[1], "uplink_bytes", 1e-6, "uplink on air (MB)"),
        ):
            for arm, seeds in arms.items():
                x = estimate([r.row[metric] * scale for r in seeds.values()])
                y = estimate([r.row["final_accuracy"] * 100 for r in seeds.values()])
                ax.errorbar(x.mean, y.mean, xerr=_bar(x.ci95), yerr=_bar(y.ci95), fmt="o", capsize=3, label=arm)
            ax.set_xlabel(label)
            ax.set_ylabel("final test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{bench}: arm means, 95 % CI over seeds")
        fig.tight_layout()
        written.append(_save(fig, folder / f"{bench}_accuracy_vs_cost.png"))
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for arm, seeds in arms.items():
            n_rounds = min(len(r.curves.accuracy) for r in seeds.values())
            rounds = list(range(1, n_rounds + 1))
            acc = [estimate([r.curves.accuracy[i] * 100 for r in seeds.values()]) for i in range(n_rounds)]
            energy = [estimate([r.curves.energy_j[i] for r in seeds.values()]).mean for i in range(n_rounds)]
            means = [e.mean for e in acc]
            lows = [e.low if math.isfinite(e.ci95) else e.mean for e in acc]
            highs = [e.high if math.isfinite(e.ci95) else e.mean for e in acc]
            for ax, xs in ((axes[0], rounds), (axes[1], energy)):
                (line,) = ax.plot(xs, means, marker=".", label=arm)
                ax.fill_between(xs, lows, highs, alpha=0.15, color=line.get_color())
        axes[0].set_xlabel("round")
        axes[1].set_xlabel("mean cumulative energy (J)")
        for ax in axes:
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{bench}: per-round test accuracy, mean and 95 % CI band over seeds")
        fig.tight_layout()
        written.append(_save(fig, folder / f"{bench}_rounds.png"))
        plt.close(fig)
    return written


def _bar(ci: float) -> float | None:
    return ci if math.isfinite(ci) else None


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path
