"""Controller policies: plans respect the resources, and the online policy acts on what was measured."""

from __future__ import annotations

import numpy as np
import pytest

from bs_node.controllers import DeviceState, RoundState, make_controller
from bs_node.controllers.costs import ModelShape
from bs_node.measurements import DeviceRound, RoundRecord
from config import CodecConfig, ConfigError, load_bench, load_experiment
from phy.channel import SimChannel

SHAPE = ModelShape.from_shapes(  # MiniLM: 6 layers, hidden 384, LoRA rank 8 on query/value, 2-class head
    {
        f"bert.encoder.layer.{i}.attention.self.{m}.lora_{f}": (8, 384) if f == "A" else (384, 8)
        for i in range(6)
        for m in ("query", "value")
        for f in "AB"
    }
    | {"head.classifier.weight": (2, 384), "head.classifier.bias": (2,)},
    6,
)


def bench(budget_j: float | None = 150.0, distances=(10, 20, 35, 60)):
    devices = ", ".join(
        f"{{distance_m: {d}" + (f", energy_budget_j: {budget_j}}}" if budget_j else "}") for d in distances
    )
    return load_bench(None, [f"devices=[{devices}]"])


def state(b, r=1, K=4) -> RoundState:
    return RoundState(
        r,
        tuple(DeviceState(k, b.device(k)) for k in range(K)),
        b.radio.total_bandwidth_hz,
        b.radio.max_tx_power_dbm,
        b.radio.min_tx_power_dbm,
        8,
        6,
        25,
        SHAPE,
        {k: 3000.0 for k in range(K)},
    )


def test_fixed_policy_plans_everyone_equally():
    b = bench()
    ctrl = make_controller(load_experiment(None, ["controller.rank=4", "controller.keep_fraction=0.5"]), b)
    plans = ctrl.decide(state(b))
    assert sorted(plans) == [0, 1, 2, 3]
    assert all(p.participate and p.rank == 4 and p.depth == 6 and p.keep_fraction == 0.5 for p in plans.values())
    assert sum(p.bandwidth_hz for p in plans.values()) == pytest.approx(b.radio.total_bandwidth_hz)
    assert {p.tx_power_dbm for p in plans.values()} == {b.radio.max_tx_power_dbm}


def lyapunov(b, *overrides):
    return make_controller(load_experiment(None, ["controller.policy=lyapunov", *overrides]), b)


def test_lyapunov_plans_fit_the_band_power_and_module_sets():
    b = bench()
    ctrl = lyapunov(b)
    for K in (4, 40):
        plans = ctrl.decide(state(b, K=K))
        on = [p for p in plans.values() if p.participate]
        assert on, "nobody planned"
        assert sum(p.bandwidth_hz for p in on) <= b.radio.total_bandwidth_hz * (1 + 1e-9)
        for p in on:
            assert b.radio.min_tx_power_dbm <= p.tx_power_dbm <= b.radio.max_tx_power_dbm
            cfg = ctrl.cfg
            assert p.rank in cfg.ranks and p.depth in cfg.depths and p.keep_fraction in cfg.keep_fractions
            assert p.modulation in ("bpsk", "qpsk", "8psk")


def row(k, *, snr_db, power=10.0, bw=2.5e5, energy=100.0, participated=True, depth=6):
    return DeviceRound(
        k,
        participated,
        "ok" if participated else "not_selected",
        rank=8,
        depth=depth,
        tx_power_dbm=power,
        bandwidth_hz=bw,
        modulation="qpsk",
        snr_db=snr_db,
        compute_s=10.0 if participated else 0.0,
        train_wall_s=20.0 if participated else 0.0,
        airtime_s=1.0 if participated else 0.0,
        energy_j=energy if participated else 0.0,
    )


def test_channel_gain_comes_from_the_measured_snr_at_the_power_and_bandwidth_used():
    b = bench()
    ctrl = lyapunov(b)
    ctrl.decide(state(b))
    ctrl.observe(RoundRecord(1, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=23.0, power=4.0, bw=1e5)]))
    noise_dbm = SimChannel(b.channel, 0).noise_dbm(1e5)
    assert ctrl.channel.estimates[0].mean_db == pytest.approx(23.0 - 4.0 + noise_dbm)
    var = ctrl.channel.estimates[0].var_db2
    ctrl.observe(RoundRecord(2, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=None)]))  # planned, nothing measured
    assert ctrl.channel.estimates[0].mean_db == pytest.approx(23.0 - 4.0 + noise_dbm)
    assert ctrl.channel.estimates[0].var_db2 > var


