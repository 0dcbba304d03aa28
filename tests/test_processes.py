"""Real BS and edge processes over real sockets (tiny model): a run, a killed edge, a rejoin, garbage input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
import zmq

from proto.air import FrameSidecar
from tests.processes import (
    ENV,
    REPO,
    TINY,
    Procs,
    closed_by_peer,
    read_rounds,
    rss_bytes,
    stranger_declaring,
    wait_for,
)
from trust.curve import make_client
from trust.keys import load_key, load_roster

pytestmark = pytest.mark.integration


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.cleanup()


def test_launcher_runs_a_whole_experiment(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launcher.main",
        "--run-dir",
        str(run_dir),
        *TINY,
        "--set",
        "devices.count=3",
        "--set",
        "round.rounds=2",
        "--set",
        "training.local_steps=4",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert [d["device_id"] for d in r["devices"]] == [0, 1, 2]
        for d in r["devices"]:
            assert d["status"] == "ok", d
            assert d["participated"] and d["rank"] == 8
            assert d["uplink_bytes"] >= d["update_bytes"] > 0
            assert d["frames_sent"] >= d["frames_received"] > 0
            assert d["snr_db"] is not None and d["airtime_s"] > 0
            assert d["compute_s"] > 0 and d["energy_j"] == pytest.approx(d["compute_energy_j"] + d["transmit_energy_j"])
    # nearer devices are measured at a higher SNR (10 m vs 35 m: ~19 dB of path loss, fading aside)
    assert rounds[0]["devices"][0]["snr_db"] is not None
    for name in ("experiment.yaml", "bench.yaml", "plot.png", "summary.json", "adapter.pt"):
        assert (run_dir / name).exists(), name
    # the default bench is the GNU Radio FDMA link through the air process, wherever GNU Radio is installed
    has_gnuradio = importlib.util.find_spec("gnuradio") is not None
    assert yaml.safe_load((run_dir / "bench.yaml").read_text())["phy"] == ("gr-zmq-iq" if has_gnuradio else "sim")
    if has_gnuradio:
        assert (run_dir / "logs" / "air.log").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and not summary["stopped_early"]
    origin = json.loads((run_dir / "provenance.json").read_text())  # the code and machine behind the numbers
    assert len(origin["code"]["commit"]) == 40 and origin["packages"]["torch"].startswith("2.13.0")
    assert origin["host"]["cpu_count"] >= 1
    adapter = torch.load(run_dir / "adapter.pt")
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapter.items()), "no update was applied"
    assert "round   2 | accuracy" in out.stdout
    for k in range(3):
        assert "BS ends the run" in (run_dir / "logs" / f"edge-{k}.log").read_text()


def test_killed_edge_is_dropped_at_the_deadline_then_offline(procs, tmp_path):
    """An edge SIGKILLed while training: its round waits for the deadline and closes with the others, and the next
    plan finds it gone (a restarted edge rejoining is tests/test_resume.py's lossy-link test)."""
    run_dir = tmp_path / "run"
    bs, ep = procs.bs(
        run_dir,
        "--set",
        "devices.count=3",
        "--set",
        "round.rounds=3",
        "--set",
        "round.deadline_s=20",
        "--set",
        "training.local_steps=100",
        "--silence-timeout",
        "600",
    )  # only the deadline or the disconnect can drop it
    edges = [procs.edge(ep["control"], k) for k in range(3)]
    wait_for(lambda: "round 2: training" in procs.output("edge1"), 240, "edge 1 training in round 2")
    edges[1].send_signal(signal.SIGKILL)  # edge 1 dies while training
    edges[1].wait()
    assert procs.wait(bs, 400) == 0, procs.output("bs")
    rounds = read_rounds(run_dir)
    assert len(rounds) == 3
    r2 = {d["device_id"]: d for d in rounds[1]["devices"]}
    assert r2[1]["status"] == "timeout", r2[1]
    assert "deadline" in r2[1]["error"]
    assert r2[0]["status"] == "ok" and r2[2]["status"] == "ok"
    assert rounds[1]["wall_s"] >= 20 * 0.95  # the round waited for its deadline, then closed with the others
    # the dead edge is marked offline when the next plan cannot reach it (or is no longer planned)
    r3 = {d["device_id"]: d["status"] for d in rounds[2]["devices"]}
    assert r3.get(1) in (None, "offline") and r3[0] == "ok" and r3[2] == "ok", r3
    assert "edge 1 timeout" in procs.output("bs")


def test_garbage_on_both_sockets_is_logged_and_ignored(procs, tmp_path):
    run_dir = tmp_path / "run"
    bs, ep = procs.bs(
        run_dir, "--set", "devices.count=2", "--set", "round.rounds=2", "--set", "training.local_steps=20"
    )
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)  # holds a provisioned key (strangers are refused before they can say anything)
    rogue.setsockopt(zmq.IDENTITY, b"device-1:rogue")  # in its own key's name (tests/test_trust.py: no other)
    insider = load_key(run_dir / "keys" / "device-1.secret.json", role="device")
    make_client(rogue, insider, load_roster(run_dir / "keys").bs)
    rogue.connect(ep["control"])
    data = ctx.socket(zmq.PUSH)  # the data port, too, takes only the roster's keys
    make_client(data, insider, load_roster(run_dir / "keys").bs)
    data.connect(ep["data"])
    for payload in (
        [b"\x00\xff garbage"],
        [b'{"v": 5, "type": "plan"}'],
        [b"a", b"b", b"c", b"d"],
        [
            json.dumps(
                {"v": 5, "type": "report", "device_id": 1, "round": 1, "status": "ok", "measurements": {}}
            ).encode()
        ],
        # the two messages that once ended the BS: a 5,000-digit int, and update_bytes = 10**400 in a report
        [b'{"v":5,"type":"heartbeat","device_id":1,"state":"x","step":' + b"9" * 5000 + b"}"],
        [
            b'{"v":5,"type":"report","device_id":1,"round":1,"status":"ok","measurements":{"update_bytes":'
            + str(10**400).encode()
            + b"}}"
        ],
    ):
        rogue.send_multipart(payload)
    for payload in ([b"not json", b"\x00" * 40], [b'{"snr_db": 10}', b"FRAME?" * 10], [b"single part"]):
        data.send_multipart(payload)
    # strangers (no key): 16 raw TCP connections each declaring a 256 MiB handshake frame and streaming 4 MiB of
    # it, to the control and the data port: each is closed at the frame's header, and the BS holds none of it
    rss_before = rss_bytes(bs.pid)
    strangers = [stranger_declaring(ep[port], 256 << 20, 4 << 20) for port in ("control", "data") for _ in range(8)]
    assert all(closed_by_peer(conn) for conn in strangers)
    assert rss_bytes(bs.pid) - rss_before < 8 << 20, (rss_before, rss_bytes(bs.pid))
    for k in range(2):
        procs.edge(ep["control"], k)
    wait_for(lambda: len(read_rounds(run_dir)) >= 1, 180, "round 1")
    rogue.send_multipart([b"\xde\xad"])
    data.send_multipart([FrameSidecar(snr_db=12.0).encode(), b"\x46\x4c" + os.urandom(60)])
    assert procs.wait(bs, 300) == 0, procs.output("bs")
    rounds = read_rounds(run_dir)
    assert len(rounds) == 2
    assert all(d["status"] == "ok" for r in rounds for d in r["devices"])
    log = procs.output("bs")
    assert "ignored bad message from peer b'device-1:rogue'" in log
    assert "unregistered peer b'device-1:rogue'" in log
    assert "a number of 5000 digits is too long" in log and "a number of 401 digits is too long" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_frames"] >= 1
    assert summary["control_messages_rejected"]["malformed"] >= 6, summary["control_messages_rejected"]
    rogue.close(0)
    data.close(0)


