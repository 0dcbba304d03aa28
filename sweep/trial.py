"""One trial: a whole experiment (`fedlora-run`: the BS, its edges and, on a GNU Radio bench, the air) on the
machine Ray gives it, sized to the CPUs it asked for. What comes back is the run folder's records as text, so the
driver writes them under the sweep's folder whichever machine of a cluster ran the trial.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.main import entry_point
from proto.launch import STOP_WITH_PARENT_ENV

# the run folder's files a sweep keeps: the records, the resolved configs and where the run came from
KEPT_FILES = ("rounds.jsonl", "summary.json", "experiment.yaml", "bench.yaml", "provenance.json")
LOG_TAIL_LINES = 40
STOP_GRACE_S = 30.0  # after a first SIGTERM, how long fedlora-run may take to close the run before the second
WAIT_SLICE_S = 2.0
SWEEP_DIR_ENV = "FEDLORA_SWEEP_DIR"


@dataclass
class TrialCommand:
    """What a trial runs, as plain data (it crosses to a Ray worker)."""

    trial_id: str
    experiment: str | None
    bench: str
    sets: list[str]
    bench_sets: list[str]
    cpus: int
    devices: int
    sweep_dir: str  # the driver's sweep folder, for the trial's processes to carry in their environment
    timeout_s: float  # the trial is stopped (and fails) past this


@dataclass
class TrialOutcome:
    trial_id: str
    ok: bool
    files: dict[str, str] = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0
    host: str = ""


def threads_for(cpus: int, devices: int) -> tuple[int, int]:
    """(BS torch threads, torch threads per edge) within `cpus`: the BS evaluates while the edges wait, and the
    edges train at the same time, so each edge gets its share and the BS all of them."""
    return max(1, cpus), max(1, cpus // max(1, devices))


def command_line(cmd: TrialCommand, run_dir: Path) -> list[str]:
    bs_threads, edge_threads = threads_for(cmd.cpus, cmd.devices)
    argv = [*entry_point("fedlora-run"), "--run-dir", str(run_dir), "--bench", cmd.bench]
    if cmd.experiment:
        argv += ["--experiment", cmd.experiment]
    argv += [x for s in cmd.sets for x in ("--set", s)]
    argv += [x for s in cmd.bench_sets for x in ("--bench-set", s)]
    return argv + ["--bs-threads", str(bs_threads), "--edge-threads", str(edge_threads)]


def run_trial(cmd: TrialCommand) -> TrialOutcome:
    """Run the experiment to its end in a scratch folder; the outcome carries its kept files or the log's tail."""
    t0 = time.monotonic()
    host = os.uname().nodename
    with tempfile.TemporaryDirectory(prefix=f"fedlora-sweep-{cmd.trial_id}-") as scratch:
        run_dir = Path(scratch) / "run"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(cmd.cpus),
            "MKL_NUM_THREADS": str(cmd.cpus),
            STOP_WITH_PARENT_ENV: str(os.getpid()),  # fedlora-run stops when this worker dies (proto.launch)
            SWEEP_DIR_ENV: cmd.sweep_dir,  # which sweep a process belongs to (tests find their own)
        }
        with subprocess.Popen(
            command_line(cmd, run_dir),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # out of the worker's process group: a group kill must not orphan its children
        ) as proc:
            try:
                output, timed_out = _wait(proc, cmd.timeout_s)
            except BaseException:  # cancelled (KeyboardInterrupt from Ray) or worse: leave no experiment running
                _stop(proc)
                raise
        wall_s = time.monotonic() - t0
        files = {name: (run_dir / name).read_text() for name in KEPT_FILES if (run_dir / name).exists()}
        if timed_out:
            return TrialOutcome(
                cmd.trial_id, False, files, f"stopped after the trial's {cmd.timeout_s:.0f} s limit", wall_s, host
            )
        if proc.returncode != 0 or set(files) != set(KEPT_FILES):
            logs = run_dir / "logs"
            bs_log = (logs / "bs.log").read_text() if (logs / "bs.log").exists() else ""
            tail = "\n".join((output + bs_log).splitlines()[-LOG_TAIL_LINES:])
            missing = sorted(set(KEPT_FILES) - set(files))
            error = f"fedlora-run exited with {proc.returncode}" + (f", missing {missing}" if missing else "")
            return TrialOutcome(cmd.trial_id, False, files, f"{error}\n{tail}", wall_s, host)
        return TrialOutcome(cmd.trial_id, True, files, "", wall_s, host)


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[str, bool]:
    """The run's output, and whether it went past `timeout_s` (then it has been stopped). Waits in short slices
    (communicate keeps what it read between them), so a cancel is taken at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            output, _ = proc.communicate(timeout=WAIT_SLICE_S)
            return output or "", False
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                _stop(proc)
                output, _ = proc.communicate()
                return output or "", True


def _stop(proc: subprocess.Popen) -> None:
    """fedlora-run's own stop: one SIGTERM closes the run, a second kills every child; then make sure."""
    for _ in range(2):
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait()