def test_a_device_measured_in_a_deep_fade_is_planned_more_carefully():
    b = bench(budget_j=None, distances=(20, 20))
    ctrl = lyapunov(b, "controller.snr_margin_sigmas=0")
    ctrl.decide(state(b, K=2))
    ctrl.observe(RoundRecord(1, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=35.0), row(1, snr_db=8.0)]))
    plans = ctrl.decide(state(b, r=2, K=2))
    bits = {"bpsk": 1, "qpsk": 2, "8psk": 3}
    good, bad = plans[0], plans[1]
    # same distance, but device 1 was measured 27 dB worse: a denser constellation would not get through
    assert good.participate and good.modulation == "8psk"
    assert not bad.participate or bits[bad.modulation] < bits[good.modulation]


def test_energy_queue_steers_a_device_to_cheaper_plans():
    b = bench(budget_j=100.0, distances=(20, 20))
    ctrl = lyapunov(b, "controller.energy_guard=false")  # the queue alone (the guard's allowance grows per call)
    free = ctrl.decide(state(b, K=2))
    energy_free = ctrl.explain()["predicted"][0]["energy_j"]
    ctrl.energy_queue[0] = 10.0  # device 0 has overspent its budget for a while
    tight = ctrl.decide(state(b, K=2))
    pred = ctrl.explain()["predicted"]
    assert free[0].participate
    assert not tight[0].participate or pred[0]["energy_j"] < energy_free
    assert tight[1].participate and pred[1]["energy_j"] == pytest.approx(energy_free, rel=0.2)


def test_queues_follow_measured_energy_against_the_budget():
    b = bench(budget_j=100.0, distances=(20, 20))
    ctrl = lyapunov(b)
    ctrl.decide(state(b, K=2))
    ctrl.observe(
        RoundRecord(
            1, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=30, energy=250.0), row(1, snr_db=30, participated=False)]
        )
    )
    assert ctrl.energy_queue[0] == pytest.approx(1.5)  # (250 − 100) / 100
    assert ctrl.energy_queue[1] == 0.0
    ctrl.observe(RoundRecord(2, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=30, participated=False)]))
    assert ctrl.energy_queue[0] == pytest.approx(0.5)


def _spend(ctrl, r, energies, *, depth=6):
    """A round in which device k spent energies[k] (None: sat out)."""
    rows = [
        row(k, snr_db=30.0, energy=e if e is not None else 0.0, participated=e is not None, depth=depth)
        for k, e in enumerate(energies)
    ]
    ctrl.observe(RoundRecord(r, 0.7, 0.5, 1.0, "lyapunov", 0, rows))


def test_energy_guard_keeps_every_plan_within_the_cumulative_allowance():
    b = bench(budget_j=100.0, distances=(20, 20))
    ctrl = lyapunov(b, "controller.energy_credit_rounds=0")
    ctrl.decide(state(b, K=2))
    _spend(ctrl, 1, [250.0, 40.0])  # device 0 overspent round 1 by 150 J, device 1 saved 60 J
    plans = ctrl.decide(state(b, r=2, K=2))
    info = ctrl.explain()
    assert info["energy_allowance_j"] == {0: pytest.approx(-50.0), 1: pytest.approx(160.0)}
    assert not plans[0].participate  # nothing costs less than nothing left
    assert plans[1].participate and info["predicted"][1]["energy_j"] <= 0.9 * 160.0
    _spend(ctrl, 2, [None, 100.0])
    ctrl.decide(state(b, r=3, K=2))
    assert ctrl.explain()["energy_allowance_j"] == {0: pytest.approx(50.0), 1: pytest.approx(160.0)}


def test_energy_guard_lets_an_unmeasured_device_probe_its_cheapest_module_once():
    b = bench(budget_j=60.0, distances=(20, 20))  # no module fits a 60 J allowance by the prior
    ctrl = lyapunov(b, "controller.energy_credit_rounds=0")
    first = ctrl.decide(state(b, K=2))
    assert all(p.participate and p.depth == min(ctrl.cfg.depths) for p in first.values())
    _spend(ctrl, 1, [60.0, 60.0], depth=1)  # measured now: the guard applies
    second = ctrl.decide(state(b, r=2, K=2))
    assert not any(p.participate for p in second.values())