def test_ctrl_c_stops_every_child_and_keeps_finished_rounds(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launcher.main",
        "--run-dir",
        str(run_dir),
        *TINY,
        "--set",
        "devices.count=2",
        "--set",
        "round.rounds=50",
        "--set",
        "training.local_steps=40",
    ]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(read_rounds(run_dir)) >= 1 or launcher.poll() is not None, 240, "round 1")
        control = json.loads((run_dir / "endpoints.json").read_text())["control"]
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, out
    assert "stopping: asking the BS to close the run" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and 1 <= summary["rounds"] < 50
    assert len(read_rounds(run_dir)) >= summary["rounds"]
    left = subprocess.run(["pgrep", "-f", control], capture_output=True, text=True).stdout.split()
    assert left == [], f"children still running: {left}"
    for k in range(2):
        assert "BS ends the run (stopped)" in (run_dir / "logs" / f"edge-{k}.log").read_text()


@pytest.mark.gnuradio
def test_a_round_over_the_gnuradio_ofdm_loopback(procs, tmp_path):
    pytest.importorskip("gnuradio")
    run_dir = tmp_path / "run"
    bs, ep = procs.bs(
        run_dir,
        "--bench",
        "hw_configs/loopback.yaml",
        "--set",
        "devices.count=2",
        "--set",
        "round.rounds=1",
        "--set",
        "training.local_steps=3",
        "--bench-set",
        "devices=[{distance_m: 10}, {distance_m: 30}]",
    )
    for k in range(2):
        procs.edge(ep["control"], k)
    assert procs.wait(bs, 300) == 0, procs.output("bs")
    (record,) = read_rounds(run_dir)
    near, far = record["devices"]
    assert near["status"] == far["status"] == "ok", record["devices"]
    # the SNR in the record is the OFDM receiver's estimate: the nearer device reads higher
    assert near["snr_db"] > far["snr_db"] + 5
    assert near["frames_received"] == near["frames_sent"] > 0


