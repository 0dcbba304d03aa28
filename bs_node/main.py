"""`fedlora-bs`: start the base station on its own (multi-host labs); edges join with `fedlora-edge --bs ADDR`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from proto.control import BsEndpoints
from proto.launch import enable_stack_dumps, stop_with_parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-bs", description=__doc__)
    parser.add_argument("--experiment", help="experiment YAML (default: experiments/default.yaml)")
    parser.add_argument("--bench", help="bench YAML (default: hw_configs/sim.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an experiment field, e.g. --set round.rounds=3",
    )
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", help="run folder (default: runs/<time>-<name>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run in --run-dir from its checkpoint (same configuration, same addresses)",
    )
    parser.add_argument("--control", help="control-plane bind address (default: the bench's)")
    parser.add_argument("--data", help="data-plane bind address (default: the bench's)")
    parser.add_argument(
        "--silence-timeout",
        type=float,
        default=30.0,
        help="drop a device from the round after this many seconds without a message",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for evaluation")
    parser.add_argument(
        "--record-iq",
        action="store_true",
        help="also record the IQ at the BS receiver as SigMF in <run dir>/iq/ (gr-loopback), one annotation per frame",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    stop_with_parent()  # started by fedlora-run: stop when it dies (proto.launch); by hand: never
    enable_stack_dumps()  # kill -USR1 <pid>: where each thread is, in the log
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s bs %(levelname)s %(message)s")

    from config import ConfigError, load_bench, load_experiment

    try:  # before torch is imported: a typo costs no start-up time
        experiment = load_experiment(args.experiment, args.overrides)
        bench = load_bench(args.bench, args.bench_overrides)
    except ConfigError as exc:  # one line: file, key, value, what is allowed
        print(f"fedlora-bs: configuration error: {exc}", file=sys.stderr)
        return 2
    from bs_node.run_lock import RunFolderBusy, acquire

    if args.resume and not args.run_dir:
        print("fedlora-bs: --resume needs --run-dir, the folder of the run to go on with", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{experiment.name}")
    try:  # before torch loads; held until this process exits, however it exits (the descriptor stays open)
        acquire(run_dir)
    except RunFolderBusy as exc:  # one line: the folder and the live BS's pid
        print(f"fedlora-bs: {exc}", file=sys.stderr)
        return 2
    from bs_node.checkpoint import CheckpointError
    from bs_node.checkpoint import load as load_checkpoint
    from bs_node.station import BaseStation, StartupError

    try:
        resume = load_checkpoint(run_dir, experiment, bench) if args.resume else None
    except CheckpointError as exc:
        print(f"fedlora-bs: cannot resume: {exc}", file=sys.stderr)
        return 2
    try:
        bs = BaseStation(
            experiment,
            bench,
            run_dir,
            control_address=args.control,
            data_address=args.data,
            silence_timeout_s=args.silence_timeout,
            threads=args.threads,
            resume=resume,
            record_iq=args.record_iq,
        )
    except ConfigError as exc:  # what only the bench and the experiment together can tell
        print(f"fedlora-bs: configuration error: {exc}", file=sys.stderr)
        return 2
    endpoints = BsEndpoints(control=bs.control_endpoint, data=bs.data_endpoint)
    tmp = run_dir / "endpoints.json.tmp"  # written whole, then renamed: a reader never sees half a file
    tmp.write_text(endpoints.model_dump_json())
    tmp.replace(run_dir / "endpoints.json")
    signal.signal(signal.SIGINT, bs.stop)
    signal.signal(signal.SIGTERM, bs.stop)
    try:
        summary = bs.run()
    except StartupError as exc:
        print(f"fedlora-bs: {exc}", file=sys.stderr)
        return 1
    return 0 if not summary.get("stopped_early") else 130


if __name__ == "__main__":
    sys.exit(main())