def test_without_the_guard_only_the_queues_hold_a_device_back():
    b = bench(budget_j=1.0, distances=(20, 20))
    ctrl = lyapunov(b, "controller.energy_guard=false", "controller.energy_price=0")
    plans = ctrl.decide(state(b, K=2))  # empty queues, no guard, no price: the full module, whatever it costs
    assert all(p.participate and p.depth == max(ctrl.cfg.depths) for p in plans.values())
    assert ctrl.explain()["energy_allowance_j"] == {}


def test_round_records_explain_the_decision():
    b = bench()
    ctrl = lyapunov(b)
    ctrl.decide(state(b))
    info = ctrl.explain()
    assert set(info["gain_db"]) == {0, 1, 2, 3} and "energy_queue" in info and "round_length_s" in info
    assert 0 < info["effective_updates"] <= 4  # S, the full updates the plan expects to arrive
    assert info["gain_db"][0] > info["gain_db"][3]  # prior from the bench distances until measured


@pytest.mark.parametrize(
    "override, needle",
    [
        ("controller.loss_weights=[0.6, 0.5, 0.6]", "loss_weights"),
        ("controller.loss_weights=[0.2, 1.5, 0.2]", "loss_weights"),
        ("controller.energy_credit_rounds=-1", "energy_credit_rounds"),
        ("controller.modulations=[qam1024]", "modulations"),
        ("controller.keep_fractions=[0]", "keep_fractions"),
        ("controller.policy=clairvoyant", "controller.policy = 'clairvoyant': expected one of 'fixed'"),
    ],
)
def test_bad_controller_config_is_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        make_controller(load_experiment(None, [override]), bench())


def tsfa(b, budget_s, policy="tsfa", *overrides):
    exp = load_experiment(
        None,
        [f"controller.policy={policy}", "codec.sparsifier=soft", f"controller.latency_budget_s={budget_s}", *overrides],
    )
    return make_controller(exp, b)


def test_tsfa_ranks_offline_from_the_long_run_channel_and_then_keeps_the_rank():
    b = bench(distances=(10, 60, 150, 400))
    ranks = {}
    for budget_s in (20, 40, 240):
        ctrl = tsfa(b, budget_s)
        ctrl.decide(state(b))
        ranks[budget_s] = [ctrl.offline_rank[k] for k in range(4)]
        assert ranks[budget_s] == sorted(ranks[budget_s], reverse=True)  # farther never gets a larger rank
        assert ctrl.capability(0, 8, 6) == (ranks[budget_s][0], 6)
    assert ranks[20] == [2, 2, 2, 2]  # not even training fits: the smallest rank
    assert ranks[40][0] == 8 and ranks[40][-1] == 2  # near devices get the full rank, far ones a small one
    assert ranks[240] == [8, 8, 8, 8]
    slow = load_bench(None, ["devices=[{distance_m: 10}, {distance_m: 10, compute_speed: 0.5}]"])
    ctrl = tsfa(slow, 40)
    ctrl.decide(state(slow, K=2))
    assert ctrl.offline_rank == {0: 8, 1: 2}  # the same channel, half the compute speed


def test_tsfa_online_stage_keeps_each_rank_and_chooses_sparsity_and_bandwidth_within_the_budget():
    b = bench(distances=(10, 60, 150, 400))
    ctrl = tsfa(b, 80)
    plans = ctrl.decide(state(b))
    on = [p for p in plans.values() if p.participate]
    assert on and sum(p.bandwidth_hz for p in on) <= b.radio.total_bandwidth_hz * (1 + 1e-9)
    for p in on:
        assert (p.rank, p.depth, p.tx_power_dbm, p.modulation) == (ctrl.offline_rank[p.device_id], 6, 10.0, "qpsk")
        assert p.keep_fraction in ctrl.cfg.keep_fractions
    predicted = ctrl.explain()["predicted"]
    assert all(v["latency_s"] <= 80 for v in predicted.values())  # the per-round latency budget
    ctrl.energy_queue[0] = 50.0  # TSFA has no energy constraint: queues must not matter
    assert ctrl.decide(state(b))[0].participate == plans[0].participate


