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
from safetensors.torch import load as load_tensors

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
    document = json.loads((run_dir / "checkpoint.json").read_text())["document"]
    resumed_at = document["next_round"]
    # the record of a round is written before its checkpoint: a kill between them re-runs that round
    assert resumed_at in (len(before), len(before) + 1)
    if resumed_at == len(before) + 1:  # the adapter saved with the last record is the checkpoint's
        adapter = torch.load(run_dir / "adapter.pt")
        saved = load_tensors((run_dir / document["tensors"]["file"]).read_bytes())
        assert all(torch.equal(adapter[k], saved[f"adapter/{k}"]) for k in adapter)

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
    assert f"resumed run {document['run_id']} at round {resumed_at}" in out.stdout
    for k in range(2):
        log = (run_dir / "logs" / f"edge-{k}.log").read_text()
        restored = re.search(r"restored error feedback of round (\d+): residual norm ([0-9.e+-]+)", log)
        assert restored, log[-2000:]
        held_round, norm = int(restored.group(1)), float(restored.group(2))
        if held_round < resumed_at:  # its last update was in a closed round: the residual goes on from it
            recorded = next(d for d in before[held_round - 1]["devices"] if d["device_id"] == k)
            assert norm == pytest.approx(recorded["residual_norm"], rel=1e-5)
        else:  # it had sent in the round the crash cut short: rolled back to before it, trained afresh
            assert "never closed; rolled back" in log
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


def _bench_sets_for_frame_loss(per_target: float) -> list[str]:
    """Bench overrides that make the sim link lose about per_target of the 1,000-byte frames of devices at 20 m
    (no fading, full power) when three share the band equally (with two, each share is wider, its noise 1.8 dB
    higher: about 75 % are lost); the path loss is moved until the true curve says so."""
    from config import load_bench
    from phy.channel import DeviceGeometry, PerCurve, SimChannel, TxSetting

    sets = ["channel.fading=none", "devices=[{distance_m: 20}, {distance_m: 20}, {distance_m: 20}]"]
    bench = load_bench(REPO / "hw_configs" / "sim.yaml", sets)
    setting = TxSetting(bench.radio.max_tx_power_dbm, bench.radio.total_bandwidth_hz / 3, "qpsk")
    snr_db = SimChannel(bench.channel, seed=0).snr_db(DeviceGeometry(0, 20.0), 1, setting)
    curve = PerCurve.for_sim_link(bench)
    target = next(s / 10 for s in range(400, -100, -1) if curve.per(s / 10, "qpsk", 1038) >= per_target)
    # 8 attempts: a frame is still missing after them with probability 0.3^8, so every update gets through
    return [*sets, f"channel.ref_loss_db={bench.channel.ref_loss_db + snr_db - target:.2f}", "arq.max_attempts=8"]


def test_a_lossy_link_and_an_edge_killed_mid_run_lose_no_finished_round(tmp_path):
    """30 % of the frames lost on the air (ARQ resends them), and one edge SIGKILLed while the run goes on and
    started anew with its state folder: every round closes, the others' updates are aggregated every round, the
    losses are in the records, and the restarted edge takes part again with the residual it had saved."""
    procs = Procs(tmp_path)
    run_dir = tmp_path / "run"
    bench_sets = [x for s in _bench_sets_for_frame_loss(0.3) for x in ("--bench-set", s)]
    sets = ["--set", "devices.count=3", "--set", "round.rounds=8", "--set", "training.local_steps=100"]
    sets += ["--set", "round.deadline_s=60", "--set", "codec.sparsifier=topk", "--set", "controller.keep_fraction=0.5"]
    try:
        bs, ep = procs.bs(run_dir, "--bench", str(REPO / "hw_configs" / "sim.yaml"), *bench_sets, *sets)
        state = ["--state-dir", str(tmp_path / "edge-state")]
        edges = [
            procs.start(
                f"edge{k}",
                [
                    "fedlora-edge",
                    "--bs",
                    ep["control"],
                    "--device-id",
                    str(k),
                    "--key",
                    str(run_dir / "keys" / f"device-{k}.secret.json"),
                    *state,
                ],
            )
            for k in range(3)
        ]
        sending = re.compile(r"edge 2: round ([2-9]): sending")
        in_uplink = wait_for(lambda: sending.search(procs.output("edge2")), 300, "edge 2 sending in round 2 or later")
        edges[2].kill()  # SIGKILL, as soon as its log says the frames are going out
        edges[2].wait()
        print("edge 2 killed while sending in round", in_uplink.group(1))
        procs.start(
            "edge2-again",
            [
                "fedlora-edge",
                "--bs",
                ep["control"],
                "--device-id",
                "2",
                "--key",
                str(run_dir / "keys" / "device-2.secret.json"),
                *state,
            ],
        )
        assert bs.wait(timeout=400) == 0, procs.output("bs")
    finally:
        procs.cleanup()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, 9))
    full = [r for r in rounds if len(r["devices"]) == 3 and all(d["participated"] for d in r["devices"])]
    assert len(full) >= 4, [len(r["devices"]) for r in rounds]
    for r in rounds:  # a round with the third device away is harder (wider shares): its updates may not get through
        rows = {d["device_id"]: d for d in r["devices"]}
        assert {rows[0]["status"], rows[1]["status"]} <= ({"ok"} if r in full else {"ok", "undelivered"}), rows
    sent = sum(d["frames_sent"] for r in full for d in r["devices"])
    lost = sum(d["frames_lost"] for r in full for d in r["devices"])
    assert 0.15 < lost / sent < 0.45, (lost, sent)  # about 30 % lost on the air, recovered by ARQ
    assert any(d["arq_attempts"] > 1 for r in rounds for d in r["devices"])
    assert {d["device_id"]: d["status"] for d in rounds[-1]["devices"]}.get(2) == "ok"  # the restarted edge is back
    assert "edge 2 re-registered" in procs.output("bs")
    again = procs.output("edge2-again")
    assert "restored error feedback" in again, again[-2000:]
