"""The fast solver decides exactly as the reference solver (bs_node/controllers/lyapunov_reference.py).

Fixed random states: different K, measured SNRs (and devices never measured), energy queues, budgets and
spending (some devices with nothing left, so every option is infeasible), a latency queue, a sparsifying codec,
TSFA's mask. Each state is decided twice from copies of one controller: the plans, the explanation (round
length, objective, S, each plan's predicted energy, latency and delivery) and the controller's state after the
decision must be identical. Wall-clock times are the benchmark's business (benchmarks/controller_decision_time.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

import bs_node.controllers.lyapunov as lyapunov_module
import bs_node.controllers.participation_search as participation_search
from bs_node.controllers import DeviceState, RoundState, make_controller
from bs_node.controllers.lyapunov import LyapunovController
from bs_node.controllers.lyapunov_reference import _allocate, reference_decide, reference_predict
from bs_node.controllers.participation_search import Band, allocate, drop_participants, participation_loss
from bs_node.measurements import DeviceRound, RoundRecord
from config import load_bench, load_experiment
from tests.test_controllers import SHAPE


def _round_state(bench, K: int, r: int, weights: np.ndarray) -> RoundState:
    radio = bench.radio
    devices = tuple(DeviceState(k, bench.device(k)) for k in range(K))
    return RoundState(
        r, devices, radio.total_bandwidth_hz, radio.max_tx_power_dbm, radio.min_tx_power_dbm, 8, 6, 25, SHAPE,
        {k: float(w) for k, w in enumerate(weights)},
    )  # fmt: skip


def _controller(seed: int, K: int, *overrides: str) -> tuple[LyapunovController, RoundState]:
    """A controller with a random history: measured and unmeasured devices, queues, spending, weights."""
    rng = np.random.default_rng(seed)
    devices = []
    for _ in range(K):
        budget = "" if rng.random() < 0.2 else f", energy_budget_j: {rng.uniform(40, 300):.1f}"
        devices.append(f"{{distance_m: {rng.uniform(5, 160):.1f}, compute_speed: {rng.uniform(0.3, 1):.2f}{budget}}}")
    bench_sets = [o.removeprefix("bench:") for o in overrides if o.startswith("bench:")]
    bench = load_bench(None, [f"devices=[{', '.join(devices)}]", *bench_sets])
    exp_sets = [o for o in overrides if not o.startswith("bench:")]
    exp = load_experiment(None, ["controller.policy=lyapunov", "round.rounds=10", *exp_sets])
    ctrl = make_controller(exp, bench)
    assert isinstance(ctrl, LyapunovController)
    weights = rng.uniform(100, 3000, K)
    ctrl.decide(_round_state(bench, K, 1, weights))
    rows = []
    for k in range(K):
        if rng.random() < 0.15:  # never measured: its compute is the prior, its channel the path loss
            continue
        rows.append(
            DeviceRound(
                k,
                True,
                "ok",
                rank=8,
                depth=int(rng.choice([1, 2, 4, 6])),
                tx_power_dbm=float(rng.uniform(-10, 10)),
                bandwidth_hz=float(rng.uniform(2e4, 4e5)),
                modulation=str(rng.choice(["bpsk", "qpsk", "8psk"])),
                snr_db=None if rng.random() < 0.1 else float(rng.uniform(-5, 40)),
                compute_s=float(rng.uniform(5, 40)),
                train_wall_s=float(rng.uniform(10, 80)),
                airtime_s=float(rng.uniform(0.5, 20)),
                energy_j=float(rng.uniform(20, 400)),
            )
        )
    ctrl.observe(RoundRecord(1, 0.7, 0.5, 60.0, ctrl.name, 0, rows))
    for k in range(K):
        if rng.random() < 0.3:
            ctrl.energy_queue[k] = float(rng.uniform(0, 5))
        if rng.random() < 0.15:
            ctrl.energy_spent_j[k] = 5000.0  # nothing left in its allowance: no feasible option
    if ctrl.cfg.latency_budget_s is not None:
        ctrl.latency_queue = float(rng.uniform(0.5, 3))
    return ctrl, _round_state(bench, K, 2, weights)


CASES = [
    (1, 3, ()),
    (2, 12, ()),
    (3, 40, ()),
    (4, 150, ()),
    (5, 25, ("codec.sparsifier=soft",)),
    (6, 30, ("controller.latency_budget_s=90",)),
    (7, 20, ("controller.energy_guard=false", "controller.energy_price=0")),
    (8, 60, ("controller.v=400", "controller.snr_margin_sigmas=1")),
    (9, 16, ("controller.policy=tsfa", "codec.sparsifier=soft", "controller.latency_budget_s=60")),
    (10, 80, ("controller.policy=tsfa", "codec.sparsifier=topk", "controller.latency_budget_s=150")),
    # the view over the PHY at a weak BS: its downlink time counts in every option's latency
    (11, 30, ("bench:phy=gr-zmq-iq", "bench:downlink.tx_power_dbm=-10", "controller.latency_budget_s=60")),
]


def _decide_both(ctrl: LyapunovController, state: RoundState):
    fast, ref = copy.deepcopy(ctrl), copy.deepcopy(ctrl)
    return fast, fast.decide(state), ref, reference_decide(ref, state)


@pytest.mark.parametrize("seed, K, overrides", CASES)
def test_the_fast_solver_plans_exactly_as_the_reference(seed, K, overrides):
    ctrl, state = _controller(seed, K, *overrides)
    fast, plans, ref, expected = _decide_both(ctrl, state)
    assert plans == expected  # module, modulation, power, share, keep fraction, who takes part
    assert json.dumps(fast.explain(), sort_keys=True) == json.dumps(ref.explain(), sort_keys=True)
    assert fast.rounds_planned == ref.rounds_planned and fast.channel.estimates == ref.channel.estimates
    assert any(p.participate for p in plans.values()) and not all(p.participate for p in plans.values())


def test_every_live_option_is_predicted_to_the_bit():
    """The live options' energy, latency and delivery are CostModel.predict's numbers, not approximations."""
    ctrl, state = _controller(11, 50, "codec.sparsifier=soft")
    captured = {}
    real = lyapunov_module.live_options

    def spy(*args, **kwargs):
        captured["cands"] = real(*args, **kwargs)
        captured["grid"] = args[1]
        return captured["cands"]

    fast = copy.deepcopy(ctrl)
    lyapunov_module.live_options = spy
    try:
        fast.decide(state)
    finally:
        lyapunov_module.live_options = real
    cands, grid = captured["cands"], captured["grid"]
    pred = reference_predict(copy.deepcopy(ctrl), state, grid)
    assert len(cands.option) > 100
    rows, cols = cands.device, cands.option
    np.testing.assert_array_equal(cands.energy_j, pred.energy_j[rows, cols])
    np.testing.assert_array_equal(cands.latency_s, pred.latency_s[rows, cols])
    np.testing.assert_array_equal(cands.delivery, pred.delivery[rows, cols])
    assert cands.t_ref_s == max(float(pred.latency_s.min(axis=1).max()), 1e-6)


def test_the_check_would_catch_a_pruning_that_drops_a_non_dominated_option(monkeypatch):
    """A pruning bug that loses each (device, share level)'s live option of best value per cost (never dominated:
    one at least as cheap and as valuable would have at least its ratio) changes the plans: the equivalence above
    is a real test, not one any solver passes."""
    real = lyapunov_module.live_options

    def lossy(*args, **kwargs):
        cands = real(*args, **kwargs)
        order = np.lexsort((cands.value / cands.cost, cands.group))
        last = np.r_[cands.group[order][1:] != cands.group[order][:-1], True]
        keep = np.ones(len(cands.group), dtype=bool)
        keep[order[last]] = False
        fields = ("device", "option", "group", "cost", "value", "latency_s", "energy_j", "delivery")
        return dataclasses.replace(cands, **{f: getattr(cands, f)[keep] for f in fields})

    monkeypatch.setattr(lyapunov_module, "live_options", lossy)
    differs = []
    for seed, K, overrides in CASES[:4]:
        ctrl, state = _controller(seed, K, *overrides)
        _, plans, _, expected = _decide_both(ctrl, state)
        differs.append(plans != expected)
    assert all(differs)


def _reference_drops(v_on: np.ndarray, c_on: np.ndarray, K: int, v: float) -> tuple[np.ndarray, float]:
    """The reference's drop loop (lyapunov_reference._prune without the plan around it)."""
    s, keep = float(v_on.sum()), np.ones(len(v_on), dtype=bool)
    while keep.any():
        delta = np.where(keep, v * (participation_loss(s - v_on, K) - participation_loss(s, K)) - c_on, np.inf)
        i = int(delta.argmin())
        if delta[i] >= 0:
            break
        keep[i] = False
        s -= float(v_on[i])
    return keep, s


