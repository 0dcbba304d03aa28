"""A round the BS re-runs after a resume counts each device's update once (issue 24, item 4), without sockets:
the edge rolls its error feedback back to before the interrupted round and trains it afresh, so what it sends in
the re-run round is what it sent the first time (not folded back *and* retrained: 2x); its state file is data
(safetensors + JSON, 0600) and a torn or poisoned one is refused; the resumed BS's verdicts come from the
checkpoint."""

from __future__ import annotations

import stat

import pytest
import torch

from bs_node.checkpoint import load
from edge_node.round import settle_feedback
from edge_node.state import load_state, save_state, state_path
from fedlora.lora import ModuleSpec
from fedlora.sparsify import make_sparsifier
from proto.control import Plan
from tests.bs_fakes import make_station, sends_update

KEY_A = "bert.encoder.layer.0.attention.self.query.lora_A"
KEY_B = "bert.encoder.layer.0.attention.self.query.lora_B"
SPEC = ModuleSpec(4, 1)


def _plan(round_idx: int, aggregated: list[int]) -> Plan:
    return Plan(
        round=round_idx,
        deadline_s=10.0,
        participate=True,
        rank=SPEC.rank,
        depth=SPEC.depth,
        tx_power_dbm=10.0,
        bandwidth_hz=1e6,
        modulation="qpsk",
        keep_fraction=0.5,
        local_steps=1,
        aggregated_rounds=aggregated,
    )


def _delta(round_idx: int) -> dict[str, torch.Tensor]:
    """What training from the same view with the round's seed gives: the same delta every time."""
    g = torch.Generator().manual_seed(round_idx)
    return {KEY_A: torch.randn(4, 8, generator=g), KEY_B: torch.randn(8, 4, generator=g)}


def _round(sp, round_idx: int, aggregated: list[int]) -> dict[str, torch.Tensor]:
    """One edge round as EdgeRounds runs it: settle the plan's verdicts, then sparsify the fresh delta."""
    settle_feedback(sp, _plan(round_idx, aggregated), device_id=0)
    delta = _delta(round_idx)
    return sp.sparsify(delta, delta, SPEC, 0.5, round_idx=round_idx).delta


@pytest.mark.parametrize("name", ["topk", "dense_fp32"])
def test_a_round_re_run_after_a_resume_sends_the_update_once(name, tmp_path):
    uninterrupted = make_sparsifier(name, seed=0, device_id=0)
    _round(uninterrupted, 1, [])
    sent = _round(uninterrupted, 2, [1])  # the round-2 update the BS aggregates when nothing crashes

    crashed = make_sparsifier(name, seed=0, device_id=0)
    _round(crashed, 1, [])
    first = _round(crashed, 2, [1])  # sent; then the BS dies with round 1's checkpoint, before round 2 closed
    assert all(torch.equal(first[k], sent[k]) for k in sent)
    path = state_path(tmp_path, 0)  # the edge dies too, and is started anew from its state file
    save_state(path, run_id="r", device_id=0, round_idx=2, sparsifier=crashed.state_dict())
    restarted = make_sparsifier(name, seed=0, device_id=0)
    saved = load_state(path, run_id="r", device_id=0)
    assert saved is not None
    restarted.load_state_dict(saved["sparsifier"])

    again = _round(restarted, 2, [1])  # the resumed BS plans round 2 again, with the checkpoint's verdicts
    for k in sent:  # the same update, not 2x (fold back + retrain, before the rollback)
        torch.testing.assert_close(again[k], sent[k], rtol=1e-6, atol=1e-7)
    assert restarted.feedback.norm() == pytest.approx(uninterrupted.feedback.norm(), rel=1e-6, abs=1e-9)
    assert set(restarted.feedback.pending) == {2}


def test_a_lost_round_is_still_folded_back_once():
    sp = make_sparsifier("dense_fp32", seed=0, device_id=0)
    lost = _round(sp, 1, [])
    second = _round(sp, 2, [])  # round 1 closed without this device's update: it goes out with round 2
    for k in lost:
        torch.testing.assert_close(second[k], lost[k] + _delta(2)[k])


def test_the_state_file_is_private_data_and_a_bad_one_is_ignored(tmp_path, caplog):
    sp = make_sparsifier("topk", seed=0, device_id=0)
    _round(sp, 1, [])
    path = state_path(tmp_path, 0)
    save_state(path, run_id="r", device_id=0, round_idx=1, sparsifier=sp.state_dict())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # not a torch zip (pickle inside)
    assert load_state(path, run_id="other", device_id=0) is None
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn
    assert load_state(path, run_id="r", device_id=0) is None
    assert "cannot be used" in caplog.text
    poisoned = dict(sp.state_dict())
    poisoned["residual"] = {k: torch.full_like(v, float("nan")) for k, v in poisoned["residual"].items()}
    save_state(path, run_id="r", device_id=0, round_idx=1, sparsifier=poisoned)
    assert load_state(path, run_id="r", device_id=0) is None
    assert "not finite" in caplog.text


