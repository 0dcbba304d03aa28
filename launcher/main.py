"""`fedlora-run`: one experiment on one machine: the BS and K edges as separate processes.

The BS prints the live view on this terminal; each edge logs to <run>/logs/edge-K.log. With a gr-zmq-iq bench
the air process (phy/air.py) starts first, on free ports, and logs to <run>/logs/air.log. Ctrl-C asks the BS to
stop (it writes what it has and tells the edges to leave; the air stops after them); a second Ctrl-C kills
every child.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bs_node.run_lock import RunFolderBusy, check_free
from config import REPO_ROOT, ConfigError, load_bench, load_experiment
from proto.air import AirEndpoints, AirMessageError
from proto.air import decode_endpoints as decode_air_endpoints
from proto.control import MessageError
from proto.control import decode_endpoints as decode_bs_endpoints
from proto.launch import STOP_WITH_PARENT_ENV, stop_with_parent
from trust.keys import KeyFileError, device_secret_file, open_run_keys

T = TypeVar("T")

DEFAULT_BENCH = "hw_configs/zmq_iq.yaml"
FALLBACK_BENCH = "hw_configs/sim.yaml"


def default_bench() -> str:
    """The GNU Radio FDMA link through the air process; the sim PHY where GNU Radio is missing (main says so)."""
    if importlib.util.find_spec("gnuradio") is not None:
        return str(REPO_ROOT / DEFAULT_BENCH)
    return str(REPO_ROOT / FALLBACK_BENCH)


def entry_point(name: str) -> list[str]:
    """The command of one of this installation's console scripts: the processes start as a user would start them.

    The script beside the running interpreter wins (the venv's own), then one on PATH."""
    script = Path(sys.executable).parent / name
    found = str(script) if script.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"fedlora-run: the entry point {name!r} is not installed; run scripts/install.sh")
    return [found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora-run", description=__doc__)
    parser.add_argument("--experiment", help="experiment YAML (default: experiments/default.yaml)")
    parser.add_argument(
        "--bench",
        help=f"bench YAML (default: {DEFAULT_BENCH}, the GNU Radio link through the air "
        f"process; {FALLBACK_BENCH} where GNU Radio is not installed)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    parser.add_argument("--run-dir", help="exact run folder (default: <runs-dir>/<time>-<name>)")
    parser.add_argument("--edge-threads", type=int, default=1, help="torch threads per edge")
    parser.add_argument("--bs-threads", type=int, default=2, help="torch threads of the BS (evaluation)")
    parser.add_argument("--silence-timeout", type=float, default=30.0)
    parser.add_argument(
        "--record-iq",
        action="store_true",
        help="also record the IQ at the BS receiver as SigMF in <run dir>/iq/ (gr-loopback), one annotation per frame",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="go on with a run that stopped (a crash, Ctrl-C) from its last closed round; with no configuration "
        "flags, the run's own (launch.json)",
    )
    args = parser.parse_args(argv)
    stop_with_parent()  # a sweep's worker that is killed must not leave its experiment running (proto.launch)
    busy = _live_owner(args.resume or args.run_dir)
    if busy:
        print(f"fedlora-run: {busy}", file=sys.stderr)
        return 2
    if args.resume:
        problem = _resume_arguments(args)
        if problem:
            print(f"fedlora-run: cannot resume: {problem}", file=sys.stderr)
            return 2
    bench_defaulted = args.bench is None
    if args.bench is None:
        args.bench = default_bench()
    try:
        experiment = load_experiment(args.experiment, args.overrides)
        bench = load_bench(args.bench, args.bench_overrides)
    except ConfigError as exc:  # one line: file, key, value, what is allowed
        print(f"fedlora-run: configuration error: {exc}", file=sys.stderr)
        return 2
    if bench_defaulted and args.bench.endswith(FALLBACK_BENCH):
        print(
            f"fedlora-run: GNU Radio is not installed, so this run uses the simulated PHY ({FALLBACK_BENCH}); "
            f"run scripts/install.sh as root (it installs Debian's gnuradio) for the default {DEFAULT_BENCH}",
            file=sys.stderr,
            flush=True,
        )
    run_dir = Path(args.run_dir or Path(args.runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{experiment.name}")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if not args.resume:  # what a later --resume runs with when it is given no configuration
        launch = {k: getattr(args, k) for k in LAUNCH_KEYS}
        (run_dir / LAUNCH_FILE).write_text(json.dumps(launch, indent=1) + "\n")
    (run_dir / "endpoints.json").unlink(missing_ok=True)  # the BS writes it anew once it is bound
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env[STOP_WITH_PARENT_ENV] = str(os.getpid())  # every process started here stops when this one dies
    key_dir: Path | None = None
    if bench.security.mode == "sealed":  # before the air and the BS start: both serve under the BS's key
        try:
            key_dir = open_run_keys(bench, run_dir, experiment.devices.count).key_dir
        except KeyFileError as exc:
            print(f"fedlora-run: configuration error: security.keys_dir: {exc}", file=sys.stderr)
            return 2

    passthrough = []
    for flag, value in (("--experiment", args.experiment), ("--bench", args.bench)):
        if value:
            passthrough += [flag, value]
    passthrough += [x for o in args.overrides for x in ("--set", o)]
    passthrough += [x for o in args.bench_overrides for x in ("--bench-set", o)]
    air: subprocess.Popen | None = None
    if bench.phy == "gr-zmq-iq":
        air, air_endpoints = _start_air(args, run_dir, env, key_dir)
        if air_endpoints is None:
            print(f"fedlora-run: the air process did not start (see {run_dir / 'logs' / 'air.log'})", file=sys.stderr)
            _stop(air)
            return 1
        passthrough += [
            "--bench-set",
            f"air.address={air_endpoints.address}",
            "--bench-set",
            f"air.medium={air_endpoints.medium}",
        ]
    bs_log = open(run_dir / "logs" / "bs.log", "w")
    bs = subprocess.Popen(
        [
            *entry_point("fedlora-bs"),
            *passthrough,
            "--run-dir",
            str(run_dir),
            "--control",
            "tcp://127.0.0.1:0",  # a resumed BS binds its checkpoint's ports again
            "--data",
            "tcp://127.0.0.1:0",
            *(["--resume"] if args.resume else []),
            *(["--record-iq"] if args.record_iq else []),
            "--silence-timeout",
            str(args.silence_timeout),
            "--threads",
            str(args.bs_threads),
        ],
        env=env,
        stderr=bs_log,
        start_new_session=True,
    )
    edges: list[subprocess.Popen] = []
    interrupted = [0]

    def on_signal(signum, _frame):
        interrupted[0] += 1
        if interrupted[0] == 1:
            print("\nstopping: asking the BS to close the run (Ctrl-C again to kill)", file=sys.stderr, flush=True)
            _signal(bs, signal.SIGINT)
        else:
            for p in [bs, *edges, *([air] if air else [])]:
                _signal(p, signal.SIGKILL)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        endpoints = _wait_endpoints(run_dir / "endpoints.json", bs, decode_bs_endpoints)
        if endpoints is None:
            print(f"fedlora-run: the BS exited before binding (see {run_dir / 'logs' / 'bs.log'})", file=sys.stderr)
            return bs.wait() or 1
        for k in range(experiment.devices.count):
            log = open(run_dir / "logs" / f"edge-{k}.log", "w")
            edges.append(
                subprocess.Popen(
                    [
                        *entry_point("fedlora-edge"),
                        "--bs",
                        endpoints.control,
                        "--device-id",
                        str(k),
                        "--threads",
                        str(args.edge_threads),
                        *_key_args(key_dir, k),
                        "--state-dir",
                        str(run_dir / "edge-state"),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        while bs.poll() is None:
            time.sleep(0.5)
            if edges and all(p.poll() not in (None, 0) for p in edges) and not interrupted[0]:
                print(
                    f"fedlora-run: every edge exited with an error (see {run_dir / 'logs'}); stopping the BS",
                    file=sys.stderr,
                    flush=True,
                )
                interrupted[0] += 1
                _signal(bs, signal.SIGINT)
        code = bs.wait()
        deadline = time.monotonic() + 20
        for p in edges:  # the BS told them to leave; give them a moment, then insist
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGTERM)
        for p in edges:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()
        if air is not None:
            _stop(air)
        for k, p in enumerate(edges):
            if p.returncode not in (0, None):
                print(
                    f"edge {k} exited with code {p.returncode} (log: {run_dir / 'logs' / f'edge-{k}.log'})",
                    file=sys.stderr,
                )
        return code
    finally:
        for p in [bs, *edges, *([air] if air else [])]:
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
        bs_log.close()


LAUNCH_FILE = "launch.json"
LAUNCH_KEYS = ("experiment", "bench", "overrides", "bench_overrides")


def _resume_arguments(args: argparse.Namespace) -> str | None:
    """Point args at the run to resume and, if it gives no configuration, the run's own; a problem, or None."""
    from bs_node.checkpoint import CHECKPOINT_FILE  # here: it loads torch, which only a resume needs this early

    run_dir = Path(args.resume)
    if not (run_dir / CHECKPOINT_FILE).exists():
        return f"{run_dir} has no {CHECKPOINT_FILE} (no round of it was closed)"
    if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
        return "--run-dir and --resume name different folders"
    args.run_dir = str(run_dir)
    if not any(getattr(args, k) for k in LAUNCH_KEYS):
        try:
            launch = json.loads((run_dir / LAUNCH_FILE).read_text())
        except (OSError, ValueError) as exc:
            return f"{run_dir / LAUNCH_FILE}: {exc}; give the run's --experiment/--bench/--set flags"
        for k in LAUNCH_KEYS:
            setattr(args, k, launch.get(k) or ([] if k.endswith("overrides") else None))
    return None


def _key_args(key_dir: Path | None, device_id: int) -> list[str]:
    """`--key FILE` for edge k when the bench seals (the launcher provisioned or found the keys at start)."""
    return [] if key_dir is None else ["--key", str(key_dir / device_secret_file(device_id))]


def _live_owner(run_dir: str | None) -> str | None:
    """Which live BS holds the run folder (bs_node.run_lock), before anything in it is touched; None if none."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    try:
        check_free(Path(run_dir))
    except RunFolderBusy as exc:
        return str(exc)
    return None


def _start_air(
    args: argparse.Namespace, run_dir: Path, env: dict, key_dir: Path | None
) -> tuple[subprocess.Popen, AirEndpoints | None]:
    """The gr-zmq-iq air on free loopback ports; returns it and its bound addresses (None if it failed)."""
    endpoints = run_dir / "air.json"
    endpoints.unlink(missing_ok=True)
    cmd = [
        *entry_point("fedlora-air"),
        "--address",
        "tcp://127.0.0.1:0",
        "--medium",
        "tcp://127.0.0.1:0",
        "--endpoints-file",
        str(endpoints),
    ]
    if args.bench:
        cmd += ["--bench", args.bench]
    cmd += [x for o in args.bench_overrides for x in ("--bench-set", o)]
    cmd += ["--keys", str(key_dir)] if key_dir is not None else []
    with open(run_dir / "logs" / "air.log", "w") as log:
        air = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return air, _wait_endpoints(endpoints, air, decode_air_endpoints, timeout_s=60.0)
    except BaseException:  # Ctrl-C while it starts: it is in its own session, so take it down here
        _signal(air, signal.SIGKILL)
        raise


def _stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM (the air closes its sockets and exits), then SIGKILL if it does not."""
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait_endpoints(
    path: Path, proc: subprocess.Popen, decode: Callable[[bytes], T], timeout_s: float = 120.0
) -> T | None:
    """The endpoints file `proc` writes once it has bound its sockets; None if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return decode(path.read_bytes())
            except (MessageError, AirMessageError):
                pass  # written but not flushed yet
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    return None


if __name__ == "__main__":
    sys.exit(main())