@pytest.mark.parametrize("n", [1, 7, 60, 400])
def test_dropping_participants_follows_the_reference_step_for_step(n):
    rng = np.random.default_rng(n)
    for K in (n, 3 * n):
        v_on = rng.uniform(0.01, 1.2, n) * rng.choice([1.0, 0.1], n)
        c_on = rng.uniform(0.0, 4.0, n)
        c_on[: n // 5] = c_on[0]  # ties: the lower index goes first
        keep, s = drop_participants(v_on, c_on, K, 60.0)
        expected_keep, expected_s = _reference_drops(v_on, c_on, K, 60.0)
        assert np.array_equal(keep, expected_keep) and s == expected_s


@pytest.mark.parametrize("devices", [2, 10, 150, 400])  # 400: past the batched check, the bisection itself
def test_the_band_price_lands_where_the_reference_bisection_does(devices):
    rng = np.random.default_rng(devices)
    share = np.geomspace(1.0 / (4 * devices), 1.0, 10)
    for _ in range(5):
        cost = rng.uniform(-3.0, 1.0, (devices, 10))
        cost[rng.random(cost.shape) < 0.2] = np.inf  # levels without a live option
        assert np.array_equal(allocate(cost, Band.of(share), 25), _allocate(cost, share, 25))


def test_a_wrong_guess_of_the_band_price_falls_back_to_the_bisection(monkeypatch):
    """The guessed bisection path is checked, not trusted: off by a third, it is caught and bisected instead."""
    real_fit, real_bisect, bisected = participation_search._first_fit, participation_search._bisect, []
    monkeypatch.setattr(participation_search, "_first_fit", lambda c, s: 1.37 * real_fit(c, s))
    monkeypatch.setattr(participation_search, "_bisect", lambda *a: bisected.append(1) or real_bisect(*a))
    cost = np.random.default_rng(0).uniform(-3.0, 1.0, (30, 10))
    share = np.geomspace(1.0 / 120, 1.0, 10)
    assert np.array_equal(allocate(cost, Band.of(share), 25), _allocate(cost, share, 25)) and bisected
