"""Whole runs of the BS's round state machine against an in-memory transport on a fake clock (tiny model): every
way a device's round can end, the records, the summary and the start-up rules."""

from __future__ import annotations

import json

import pytest

from bs_node.rounds import FromEdge, StartupError
from proto.control import AGGREGATED_WINDOW_ROUNDS, Ack, Bye, Measurements, Plan, Shutdown
from tests.bs_fakes import make_station, sends_update

DEADLINE_S = 60.0


def test_rounds_with_every_outcome_are_recorded(tmp_path):
    bs = make_station(tmp_path / "run", [f"round.deadline_s={DEADLINE_S}"], silence_timeout_s=30.0)
    t = bs.transport
    measured = Measurements(energy_j=2.0, frames_sent=9, airtime_s=0.5, train_loss=0.7, true_snr_db=-2.5)
    t.join(0, sends_update(t, 0, 0.01, measurements=measured, snr_db=-3.0))  # reports
    t.join(1)  # takes its plan and never answers (but stays connected and heard)
    t.join(2, sends_update(t, 2, 0.01, report=None))  # its frames arrive, its report never does
    t.join(3, sends_update(t, 3, 0.01, wrong_shape=True))  # a bad update

    bs.runner.wait_for_devices()
    first = bs.runner.run_round(1)

    rows = {d.device_id: d for d in first.devices}
    assert {k: r.status for k, r in rows.items()} == {0: "ok", 1: "timeout", 2: "ok", 3: "bad_update"}
    assert rows[0].energy_j == 2.0 and rows[0].true_snr_db == -2.5 and rows[0].snr_db == pytest.approx(-3.0)
    assert rows[1].error == f"no report before the {DEADLINE_S:.0f} s deadline" and rows[1].frames_received == 0
    assert "no report" in rows[2].error and rows[2].energy_j == 0.0  # aggregated, but nothing measured
    assert first.wall_s == pytest.approx(DEADLINE_S)  # waited for device 1 until the deadline
    assert "round 1: edge 1 timeout: no report before the 60 s deadline" in bs.view_text
    assert "round 1: edge 3 sent a bad update" in bs.view_text
    assert t.round_starts[0] == (1, {k: pytest.approx(2.5e5) for k in range(4)})  # equal FDMA shares of 1 MHz

    # round 2: device 1 hangs after its plan, device 2 leaves the run, device 3's process is gone
    def hangs(plan: Plan, attachment: bytes | None) -> None:
        t.edges[1].silent_from = bs.clock()

    def leaves(plan: Plan, attachment: bytes | None) -> None:
        t.deliver(FromEdge(2, Bye(device_id=2, reason="stopped")), 1.0)

    t.behaviours.update({1: hangs, 2: leaves})
    t.edges[3].connected = False
    second = bs.runner.run_round(2)

    rows = {d.device_id: d for d in second.devices}
    assert {k: r.status for k, r in rows.items()} == {0: "ok", 1: "dropped", 2: "dropped", 3: "offline"}
    assert rows[1].error.startswith("silent for 3")  # the 30 s silence timeout, not the 60 s deadline
    assert rows[2].error == "left the run (stopped)"
    assert rows[3].error == "disconnected" and not t.sent_to(3, Plan)[1:]
    assert second.wall_s == pytest.approx(31.0, abs=1.0)  # settled once device 1 was silent too long
    assert "round 2: edge 1 dropped (silent for" in bs.view_text

    lines = [json.loads(line) for line in (bs.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert [d["status"] for d in lines[1]["devices"]] == ["ok", "dropped", "dropped", "offline"]
    assert lines[0]["devices"][0]["true_snr_db"] == -2.5 and lines[0]["devices"][1]["true_snr_db"] is None
    assert lines[0]["devices"][0]["snr_db"] == pytest.approx(-3.0)
    assert (bs.run_dir / "adapter.pt").exists()


def test_run_writes_the_summary_and_tells_the_edges_to_leave(tmp_path):
    bs = make_station(tmp_path / "run", ["devices.count=2", "round.rounds=2"])
    t = bs.transport
    for k in range(2):
        t.join(k, sends_update(t, k, 0.01), after_s=5.0)  # they come up while the BS waits
    summary = bs.runner.run()
    assert summary["rounds"] == 2 and not summary["stopped_early"] and summary["bad_frames"] == 0
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and summary["run_id"] == "test"
    assert summary["total_uplink_bytes"] == 0  # the scripted edges measured no airtime or bytes
    assert json.loads((bs.run_dir / "summary.json").read_text())["rounds"] == 2
    assert len((bs.run_dir / "rounds.jsonl").read_text().splitlines()) == 2
    assert t.broadcasts == [Shutdown(reason="run complete")]
    assert all(len(t.sent_to(k, Ack)) == 2 for k in range(2))
    assert "round   0 | accuracy" in bs.view_text and "2 edge(s) ready: 0@host, 1@host" in bs.view_text
    # validation (the devices' held-out parts) beside the test set, in the records, the summary and the view
    lines = [json.loads(line) for line in (bs.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in lines)
    assert summary["final_val_accuracy"] == lines[-1]["val_accuracy"] and 0.0 <= summary["initial_val_accuracy"] <= 1
    assert f"validation {summary['final_val_accuracy'] * 100:.1f} %" in bs.view_text


def test_without_a_holdout_validation_is_none_and_the_view_says_so(tmp_path):
    bs = make_station(tmp_path / "run", ["devices.count=1", "round.rounds=1", "devices.validation_fraction=0"])
    bs.transport.join(0, sends_update(bs.transport, 0, 0.01))
    summary = bs.runner.run()
    record = json.loads((bs.run_dir / "rounds.jsonl").read_text())
    assert record["val_accuracy"] is None and record["val_loss"] is None and record["accuracy"] is not None
    assert summary["initial_val_accuracy"] is None and summary["final_val_accuracy"] is None
    assert "round   1 | accuracy" in bs.view_text and "| validation n/a |" in bs.view_text


def test_startup_waits_for_min_devices_then_gives_up(tmp_path):
    bs = make_station(tmp_path / "a", ["devices.count=2", "round.rounds=1", "round.startup_timeout_s=20"])
    bs.transport.join(0, sends_update(bs.transport, 0, 0.01))
    summary = bs.runner.run()  # min_devices = 1: starts with the one it has after the start-up timeout
    assert summary["rounds"] == 1 and "startup timeout: starting with 1 of 2 edges" in bs.view_text

    bs = make_station(tmp_path / "b", ["devices.count=2", "round.min_devices=2", "round.startup_timeout_s=20"])
    bs.transport.join(0)
    with pytest.raises(StartupError, match="only 1 of 2 edges ready"):
        bs.runner.run()
    assert json.loads((bs.run_dir / "summary.json").read_text())["rounds"] == 0  # written anyway
    assert bs.transport.broadcasts == [Shutdown(reason="run complete")]


def test_stop_closes_the_round_in_progress(tmp_path):
    bs = make_station(tmp_path / "run", ["devices.count=1", "round.rounds=5"])
    t = bs.transport

    def stop_after_plan(plan: Plan, attachment: bytes | None) -> None:
        bs.runner.stop()  # Ctrl-C while the round runs

    t.join(0, stop_after_plan)
    summary = bs.runner.run()
    assert summary["rounds"] == 1 and summary["stopped_early"]
    (line,) = (bs.run_dir / "rounds.jsonl").read_text().splitlines()
    assert json.loads(line)["devices"][0]["status"] == "timeout"
    assert t.broadcasts == [Shutdown(reason="stopped")]


def test_each_plan_tells_the_device_which_of_its_updates_were_aggregated(tmp_path):
    """Plan.aggregated_rounds: fresh updates that went into a step; not a lost, bad or unstepped one, and a stale
    reuse adds nothing. Every device hears it each round, with the whole window."""
    bs = make_station(tmp_path / "run", ["devices.count=3", "round.stale_rounds=2"])
    t = bs.transport
    for k in range(3):
        t.join(k, sends_update(t, k, 0.01))
    bs.runner.wait_for_devices()

    def verdicts(r: int) -> dict[int, list[int] | None]:
        plans = {k: [p for p in t.sent_to(k, Plan) if isinstance(p, Plan) and p.round == r] for k in range(3)}
        assert all(len(p) == 1 for p in plans.values())  # one plan per device and round
        return {k: p[0].aggregated_rounds for k, p in plans.items()}

    bs.runner.run_round(1)
    assert verdicts(1) == {0: [], 1: [], 2: []}
    t.behaviours[1] = sends_update(t, 1, 0.01, drop_last=True, report="undelivered")  # lost: its round 1 is reused
    t.behaviours[2] = sends_update(t, 2, 0.01, wrong_shape=True)  # arrives, but bad
    second = bs.runner.run_round(2)
    assert second.stale_updates == {1: 1, 2: 1}
    for k in (1, 2):
        t.behaviours[k] = sends_update(t, k, 0.01)
    third = bs.runner.run_round(3)
    assert {d.device_id: d.status for d in third.devices} == {0: "ok", 1: "ok", 2: "ok"}
    assert verdicts(2) == {0: [1], 1: [1], 2: [1]}
    assert verdicts(3) == {0: [1, 2], 1: [1], 2: [1]}  # the stale reuse of round 1 in round 2 adds nothing

    def fails(updates, absent, capabilities):
        raise RuntimeError("no step")

    bs.model.aggregate = fails  # round 4 closes without a step: none of its updates counts as aggregated
    bs.runner.run_round(4)
    bs.runner.run_round(5)
    assert verdicts(4) == verdicts(5) == {0: [1, 2, 3], 1: [1, 3], 2: [1, 3]}


def test_the_verdict_covers_a_window_of_rounds(tmp_path):
    closer = make_station(tmp_path / "run").runner.closer
    for r in range(1, 21):
        closer._note_aggregated(r, {0: None} if r % 2 else {0: None, 1: None})
    assert closer.aggregated_rounds(0, 21) == list(range(21 - AGGREGATED_WINDOW_ROUNDS, 21))
    assert closer.aggregated_rounds(1, 21) == list(range(6, 21, 2)) and closer.aggregated_rounds(2, 21) == []
    assert closer.aggregated_rounds(0, 10) == list(range(5, 10))  # only rounds before the plan's (1..4 forgotten)
    assert all(len(v) <= AGGREGATED_WINDOW_ROUNDS for v in closer.aggregated.values())


def test_a_radio_phy_carriers_go_into_the_plans_and_its_counts_into_the_records(tmp_path):
    """On a radio bench the uplink says where each device transmits this round (phy.rf lays the shares out as the
    air does): the BS puts that carrier in the device's plan; the BS radio's overruns and each edge radio's
    underruns land in the round's rows. Other PHYs give no carrier and the rows say None."""
    bs = make_station(tmp_path / "run", [f"round.deadline_s={DEADLINE_S}"])
    t = bs.transport
    t.carriers_hz = {0: 2.4499e9, 1: 2.4501e9}
    t.overruns = 3
    t.join(0, sends_update(t, 0, 0.01, measurements=Measurements(radio_underruns=2)))
    t.join(1, sends_update(t, 1, 0.01))
    bs.runner.wait_for_devices()
    record = bs.runner.run_round(1)
    assert [p.center_freq_hz for p in (t.sent_to(0, Plan)[0], t.sent_to(1, Plan)[0])] == [2.4499e9, 2.4501e9]
    rows = {d.device_id: d for d in record.devices}
    assert (rows[0].radio_underruns, rows[1].radio_underruns) == (2, None)
    assert rows[0].radio_overruns == rows[1].radio_overruns == 3
    t.carriers_hz, t.overruns = {}, None
    second = bs.runner.run_round(2)
    assert all(p.center_freq_hz is None for p in t.sent_to(0, Plan)[1:])
    assert all(d.radio_overruns is None for d in second.devices)
