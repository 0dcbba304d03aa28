"""Updates a foreign or faulty edge can send, through the BS's real receive path (frames, reassembly, decode,
check, aggregate; in-memory transport, fake clock, tiny model): a bad one is that device's `bad_update`, never the
round's; it is not kept for stale reuse; and if aggregation fails anyway the round closes without a step and the
run goes on."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch

from bs_node.controllers import Controller, DevicePlan, RoundState
from bs_node.controllers.fixed import FixedController
from bs_node.rounds import FrameReceived, FromEdge
from proto.codec import DecodedUpdate, decode_update, encode_update
from proto.control import BurstEnd, Measurements, Plan, Report
from proto.framing import fragment
from tests.bs_fakes import MemoryTransport, Station, frame_key_of, make_station, sends_update
from tests.fuzz_updates import hostile_update
from trust.sealing import FrameSealer

MakePayload = Callable[[Plan, DecodedUpdate], bytes]
HEAD_BIAS = "head.classifier.bias"


class FirstRoundOnly(Controller):
    """The fixed policy, but device 1 takes part in round 1 only (so its update could be reused as stale)."""

    name = "first_round_only"

    def decide(self, state: RoundState) -> dict[int, DevicePlan]:
        plans = FixedController(self.experiment, self.bench).decide(state)
        return {d: dataclasses.replace(p, participate=d != 1 or state.round_idx == 1) for d, p in plans.items()}


def sends_payload(
    transport: MemoryTransport, device_id: int, make: MakePayload
) -> Callable[[Plan, bytes | None], None]:
    """An edge that answers a plan with the bytes `make` builds from the view, in frames, a burst_end and a report."""

    def on_plan(plan: Plan, attachment: bytes | None) -> None:
        if not plan.participate:
            return
        assert attachment is not None
        frames = fragment(make(plan, decode_update(attachment)), device_id, plan.round, 500)
        sealer = FrameSealer(frame_key_of(device_id), device_id)  # as a registered edge seals them
        for frame in frames:
            transport.deliver(FrameReceived(sealer.seal(frame, 1), 20.0), 1.0)
        seqs = list(range(len(frames)))
        burst = BurstEnd(device_id=device_id, round=plan.round, attempt=1, seqs=seqs, total=len(frames))
        transport.deliver(FromEdge(device_id, burst), 1.0)
        report = Report(device_id=device_id, round=plan.round, status="ok", measurements=Measurements(energy_j=1.0))
        transport.deliver(FromEdge(device_id, report), 2.0)

    return on_plan


def _delta(view: DecodedUpdate, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in view.state.items()}


def _one_factor_masked(plan: Plan, view: DecodedUpdate) -> bytes:
    a = next(k for k in view.state if k.endswith(".lora_A"))
    mask = torch.zeros(plan.rank, dtype=torch.bool)
    mask[0] = True
    return hostile_update(_delta(view, 0.03), spec=view.spec, round_idx=plan.round, device_id=1, masks={a: mask})


def _wrong_shape(plan: Plan, view: DecodedUpdate) -> bytes:
    delta = _delta(view, 0.03)
    delta[HEAD_BIAS] = torch.zeros(delta[HEAD_BIAS].numel() + 1)
    return encode_update(delta, spec=view.spec, round_idx=plan.round, device_id=1, dtype="fp32")


def _nan(plan: Plan, view: DecodedUpdate) -> bytes:
    delta = _delta(view, 0.03)
    delta[HEAD_BIAS][0] = float("nan")
    return hostile_update(delta, spec=view.spec, round_idx=plan.round, device_id=1)


def _huge(plan: Plan, view: DecodedUpdate) -> bytes:
    """Finite in fp32, but the adapter plus it is beyond what the downlink dtype (fp16 here) can carry."""
    delta = _delta(view, 0.03)
    delta[HEAD_BIAS][0] = 1.0e5
    return encode_update(delta, spec=view.spec, round_idx=plan.round, device_id=1, dtype="fp32")


@pytest.mark.parametrize(
    ("make", "overrides", "error"),
    [
        (_one_factor_masked, (), r"lora_A is sent by kept components but lora_B whole .* must be coded alike"),
        (_wrong_shape, (), rf"{HEAD_BIAS}: shape \(3,\) does not match the expected \(2,\)"),
        (_nan, (), rf"{HEAD_BIAS}: contains NaN or Inf"),
        (
            _huge,
            ("codec.downlink_dtype=fp16",),
            rf"key '{HEAD_BIAS}': the global adapter plus this update exceeds 65504",
        ),
    ],
    ids=["one_factor_masked", "wrong_shape", "nan", "beyond_the_downlink_range"],
)
def test_a_bad_update_is_the_devices_failure_and_never_reused(tmp_path, make, overrides, error):
    bs = _station(tmp_path, overrides)
    t = bs.transport
    t.join(0, sends_update(t, 0, {1: 0.01, 2: 0.02}))
    t.join(1, sends_payload(t, 1, make))
    bs.runner.wait_for_devices()
    w0, w1 = (float(bs.model.examples(k)) for k in range(2))

    before = _snapshot(bs)
    first = bs.runner.run_round(1)
    rows = {d.device_id: d for d in first.devices}
    assert (rows[0].status, rows[1].status) == ("ok", "bad_update")
    assert rows[1].error and "\n" not in rows[1].error
    assert re.search(error, rows[1].error), rows[1].error
    assert f"round 1: edge 1 sent a bad update: {rows[1].error}" in bs.view_text
    _assert_stepped(bs, before, 0.01 * w0 / (w0 + w1))  # device 0 aggregated; device 1 counts as a zero update
    assert 1 not in bs.runner.closer.latest_updates

    before = _snapshot(bs)
    second = bs.runner.run_round(2)  # device 1 sits out: its bad update of round 1 must not stand in for it
    assert second.stale_updates == {} and second.devices[1].status == "not_selected"
    _assert_stepped(bs, before, 0.02 * w0 / (w0 + w1))


def test_modules_coded_differently_from_each_other_are_aggregated(tmp_path):
    """One module by components, the others whole: valid; the module's unsent components are zero updates."""
    bs = _station(tmp_path, ())
    t = bs.transport
    masked: list[str] = []

    def one_module_by_components(plan: Plan, view: DecodedUpdate) -> bytes:
        path = next(k for k in view.state if k.endswith(".lora_A")).removesuffix(".lora_A")
        masked.append(path)
        kept = {path: torch.arange(plan.rank) == 0}
        return encode_update(_delta(view, 0.03), spec=view.spec, round_idx=plan.round, device_id=1, kept=kept)

    t.join(0, sends_update(t, 0, 0.01))
    t.join(1, sends_payload(t, 1, one_module_by_components))
    bs.runner.wait_for_devices()
    w0, w1 = (float(bs.model.examples(k)) for k in range(2))
    before = _snapshot(bs)
    record = bs.runner.run_round(1)
    assert [d.status for d in record.devices] == ["ok", "ok"]
    both = (w0 * 0.01 + w1 * 0.03) / (w0 + w1)
    a = masked[0] + ".lora_A"
    state = bs.model.adapter.state
    torch.testing.assert_close(state[a][0], before[a][0] + both, rtol=1e-3, atol=1e-4)  # fp16 uplink
    alone = w0 * 0.01 / (w0 + w1)  # device 1 kept them back: zero updates of its weight
    torch.testing.assert_close(state[a][1:], before[a][1:] + alone, rtol=1e-3, atol=1e-4)
    other = next(k for k in state if k.endswith(".lora_A") and k != a)
    torch.testing.assert_close(state[other], before[other] + both, rtol=1e-3, atol=1e-4)  # whole: all voted


