"""fedlora-sweep: a 2 policies x 2 seeds x 2 rounds sweep through Ray on the sim bench with the tiny model, its
table, report (means, 95 % CIs, paired differences) and plots; a rerun skips what is done; bad specs fail early;
the statistics and per-trial metrics on known numbers."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from launcher.main import entry_point
from sweep.metrics import curves, trial_row
from sweep.results import failures, is_done, is_stale, load_results, save_outcome
from sweep.spec import load_sweep
from sweep.stats import estimate, paired
from sweep.trial import SWEEP_DIR_ENV, TrialOutcome, threads_for

REPO = Path(__file__).resolve().parents[1]
QUICK = {
    "name": "quick",
    "benches": ["hw_configs/sim.yaml"],
    "policies": ["fixed", "random"],
    "seeds": [0, 1],
    "overrides": {
        "model.name_or_path": "tiny",
        "task.test_size": 60,
        "task.max_train": 300,
        "training.local_steps": 2,
        "round.rounds": 2,
        "round.heartbeat_s": 0.5,
        "devices.count": 2,
    },
}


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*entry_point("fedlora-sweep"), *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.integration
def test_a_sweep_runs_on_ray_reports_cis_and_continues_where_it_stopped(tmp_path):
    spec, out = tmp_path / "quick.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(QUICK))
    first = sweep(str(spec), "--out", str(out), "--num-cpus", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "running 4 trials" in first.stdout and "[4/4]" in first.stdout

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        ("fixed", "0"),
        ("fixed", "1"),
        ("random", "0"),
        ("random", "1"),
    ]
    for r in rows:
        assert r["rounds"] == "2" and 0 <= float(r["final_accuracy"]) <= 1 and float(r["total_energy_j"]) > 0
        assert r["selected_round"] in ("1", "2")
        trial = out / "trials" / r["trial"]
        provenance = json.loads((trial / "provenance.json").read_text())
        assert provenance["packages"]["torch"] and provenance["code"]["commit"]
        assert len((trial / "rounds.jsonl").read_text().splitlines()) == 2
    report = (out / "report.md").read_text()
    assert "| `fixed` | " in report and "| `random` | " in report
    assert "Paired against `fixed`" in report and " ± " in report and "(2)" in report
    assert (out / "plots" / "sim_accuracy_vs_cost.png").stat().st_size > 0
    assert (out / "plots" / "sim_rounds.png").stat().st_size > 0

    # a second run finds every trial done and starts no Ray
    again = sweep(str(spec), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "4 trials, 4 already done" in again.stdout and "running" not in again.stdout
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4


def test_a_bad_spec_fails_before_anything_runs_naming_the_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**QUICK, "policies": ["fixed", "bogus"]}))
    bad = sweep(str(spec), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "policies[1]" in bad.stderr and "bogus" in bad.stderr
    spec.write_text(yaml.safe_dump({**QUICK, "overrides": {"round.roundz": 2}}))
    bad = sweep(str(spec), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "round.roundz" in bad.stderr and "trial sim__fixed__s0" in bad.stderr
    assert not (tmp_path / "out" / "trials").exists()


def test_trials_are_the_grid_seed_major_with_arm_overrides_winning():
    spec = load_sweep(
        None, ["policies=[fixed, lyapunov]", "seeds=[3, 4]", "arms={dense: {}, soft: {codec.sparsifier: soft}}"]
    )
    trials = spec.trials()
    assert [t.trial_id for t in trials[:4]] == [
        "sim__fixed_dense__s3",
        "sim__fixed_soft__s3",
        "sim__lyapunov_dense__s3",
        "sim__lyapunov_soft__s3",
    ]
    assert trials[1].experiment_sets() == ['controller.policy="fixed"', 'codec.sparsifier="soft"', "seed=3"]
    assert spec.baseline_label() == "fixed/dense"
    with pytest.raises(ValueError, match="baseline"):
        load_sweep(None, ["baseline=nope"])


def test_estimate_is_students_t_and_paired_takes_matched_differences():
    xs = [0.71, 0.74, 0.78, 0.69]
    e = estimate(xs)
    mean = sum(xs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)
    assert e.n == 4 and e.mean == pytest.approx(mean)
    assert e.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, 3) * sd / 2)
    assert estimate([0.5]).n == 1 and math.isnan(estimate([0.5]).ci95)
    assert estimate([None, math.nan, 2.0, 4.0]).n == 2
    d = paired([1.0, 2.0, None, 4.0], [0.5, 1.0, 1.0, 3.0])
    assert d.n == 3 and d.mean == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert paired([1.1, 1.15, 1.2], [1.0, 1.0, 1.0]).excludes_zero()
    assert not paired([1.1, 0.8, 1.3], [1.0, 1.0, 1.0]).excludes_zero()


def _files(accuracies, val, energy_per_round_j, budget_j=10.0):
    rounds = [
        {
            "round": i + 1,
            "accuracy": a,
            "val_accuracy": v,
            "devices": [{"device_id": k, "energy_j": energy_per_round_j / 2, "uplink_bytes": 100} for k in range(2)],
        }
        for i, (a, v) in enumerate(zip(accuracies, val))
    ]
    return {
        "rounds.jsonl": "".join(json.dumps(r) + "\n" for r in rounds),
        "summary.json": json.dumps({"initial_accuracy": 0.5, "wall_s": 12.0}),
        "bench.yaml": yaml.safe_dump({"devices": [{"energy_budget_j": budget_j}] * 2}),
        "experiment.yaml": "",
        "provenance.json": "{}",
    }


def test_a_trials_row_selects_on_validation_and_reports_test():
    files = _files([0.60, 0.70, 0.66], [0.62, 0.75, 0.75], energy_per_round_j=8.0)
    row = trial_row(files)
    assert row["selected_round"] == 2 and row["selected_accuracy"] == 0.70  # the earliest best validation round
    assert row["final_accuracy"] == 0.66 and row["total_energy_j"] == 24.0 and row["uplink_bytes"] == 600
    assert row["max_budget_ratio"] == pytest.approx(4.0 / 10.0)
    c = curves([json.loads(x) for x in files["rounds.jsonl"].splitlines()], {"initial_accuracy": 0.5})
    assert c.energy_to_accuracy(0.65) == 16.0 and math.isnan(c.energy_to_accuracy(0.9))
    assert c.accuracy_at_energy(20.0) == 0.70 and c.accuracy_at_energy(5.0) == 0.5  # nothing within: initial


def test_without_validation_data_nothing_is_selected():
    files = _files([0.60, 0.70], [None, None], energy_per_round_j=8.0)
    row = trial_row(files)
    assert row["selected_round"] is None and math.isnan(row["selected_accuracy"])


def test_a_failed_trial_is_kept_out_of_the_table_and_runs_again(tmp_path):
    trial = load_sweep(None, ["seeds=[0]"]).trials()[0]
    assert (
        save_outcome(tmp_path, trial, TrialOutcome(trial.trial_id, False, error="fedlora-run exited with 1\ntail"))
        is None
    )
    assert not is_done(tmp_path, trial) and "exited with 1" in failures(tmp_path, [trial])[trial.trial_id]
    row = save_outcome(tmp_path, trial, TrialOutcome(trial.trial_id, True, _files([0.6], [0.6], 2.0), host="h"))
    assert row is not None and is_done(tmp_path, trial) and failures(tmp_path, [trial]) == {}


def test_a_finished_trial_whose_settings_changed_is_stale_and_runs_again(tmp_path):
    trial = load_sweep(None, ["seeds=[0]", "overrides={training.lr: 0.005}"]).trials()[0]
    save_outcome(tmp_path, trial, TrialOutcome(trial.trial_id, True, _files([0.6], [0.6], 2.0), host="h"))
    assert is_done(tmp_path, trial) and not is_stale(tmp_path, trial)
    changed = load_sweep(None, ["seeds=[0]", "overrides={training.lr: 0.01}"]).trials()[0]
    assert changed.trial_id == trial.trial_id  # the same folder ...
    assert not is_done(tmp_path, changed) and is_stale(tmp_path, changed)  # ... but not what the spec asks for now
    assert load_results(tmp_path, [changed]) == []


def test_a_trial_of_older_code_counts_as_done_when_what_it_ran_is_what_is_asked(tmp_path):
    """Its row's fingerprint is stale (older code hashed other fields), but the configuration it recorded, read by
    today's code (fields added since at their defaults), is the spec's: kept and re-stamped. One that ran with
    another value is not."""
    from config import load_bench, load_experiment, to_mapping

    trial = load_sweep(None, ["seeds=[0]", "overrides={training.lr: 0.005}"]).trials()[0]
    experiment = to_mapping(load_experiment(None, trial.experiment_sets()))
    bench = to_mapping(load_bench(trial.bench, trial.bench_sets()))
    bench.pop("security")  # a field this code added: the older run did not record it
    # a run over the air records the ports its air process bound, not the bench's: they are wiring, not settings
    bench["air"] = {**bench["air"], "address": "tcp://127.0.0.1:35377", "medium": "tcp://127.0.0.1:40633"}
    files = {**_files([0.6], [0.6], 2.0), "experiment.yaml": yaml.safe_dump(experiment)}
    save_outcome(tmp_path, trial, TrialOutcome(trial.trial_id, True, {**files, "bench.yaml": yaml.safe_dump(bench)}))
    row_path = tmp_path / "trials" / trial.trial_id / "row.json"
    row = json.loads(row_path.read_text())
    row_path.write_text(json.dumps({**row, "fingerprint": "made-by-old-code"}))
    assert is_done(tmp_path, trial)
    assert json.loads(row_path.read_text())["fingerprint"] == trial.fingerprint()  # re-stamped
    other = load_sweep(None, ["seeds=[0]", "overrides={training.lr: 0.01}"]).trials()[0]
    row_path.write_text(json.dumps({**row, "fingerprint": "made-by-old-code"}))
    assert not is_done(tmp_path, other) and is_stale(tmp_path, other)


def test_threads_share_the_trials_cpus():
    assert threads_for(1, 4) == (1, 1) and threads_for(8, 4) == (8, 2) and threads_for(2, 6) == (2, 1)


def _sweep_pids(out: Path) -> set[int]:
    """Processes that belong to the sweep in `out` (its trials carry FEDLORA_SWEEP_DIR in their environment)."""
    marker = f"{SWEEP_DIR_ENV}={out.resolve()}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.integration
def test_a_stopped_sweep_leaves_no_experiment_running_and_keeps_its_trials_pending(tmp_path):
    spec, out = tmp_path / "long.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump({**QUICK, "seeds": [0], "overrides": {**QUICK["overrides"], "round.rounds": 50}}))
    driver = subprocess.Popen(
        [*entry_point("fedlora-sweep"), str(spec), "--out", str(out), "--num-cpus", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("fedlora-edge" in _cmdline(p) for p in _sweep_pids(out)):
        time.sleep(0.5)
    assert _sweep_pids(out), "the trials' experiments never started"
    driver.send_signal(signal.SIGTERM)  # as a kill or the end of a session would
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 130, output
    assert "interrupted: 2 trials left pending" in output
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _sweep_pids(out):
        time.sleep(1)
    assert not _sweep_pids(out), [_cmdline(p) for p in _sweep_pids(out)]
    assert not list((out / "trials").glob("*/row.json"))  # nothing half-run counts as done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