@pytest.mark.gnuradio
def test_the_online_controller_runs_unchanged_over_the_gnuradio_link(procs, tmp_path):
    """lyapunov over gr-loopback: round 2 is planned from the gains the OFDM receiver's SNR estimates gave."""
    pytest.importorskip("gnuradio")
    run_dir = tmp_path / "run"
    bs, ep = procs.bs(
        run_dir,
        "--bench",
        "hw_configs/loopback.yaml",
        "--set",
        "devices.count=2",
        "--set",
        "round.rounds=2",
        "--set",
        "training.local_steps=2",
        "--set",
        "controller.policy=lyapunov",
        "--bench-set",
        "devices=[{distance_m: 10, energy_budget_j: 1000}, {distance_m: 30}]",
    )
    for k in range(2):
        procs.edge(ep["control"], k)
    assert procs.wait(bs, 400) == 0, procs.output("bs")
    first, second = read_rounds(run_dir)
    measured = {d["device_id"]: d for d in first["devices"] if d["snr_db"] is not None}
    assert measured, first["devices"]
    gains = second["controller"]["gain_db"]
    for k, d in measured.items():  # the gain the BS plans with = measured SNR − power + noise of the share used
        noise_dbm = -174 + 9 + 10 * math.log10(d["bandwidth_hz"])
        assert gains[str(k)] == pytest.approx(d["snr_db"] - d["tx_power_dbm"] + noise_dbm, abs=0.05)
    assert second["controller"]["energy_allowance_j"].keys() == {"0"}  # only device 0 has a budget


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_a_federated_round_of_a_causal_lm_through_the_real_processes(tmp_path, model):
    """Decoders go through the same BS and edge processes as the encoder, as the causal LMs they are (the task in
    prompt form): a Llama with grouped-query attention and GPT-2 with its fused Conv1D attention, one round on
    the sim bench. The update holds LoRA only: no embeddings, no lm_head, no classifier head."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher.main", "--run-dir", str(run_dir), "--bench", "hw_configs/sim.yaml", *TINY]
    cmd += ["--set", f"model.name_or_path={model}", "--set", "model.head=lm", "--set", "model.max_length=32"]
    cmd += ["--set", "model.target_modules=null"]  # the family's own (the default experiment names BERT's)
    cmd += ["--set", "training.max_length=32", "--set", "training.logit_adjustment=0"]
    cmd += ["--set", "devices.count=2", "--set", "round.rounds=1", "--set", "training.local_steps=3"]
    cmd += ["--set", "task.test_size=100"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (record,) = read_rounds(run_dir)
    assert [d["status"] for d in record["devices"]] == ["ok", "ok"]
    assert 0.0 <= record["accuracy"] <= 1.0
    adapter = torch.load(run_dir / "adapter.pt")
    targets = ("q_proj", "v_proj") if model == "tiny-llama" else ("c_attn",)
    assert adapter and all(k.endswith((".lora_A", ".lora_B")) and k.rsplit(".", 2)[-2] in targets for k in adapter)
    assert any(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("lora_B")), "no update was applied"
    values = sum(v.numel() for v in adapter.values())
    assert values * 2 < record["devices"][0]["update_bytes"] < values * 2 + 8192  # fp16 LoRA values and framing