def test_hetlora_and_flexlora_plan_everyone_dense_at_their_rank_and_hetlora_prunes():
    b = bench(distances=(10, 60, 150, 400))
    for policy in ("hetlora", "flexlora"):
        ctrl = tsfa(b, 40, policy)
        plans = ctrl.decide(state(b))
        assert all(p.participate and p.keep_fraction == 1.0 and p.depth == 6 for p in plans.values())
        assert [plans[k].rank for k in range(4)] == [ctrl.offline_rank[k] for k in range(4)]
    ctrl = tsfa(b, 40, "hetlora")
    ctrl.decide(state(b))
    record = RoundRecord(1, 0.7, 0.5, 1.0, "hetlora", 0, [row(k, snr_db=20.0) for k in range(4)])
    record.aggregation = {"tail_share": {0: 0.02, 1: 0.3}}
    ctrl.observe(record)
    assert ctrl.decide(state(b))[0].rank == 4 and ctrl.decide(state(b))[1].rank == 8  # 0 pruned one step


def test_budgeted_fixed_takes_part_only_when_its_measured_spend_fits_its_allowance():
    b = bench(budget_j=100.0, distances=(10, 20))
    ctrl = make_controller(load_experiment(None, ["controller.policy=budgeted"]), b)
    first = ctrl.decide(state(b, K=2))
    assert all(p.participate for p in first.values())  # nothing measured: everybody probes
    assert first[0].bandwidth_hz == b.radio.total_bandwidth_hz / 2
    costs = {0: 250.0, 1: 80.0}  # device 0's round costs 2.5 budgets, device 1's 0.8
    took_part = {0: [], 1: []}
    for r in range(1, 11):
        plans = ctrl.decide(state(b, r=r, K=2)) if r > 1 else first
        for k in (0, 1):
            took_part[k].append(plans[k].participate)
        record = RoundRecord(r, 0.7, 0.5, 1.0, "budgeted", 0, [])
        record.devices = [
            row(k, snr_db=20.0, energy=costs[k] if plans[k].participate else 0.0, participated=plans[k].participate)
            for k in (0, 1)
        ]
        ctrl.observe(record)
        for k in (0, 1):  # never past the allowance after the probe round
            assert ctrl.spent_j[k] <= 100.0 * r + costs[k] + 1e-9
        on = [p for p in plans.values() if p.participate]
        assert sum(p.bandwidth_hz for p in on) == pytest.approx(b.radio.total_bandwidth_hz if on else 0.0)
    assert all(took_part[1]) and 3 <= sum(took_part[0]) <= 5  # 10 budgets / 2.5 a round: about 4 rounds


def test_greedy_takes_the_best_measured_channels():
    b = bench(budget_j=None, distances=(10, 10, 10, 10))
    ctrl = make_controller(load_experiment(None, ["controller.policy=greedy", "controller.greedy_top=2"]), b)
    ctrl.observe(
        RoundRecord(
            1,
            0.7,
            0.5,
            1.0,
            "greedy",
            0,
            [row(0, snr_db=5.0), row(1, snr_db=30.0), row(2, snr_db=12.0), row(3, snr_db=25.0)],
        )
    )
    plans = ctrl.decide(state(b))
    assert {k for k, p in plans.items() if p.participate} == {1, 3}
    assert plans[1].bandwidth_hz == b.radio.total_bandwidth_hz / 2


def test_random_policy_is_seeded_and_never_empty():
    b = bench()
    exp = load_experiment(None, ["controller.policy=random", "controller.random_participation=0.01"])
    first = make_controller(exp, b).decide(state(b, r=3))
    again = make_controller(exp, b).decide(state(b, r=3))
    assert first == again
    assert sum(p.participate for p in first.values()) == 1


def test_delivery_is_averaged_over_the_block_fade():
    """One fade per round: a link with a comfortable *average* SNR still loses a whole update in a deep fade."""
    from bs_node.controllers.costs import CostModel
    from bs_node.controllers.estimates import rayleigh_nodes_db
    from phy.channel import PerCurve

    b = bench()
    model = CostModel(b, PerCurve.default(), SHAPE, 8, (0.3, 0.2, 0.2), codec=CodecConfig())
    grid = model.grid([(8, 6)], ["qpsk"], [1.0], np.array([10.0]), np.array([0.25]))
    zeros = np.zeros((2, 1))
    noise_dbm = -174 + 9 + 10 * np.log10(0.25 * b.radio.total_bandwidth_hz)
    gains = np.array([20.0, 60.0]) - 10.0 + noise_dbm  # mean SNR 20 dB and 60 dB at 10 dBm
    still = model.predict(grid, gain_db=gains, cpu_s=zeros, wall_s=zeros, watts_per_core=np.ones(2))
    faded = model.predict(
        grid,
        gain_db=gains,
        cpu_s=zeros,
        wall_s=zeros,
        watts_per_core=np.ones(2),
        fading_db=np.tile(rayleigh_nodes_db(), (2, 1)),
    )
    assert still.delivery[0, 0] == pytest.approx(1.0)
    assert faded.delivery[0, 0] < 0.9  # the lowest node (−9.4 dB: 10.6 dB) is below QPSK's waterfall
    assert faded.delivery[1, 0] == pytest.approx(1.0) and faded.airtime_s[1, 0] == pytest.approx(still.airtime_s[1, 0])
    assert faded.airtime_s[0, 0] > still.airtime_s[0, 0]  # retransmissions in the weaker nodes


