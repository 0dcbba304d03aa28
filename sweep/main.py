"""`fedlora-sweep`: run a grid of whole experiments as Ray tasks and report them with confidence intervals.

    fedlora-sweep experiments/sweeps/claims.yaml                 # local Ray on this machine's cores
    fedlora-sweep SPEC.yaml --address ray://head:10001           # an existing Ray cluster
    fedlora-sweep SPEC.yaml --set seeds=[0,1,2,3]                # add a seed: the finished trials are kept
    fedlora-sweep SPEC.yaml --report-only                        # table, report and plots of what is done

Each trial is a full `fedlora-run` (BS, edges, the bench's PHY) sized to `cpus_per_trial`. Its records land in
<out>/trials/<trial>/ as it finishes; a trial whose folder has row.json is skipped when the sweep runs again, so
a sweep cut off (Ctrl-C, a session's end) continues where it stopped. On a cluster every node needs this
repository installed at the same path (scripts/install.sh), since trials start its console scripts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from config import REPO_ROOT, ConfigError, load_bench, load_experiment
from config.loading import to_mapping
from sweep.plots import write_plots
from sweep.report import write_report
from sweep.results import failures, is_done, is_stale, load_results, save_outcome, write_csv
from sweep.spec import SweepSpec, Trial, load_sweep, repo_path
from sweep.trial import STOP_GRACE_S, TrialCommand, TrialOutcome, run_trial

STATUS_EVERY_S = 120.0  # a status line at least this often while trials run
TRIAL_SLACK_S = 600.0  # a trial's time limit beyond its rounds' deadlines and the start-up timeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlora-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", nargs="?", help="sweep YAML (keys: see sweep/spec.py); none: the defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a top-level key of the sweep, e.g. seeds=[0,1]",
    )
    parser.add_argument("--out", help="sweep folder (default: runs/sweep-<name>)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    parser.add_argument("--max-trials", type=_positive, help="run at most this many of the pending trials")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms now (the report shows all)")
    parser.add_argument("--report-only", action="store_true", help="only write the table, report and plots")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.spec, args.overrides)
        trials = spec.trials()
        out = Path(args.out or REPO_ROOT / "runs" / f"sweep-{spec.name}").resolve()
        commands = {t.trial_id: _command(t, out) for t in trials}
    except ConfigError as exc:
        print(f"fedlora-sweep: configuration error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(to_mapping(spec), sort_keys=False))
    pending = [t for t in trials if not is_done(out, t)]
    stale = [t.trial_id for t in trials if is_stale(out, t)]
    if stale:
        print(f"{len(stale)} finished trials were run with other settings and run again: {', '.join(stale)}")
    print(f"sweep {spec.name}: {len(trials)} trials, {len(trials) - len(pending)} already done, in {out}", flush=True)
    if args.arms:
        labels = {a.label for a in spec.arm_list()}
        unknown = sorted(set(args.arms) - labels)
        if unknown:
            print(f"fedlora-sweep: --arms: unknown {unknown}; the spec's arms: {sorted(labels)}", file=sys.stderr)
            return 2
        pending = [t for t in pending if t.arm.label in args.arms]
    if args.max_trials is not None:
        pending = pending[: args.max_trials]
    interrupted = False
    if pending and not args.report_only:
        interrupted = _run(pending, commands, out, args)
    results = load_results(out, trials)
    failed = failures(out, trials)
    write_csv(results, out / "results.csv")
    write_report(results, spec, out / "report.md", planned=len(trials), failed=failed)
    write_plots(results, out / "plots")
    print(
        f"{len(results)} of {len(trials)} trials finished; {out / 'results.csv'}, {out / 'report.md'}, "
        f"{out / 'plots'}/",
        flush=True,
    )
    return 130 if interrupted else (1 if failed else 0)


def _command(trial: Trial, out: Path) -> TrialCommand:
    """The trial's fedlora-run, its configs checked here first: a typo fails the sweep before anything runs."""
    spec = trial.spec
    experiment = repo_path(spec.experiment) if spec.experiment else None
    bench = repo_path(trial.bench)
    sets, bench_sets = trial.experiment_sets(), trial.bench_sets()
    try:
        exp = load_experiment(experiment, sets)
        load_bench(bench, bench_sets)
    except ConfigError as exc:
        raise ConfigError(f"trial {trial.trial_id}: {exc}") from None
    # past every round's deadline plus start-up and evaluation, something hangs: stop it, let the sweep go on
    timeout_s = exp.round.rounds * exp.round.deadline_s + exp.round.startup_timeout_s + TRIAL_SLACK_S
    return TrialCommand(
        trial.trial_id, experiment, bench, sets, bench_sets, spec.cpus_per_trial, exp.devices.count, str(out), timeout_s
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text}")
    return value


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(pending: list[Trial], commands: dict[str, TrialCommand], out: Path, args: argparse.Namespace) -> bool:
    """Run the trials on Ray, saving each as it finishes; True if interrupted (the rest stays pending)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the sweep as Ctrl-C does: no experiment left running
    spec: SweepSpec = pending[0].spec
    remote = ray.remote(num_cpus=spec.cpus_per_trial, max_retries=0)(run_trial)
    futures: dict[Any, Trial] = {remote.remote(commands[t.trial_id]): t for t in pending}
    t0, done = time.monotonic(), 0
    print(
        f"running {len(pending)} trials, {spec.cpus_per_trial} CPU each, on "
        f"{int(ray.cluster_resources().get('CPU', 0))} CPUs",
        flush=True,
    )
    try:
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1, timeout=STATUS_EVERY_S)
            if not ready:  # nothing finished for a while: say that the sweep is alive and where it stands
                print(
                    f"[{done}/{len(pending)}] {time.monotonic() - t0:.0f} s in, {len(futures)} trials to go", flush=True
                )
                continue
            trial = futures.pop(ready[0])
            try:
                outcome: TrialOutcome = ray.get(ready[0])
            except Exception as exc:  # the worker itself died: that trial's failure, the sweep goes on
                outcome = TrialOutcome(trial.trial_id, False, error=f"Ray task failed: {exc}")
            row = save_outcome(out, trial, outcome)
            done += 1
            elapsed = time.monotonic() - t0
            eta = elapsed / done * len(futures)
            what = (
                f"test {row['final_accuracy'] * 100:.1f} %, {row['total_energy_j']:.0f} J, "
                f"{row['uplink_bytes'] / 1e6:.2f} MB"
                if row
                else f"FAILED: {outcome.error.splitlines()[0]} (see trials/{trial.trial_id}/failed.txt)"
            )
            print(
                f"[{done}/{len(pending)}] {trial.trial_id}: {what} in {outcome.wall_s:.0f} s; ~{eta / 60:.0f} min left",
                flush=True,
            )
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(futures)} trials left pending; run the sweep again to continue", flush=True)
        for f in futures:  # each task stops its experiment (sweep/trial.py) before the workers go with the shutdown
            ray.cancel(f)
        ray.wait(list(futures), num_returns=len(futures), timeout=2 * STOP_GRACE_S + 10)
        return True
    finally:
        ray.shutdown()
    return False


if __name__ == "__main__":
    sys.exit(main())