def test_if_aggregation_still_fails_the_round_closes_without_a_step_and_the_run_goes_on(tmp_path, monkeypatch):
    bs = _station(tmp_path, ("round.stale_rounds=2",))
    t = bs.transport
    t.join(0, sends_update(t, 0, {1: 0.01, 2: 0.02, 3: 0.04}))
    t.join(1, sends_update(t, 1, {1: 0.03}))
    bs.runner.wait_for_devices()
    bs.runner.run_round(1)
    assert set(bs.runner.closer.latest_updates) == {0, 1}

    def fails(updates: object, absent: object, capabilities: object) -> None:
        raise RuntimeError("a bug nobody\nforesaw")

    with monkeypatch.context() as patch:
        patch.setattr(bs.model, "aggregate", fails)
        before = _snapshot(bs)
        second = bs.runner.run_round(2)  # device 0 fresh, device 1's round-1 update reused: the step raises
    _assert_stepped(bs, before, 0.0)
    error = "aggregation failed, the adapter did not step: a bug nobody foresaw"
    assert second.stale_updates == {}
    assert [d.status for d in second.devices] == ["ok", "not_selected"]
    assert all(d.error == error for d in second.devices)  # both updates were in the failed step
    assert f"round 2: {error}" in bs.view_text
    assert (bs.run_dir / "rounds.jsonl").read_text().count("\n") == 2  # the round is recorded
    # nothing of round 2 is kept, and the reused update that was in the failed step is not tried again
    assert {d: made for d, (made, _) in bs.runner.closer.latest_updates.items()} == {0: 1}

    before = _snapshot(bs)
    third = bs.runner.run_round(3)
    assert third.stale_updates == {} and third.devices[0].status == "ok"
    w0, w1 = (float(bs.model.examples(k)) for k in range(2))
    _assert_stepped(bs, before, 0.04 * w0 / (w0 + w1))


# ---------------------------------------------------------------------------------------------- helpers
def _station(tmp_path, overrides) -> Station:
    return make_station(
        tmp_path / "run", ["devices.count=2", "round.stale_rounds=1", *overrides], controller=FirstRoundOnly
    )


def _snapshot(bs: Station) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bs.model.adapter.state.items()}


def _assert_stepped(bs: Station, before: dict[str, torch.Tensor], step: float) -> None:
    """Every tensor moved by `step` (the test edges add one value to every entry of their module)."""
    for key, value in bs.model.adapter.state.items():
        torch.testing.assert_close(value, before[key] + step, rtol=1e-3, atol=1e-5)  # fp16 uplink