def test_a_rayleigh_bench_plans_a_marginal_link_more_robustly():
    plans = {}
    for fading in ("none", "rayleigh"):
        b = load_bench(None, [f"channel.fading={fading}", "devices=[{distance_m: 20}, {distance_m: 20}]"])
        ctrl = lyapunov(b)
        ctrl.decide(state(b, K=2))
        ctrl.observe(RoundRecord(1, 0.7, 0.5, 1.0, "lyapunov", 0, [row(0, snr_db=24.0), row(1, snr_db=24.0)]))
        plans[fading] = ctrl.decide(state(b, r=2, K=2))[0]
        plans[fading + "_delivery"] = ctrl.explain()["predicted"][0]["delivery"]
    bits = {"bpsk": 1, "qpsk": 2, "8psk": 3}
    none, faded = plans["none"], plans["rayleigh"]
    # 24 dB measured: without fading any share works; expecting fades, it buys SNR margin with a narrower
    # share (same power in less noise) and no denser constellation
    assert none.participate and faded.participate
    assert faded.bandwidth_hz < none.bandwidth_hz and bits[faded.modulation] <= bits[none.modulation]
    assert plans["rayleigh_delivery"] > 0.99


def test_the_participation_proxy_has_diminishing_returns():
    from bs_node.controllers.lyapunov import participation_loss, participation_slope

    K = 6
    s = np.linspace(0, K, 61)
    phi = participation_loss(s, K)
    assert phi[0] == pytest.approx(1.0) and phi[-1] == pytest.approx(0.0)
    assert np.all(np.diff(phi) < 0) and np.all(np.diff(phi, 2) > 0)  # decreasing, convex
    for x in (0.0, 1.0, 2.5):
        numeric = (participation_loss(x, K) - participation_loss(x + 1e-6, K)) / 1e-6
        assert participation_slope(x, K) == pytest.approx(numeric, rel=1e-4)


def _run_rounds(ctrl, b, K, rounds, speed=None):
    """Drive the controller for `rounds` rounds; each planned device reports what the plan predicted."""
    spent, taken = np.zeros(K), []
    for r in range(1, rounds + 1):
        plans = ctrl.decide(state(b, r=r, K=K))
        pred = ctrl.explain()["predicted"]
        rows = []
        for k in range(K):
            p = plans[k]
            if not p.participate:
                rows.append(row(k, snr_db=None, participated=False))
                continue
            e = pred[k]["energy_j"] * (speed[k] if speed else 1.0)
            rows.append(
                DeviceRound(
                    k,
                    True,
                    "ok",
                    rank=p.rank,
                    depth=p.depth,
                    tx_power_dbm=p.tx_power_dbm,
                    bandwidth_hz=p.bandwidth_hz,
                    modulation=p.modulation,
                    snr_db=30.0,
                    compute_s=e / b.device(k).compute_watts_per_core,
                    train_wall_s=e / 10,
                    airtime_s=1.0,
                    energy_j=e,
                )
            )
            spent[k] += e
        taken.append({k: plans[k].depth for k in range(K) if plans[k].participate})
        ctrl.observe(RoundRecord(r, 0.7, 0.5, 1.0, "lyapunov", 0, rows))
    return spent, taken


def test_devices_whose_full_module_costs_more_than_a_budget_take_turns_within_their_budgets():
    K, budget, rounds = 6, 170.0, 8  # the full module costs about 300 J (the prior): 1.75 budgets, as on sim_hetero
    b = bench(budget_j=budget, distances=(10, 15, 20, 25, 30, 35))
    ctrl = lyapunov(b, f"round.rounds={rounds}")
    spent, taken = _run_rounds(ctrl, b, K, rounds)
    full = max(ctrl.cfg.depths)
    assert all(taken), f"a round without anybody: {taken}"
    assert max(len(t) for t in taken[1:]) < K, "no rotation: everybody every round"
    assert all(sum(k in t for t in taken) >= 2 for k in range(K)), taken  # everyone takes turns
    depths = [d for t in taken for d in t.values()]
    assert np.mean(depths) >= 4 and full in depths, taken  # deep modules are the efficient ones here
    assert np.all(spent / rounds <= budget * 1.05), spent / rounds


