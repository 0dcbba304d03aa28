"""The sweep's folder: one folder per finished trial (its records and `row.json`), the table of all of them.

<out>/sweep.yaml                 the resolved spec the sweep ran
<out>/trials/<trial>/row.json    the trial's row (written last: its presence means "done")
<out>/trials/<trial>/rounds.jsonl, summary.json, experiment.yaml, bench.yaml, provenance.json
<out>/trials/<trial>/failed.txt  the last failure (the trial runs again on the next invocation)
<out>/results.csv, report.md, plots/
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.metrics import METRICS, Curves, curves, parse_rounds, trial_row
from sweep.spec import Trial, recorded_fingerprint
from sweep.trial import TrialOutcome

META = ("trial", "bench", "arm", "policy", "aggregator", "variant", "seed", "host", "trial_wall_s")
COLUMNS = (*META, *METRICS, "initial_accuracy", "selected_round", "stopped_early")


@dataclass
class TrialResult:
    row: dict[str, Any]
    curves: Curves


def trial_dir(out: Path, trial: Trial) -> Path:
    return out / "trials" / trial.trial_id


def is_done(out: Path, trial: Trial) -> bool:
    """Finished, with the settings the spec asks for now (a row of other settings is stale: run again).

    The row's fingerprint is a cache: when it differs (it was made by older code), the configuration the run
    recorded is read by this code and compared; if it is what the spec asks for, the row is kept and re-stamped."""
    folder = trial_dir(out, trial)
    row_path = folder / "row.json"
    if not row_path.exists():
        return False
    row = json.loads(row_path.read_text())
    wanted = trial.fingerprint()
    if row.get("fingerprint") == wanted:
        return True
    if recorded_fingerprint(folder) != wanted:
        return False
    row["fingerprint"] = wanted
    tmp = row_path.with_name("row.json.tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(row_path)
    return True


def is_stale(out: Path, trial: Trial) -> bool:
    return (trial_dir(out, trial) / "row.json").exists() and not is_done(out, trial)


def save_outcome(out: Path, trial: Trial, outcome: TrialOutcome) -> dict[str, Any] | None:
    """Write what a trial brought back; its row if it finished (None: failed.txt says why)."""
    folder = trial_dir(out, trial)
    folder.mkdir(parents=True, exist_ok=True)
    if not outcome.ok:
        (folder / "failed.txt").write_text(f"on {outcome.host} after {outcome.wall_s:.0f} s: {outcome.error}\n")
        return None
    (folder / "row.json").unlink(missing_ok=True)  # a stale row must not outlive the records it described
    for name, text in outcome.files.items():
        (folder / name).write_text(text)
    row = {
        "trial": trial.trial_id,
        "fingerprint": trial.fingerprint(),
        "bench": trial.bench_name,
        "arm": trial.arm.label,
        "policy": trial.arm.policy,
        "aggregator": trial.arm.aggregator,
        "variant": trial.arm.variant,
        "seed": trial.seed,
        "host": outcome.host,
        "trial_wall_s": round(outcome.wall_s, 1),
        **trial_row(outcome.files),
    }
    (folder / "failed.txt").unlink(missing_ok=True)
    tmp = folder / "row.json.tmp"
    tmp.write_text(json.dumps(_finite(row), indent=1) + "\n")
    tmp.replace(folder / "row.json")
    return row


def load_results(out: Path, trials: list[Trial]) -> list[TrialResult]:
    """The finished trials of the spec, in its order (other folders under trials/ are left out)."""
    results = []
    for trial in trials:
        folder = trial_dir(out, trial)
        if not is_done(out, trial):
            continue
        row = {
            k: (math.nan if v is None and k in METRICS else v)
            for k, v in json.loads((folder / "row.json").read_text()).items()
        }
        summary = json.loads((folder / "summary.json").read_text())
        results.append(TrialResult(row, curves(parse_rounds((folder / "rounds.jsonl").read_text()), summary)))
    return results


def failures(out: Path, trials: list[Trial]) -> dict[str, str]:
    return {
        t.trial_id: (trial_dir(out, t) / "failed.txt").read_text().strip()
        for t in trials
        if not is_done(out, t) and (trial_dir(out, t) / "failed.txt").exists()
    }


def write_csv(results: list[TrialResult], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if _missing(r.row.get(k)) else r.row.get(k)) for k in COLUMNS})


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