def test_the_resumed_bs_tells_each_device_the_checkpoints_verdicts(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["round.rounds=3", "devices.count=2"]
    bs = make_station(run_dir, overrides)
    t = bs.transport
    t.join(0, sends_update(t, 0, 0.01))
    t.join(1, sends_update(t, 1, 0.02))
    bs.runner._start()
    bs.runner.wait_for_devices()
    for r in (1, 2):
        bs.runner.run_round(r)
    checkpoint = load(run_dir, bs.runner.exp, bs.runner.bench)
    again = make_station(run_dir, overrides)
    again.runner.resume_from = checkpoint
    t2 = again.transport
    t2.join(0, sends_update(t2, 0, 0.01))
    t2.join(1, sends_update(t2, 1, 0.02))
    again.runner.run()
    for device in (0, 1):
        resumed = [p for p in t2.sent_to(device, Plan) if p.round == 3]
        assert resumed and resumed[0].aggregated_rounds == [1, 2]  # as the uninterrupted BS would have said


@pytest.mark.integration
def test_a_bs_killed_after_the_edges_sent_resumes_counting_the_round_once(tmp_path):
    """Real processes (tiny model, sim PHY): the BS is SIGKILLed after round 1's checkpoint, once both edges have
    held (edge 0 also sent) their round-2 update; the edges die too and are started anew from their state files
    beside a resumed BS. What each sends in the re-run round 2 equals what it sent the first time (the update of
    the uninterrupted run), not 2x. Edge 1 emulates slow hardware so that the BS is still waiting for it."""
    import shutil
    import signal

    from edge_node.state import read_state
    from tests.processes import REPO, Procs, read_rounds, wait_for

    procs = Procs(tmp_path)
    run_dir, state_dir = tmp_path / "run", tmp_path / "edge-state"
    sets = ["--bench", str(REPO / "hw_configs" / "sim.yaml"), "--set", "devices.count=2", "--set", "round.rounds=2"]
    sets += ["--set", "training.local_steps=6", "--set", "codec.sparsifier=topk", "--set", "controller.policy=fixed"]
    sets += ["--set", "controller.keep_fraction=0.25", "--set", "round.deadline_s=120"]
    sets += ["--bench-set", "devices=[{distance_m: 10}, {distance_m: 20, compute_speed: 0.1}]"]

    def edges(name: str) -> list:
        return [
            procs.start(
                f"{name}{k}",
                ["fedlora-edge", "--bs", endpoints["control"], "--device-id", str(k), "--state-dir", str(state_dir)]
                + ["--key", str(run_dir / "keys" / f"device-{k}.secret.json")],
            )
            for k in range(2)
        ]

    def held(k: int) -> int:
        path = state_dir / f"edge-{k}.safetensors"
        return read_state(path)[0]["round"] if path.exists() else 0

    try:
        bs, endpoints = procs.bs(run_dir, *sets)
        first = edges("edge")
        wait_for(lambda: held(0) == 2 and held(1) == 2 and "round 2: sending" in procs.output("edge0"), 300, "sent")
        bs.send_signal(signal.SIGKILL)
        bs.wait()
        for e in first:
            e.kill()
            e.wait()
        assert [r["round"] for r in read_rounds(run_dir)] == [1]  # the kill landed before round 2 closed
        sent = {k: read_state(state_dir / f"edge-{k}.safetensors")[1]["pending"][2] for k in range(2)}
        shutil.copytree(state_dir, tmp_path / "state-at-kill")
        (run_dir / "endpoints.json").unlink()
        resumed, endpoints = procs.bs(run_dir, "--resume", *sets)
        edges("again")
        assert resumed.wait(timeout=300) == 0, procs.output("bs")
    finally:
        procs.cleanup()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(d["status"] == "ok" for r in rounds for d in r["devices"])
    for k in range(2):
        assert "never closed; rolled back" in procs.output(f"again{k}")
        again = read_state(state_dir / f"edge-{k}.safetensors")[1]["pending"][2]
        for key in sent[k]:  # the re-run round's update is the first one (fold back + retrain sent 2x)
            torch.testing.assert_close(again[key], sent[k][key], rtol=1e-4, atol=1e-6)