def test_energy_credit_lets_an_expensive_module_start_early_and_the_books_close_at_the_last_round():
    b = bench(budget_j=100.0, distances=(20, 20))
    ctrl = lyapunov(b, "round.rounds=4", "controller.energy_credit_rounds=2")
    ctrl.decide(state(b, K=2))
    assert ctrl.explain()["energy_allowance_j"] == {0: pytest.approx(300.0), 1: pytest.approx(300.0)}
    _spend(ctrl, 1, [250.0, None])
    ctrl.decide(state(b, r=2, K=2))  # the credit shrinks to nothing at the last round: 2 + 2·(4 − 2)/3 budgets
    assert ctrl.explain()["energy_allowance_j"] == {
        0: pytest.approx(100 * (2 + 4 / 3) - 250, abs=0.1),
        1: pytest.approx(100 * (2 + 4 / 3), abs=0.1),
    }
    _spend(ctrl, 2, [None, None])
    ctrl.decide(state(b, r=3, K=2))
    _spend(ctrl, 3, [None, None])
    ctrl.decide(state(b, r=4, K=2))  # the last round: 4 budgets, nothing borrowed ahead
    assert ctrl.explain()["energy_allowance_j"] == {0: pytest.approx(150.0), 1: pytest.approx(400.0)}


@pytest.mark.parametrize(
    "sparsifier, choices", [("dense", {1.0}), ("b_only", {1.0}), ("soft", {0.25, 0.5, 1.0}), ("topk", {0.25, 0.5, 1.0})]
)
def test_keep_fractions_are_offered_only_where_the_codec_honours_them(sparsifier, choices):
    b = bench()
    for policy in ("lyapunov", "tsfa"):
        ctrl = make_controller(
            load_experiment(None, [f"controller.policy={policy}", f"codec.sparsifier={sparsifier}"]), b
        )
        assert set(ctrl.choices(state(b))[2]) == choices  # a dense codec would send it all anyway


def test_the_config_offers_exactly_the_policies_that_exist():
    """config cannot import the controllers (it sits below them), so its list of policies is checked here."""
    import typing

    from bs_node.controllers import POLICIES
    from config import ControllerConfig

    assert set(typing.get_args(ControllerConfig.model_fields["policy"].annotation)) == set(POLICIES)


def test_the_controller_is_told_the_nominal_channel_only():
    """hw_configs/sim_mismatch.yaml: the controller sees path loss, noise and "it fades" (as Rayleigh) and the
    built-in PER curve, never the sim's Rician K, shadowing, correlation, interference or true curve."""
    from bs_node.controllers.estimates import RAYLEIGH_LOG_MEAN_DB, ChannelEstimator
    from config import ChannelConfig
    from config.base import REPO_ROOT
    from config.bench import IMPAIRMENT_KEYS
    from phy.channel import PerCurve

    mismatch = load_bench(REPO_ROOT / "hw_configs" / "sim_mismatch.yaml")
    hetero = load_bench(REPO_ROOT / "hw_configs" / "sim_hetero.yaml")
    told = mismatch.channel.nominal()
    assert told == hetero.channel  # the nominal model of the same bench without impairments
    assert all(getattr(told, k) == getattr(ChannelConfig(), k) for k in IMPAIRMENT_KEYS)
    assert ChannelConfig(fading="none", shadowing_sigma_db=3.0).nominal() == ChannelConfig(fading="none")
    estimator = ChannelEstimator(mismatch.channel)
    assert estimator.channel.cfg == told and estimator.rayleigh  # "it fades", not how
    prior = estimator.prior(2, 40.0)
    assert prior.mean_db == pytest.approx(-estimator.channel.path_loss_db(40.0) + RAYLEIGH_LOG_MEAN_DB)
    assert prior.mean_db == ChannelEstimator(hetero.channel).prior(2, 40.0).mean_db
    ctrl = make_controller(load_experiment(None, ["controller.policy=lyapunov"]), mismatch)
    assert ctrl.channel.channel.cfg == told
    assert ctrl.per_curve.to_dict() == PerCurve.default().to_dict() != PerCurve.for_sim_link(mismatch).to_dict()
