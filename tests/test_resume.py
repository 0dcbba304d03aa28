"""Checkpoint and resume with real processes (tiny model, sim PHY): the BS is SIGKILLed mid-run and the run goes on
with `fedlora-run --resume`; every round is recorded once, the edges' error feedback continues from their own
checkpoints, and a resume under another configuration is refused naming the key."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from tests.processes import ENV, REPO, TINY, Procs, read_rounds, wait_for

pytestmark = pytest.mark.integration

RUN = [
    sys.executable,
    "-m",
    "launcher.main",
    "--bench",
    str(REPO / "hw_configs" / "sim.yaml"),
    *TINY,
    "--set",
    "devices.count=2",
    "--set",
    "round.rounds=4",
    "--set",
    "training.local_steps=6",
    "--set",
    "codec.sparsifier=topk",
    "--set",
    "controller.keep_fraction=0.25",  # a residual to carry across the crash
]


def _bs_of(launcher: subprocess.Popen) -> psutil.Process:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return next(p for p in children if any("fedlora-bs" in part for part in p.cmdline()))


def test_a_killed_bs_resumes_where_it_left_off(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([*RUN, "--run-dir", str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(read_rounds(run_dir)) >= 2, 300, "round 2 recorded")
        _bs_of(first).send_signal(signal.SIGKILL)  # mid-run: round 3 is planned or training
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    before = read_rounds(run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    resumed_at = checkpoint["next_round"]
    # the record of a round is written before its checkpoint: a kill between them re-runs that round
    assert resumed_at in (len(before), len(before) + 1)
    if resumed_at == len(before) + 1:  # the adapter saved with the last record is the checkpoint's
        adapter = torch.load(run_dir / "adapter.pt")
        assert all(torch.equal(adapter[k], checkpoint["adapter"][k]) for k in adapter)

    # another configuration: refused, naming the key
    out = subprocess.run(
        [*RUN, "--set", "round.rounds=5", "--resume", str(run_dir)], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "experiment.round.rounds: 4 in the checkpoint, 5 now" in (run_dir / "logs" / "bs.log").read_text()

    out = subprocess.run(
        [sys.executable, "-m", "launcher.main", "--resume", str(run_dir)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]  # each once
    assert rounds[: resumed_at - 1] == before[: resumed_at - 1]  # the closed rounds are kept as they were
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at_round"] == resumed_at and summary["rounds"] == 4
    assert f"resumed run {checkpoint['run_id']} at round {resumed_at}" in out.stdout
    for k in range(2):
        log = (run_dir / "logs" / f"edge-{k}.log").read_text()
        restored = re.search(r"restored error feedback of round (\d+): residual norm ([0-9.e+-]+)", log)
        assert restored, log[-2000:]
        held_round, norm = int(restored.group(1)), float(restored.group(2))
        if held_round < resumed_at:  # its last update was in a closed round: the residual goes on from it
            recorded = next(d for d in before[held_round - 1]["devices"] if d["device_id"] == k)
            assert norm == pytest.approx(recorded["residual_norm"], rel=1e-5)
        else:  # it had sent in the round the crash cut short: that update is folded back, not lost
            assert "never closed" in log
        assert norm > 0
    assert all(d["status"] == "ok" for r in rounds for d in r["devices"])


def test_edges_that_survive_a_bs_crash_rejoin_the_resumed_run(tmp_path):
    """Multi-host style: the BS and the edges are separate processes; the BS is SIGKILLed and started again with
    --resume (same run id, and the ports the edges know); the same edge processes register again by themselves
    and keep their data, model and residuals (nothing to restore: they never stopped)."""
    procs = Procs(tmp_path)
    sets = ["--set", "devices.count=2", "--set", "round.rounds=4", "--set", "training.local_steps=6"]
    sets += ["--set", "codec.sparsifier=topk", "--set", "controller.keep_fraction=0.25"]
    run_dir = tmp_path / "run"
    try:
        bs, ep = procs.bs(run_dir, *sets)
        edges = [procs.edge(ep["control"], k) for k in range(2)]
        wait_for(lambda: len(read_rounds(run_dir)) >= 2, 300, "round 2 recorded")
        bs.kill()
        bs.wait()
        (run_dir / "endpoints.json").unlink()
        resumed, ep2 = procs.bs(run_dir, "--resume", *sets)
        assert ep2["control"] == ep["control"]  # the address the edges know
        assert resumed.wait(timeout=300) == 0, procs.output("bs")
        assert [e.wait(timeout=60) for e in edges] == [0, 0]  # the same processes, ended by the resumed run
        assert [r["round"] for r in read_rounds(run_dir)] == [1, 2, 3, 4]
        for k in range(2):
            assert "not registered with this BS run" in procs.output(f"edge{k}")
            assert "restored error feedback" not in procs.output(f"edge{k}")
        assert all(d["status"] == "ok" for r in read_rounds(run_dir)[2:] for d in r["devices"])
    finally:
        procs.cleanup()
