"""An insider's influence is bounded (issue 24, item 3): each update is clipped to a multiple of the round's median
per-value RMS (fedlora/clipping.py), the coordinate-wise trimmed mean keeps a minority inside the honest values
(fedlora/aggregators/trimmed_mean.py), and a non-finite aggregate never reaches the adapter. Hand-computed cases
on the tiny model, then the BS's real close path (in-memory transport, fake clock)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from config import ConfigError, load_experiment
from fedlora.aggregation import Absent, ClientUpdate
from fedlora.aggregators import make_aggregator
from fedlora.aggregators.fedavg import FedAvgAggregator
from fedlora.aggregators.trimmed_mean import TrimmedMeanAggregator, trimmed_sum
from fedlora.clipping import clip_updates, delivered
from fedlora.lora import A_SUFFIX as _A
from fedlora.lora import B_SUFFIX as _B
from fedlora.lora import GlobalAdapter, ModuleSpec
from fedlora.models import ModelConfig, build_backbone
from tests.bs_fakes import make_station, sends_update
from tests.processes import ENV, REPO, Procs, read_rounds
from tests.processes import TINY as TINY_ARGS

TINY = ModelConfig(name_or_path="tiny", max_rank=8, target_modules=("query",))
Q1 = "bert.encoder.layer.1.attention.self.query"
FULL = ModuleSpec(8, 2)


@pytest.fixture(scope="module")
def adapter() -> GlobalAdapter:
    return GlobalAdapter(build_backbone(TINY, 2, seed=0), TINY, seed=0)


def const(g: GlobalAdapter, value: float, weight: float = 1.0, spec: ModuleSpec = FULL, kept=None) -> ClientUpdate:
    return ClientUpdate(spec, {k: torch.full_like(v, value) for k, v in g.view(spec).items()}, weight, kept)


def values_of(g: GlobalAdapter, spec: ModuleSpec = FULL) -> int:
    return sum(v.numel() for v in g.view(spec).values())


# ---------------------------------------------------------------------------------------------- clipping
def test_an_update_beyond_the_multiple_of_the_median_rms_is_scaled_to_its_bound(adapter):
    n = values_of(adapter)
    ups = {0: const(adapter, 0.01), 1: const(adapter, -0.02), 2: const(adapter, 0.03), 3: const(adapter, 1e30)}
    clip = clip_updates(ups, set(ups), multiple=4.0, clip_norm=None)
    # per-value RMS of a constant update is |value|: median of 0.01, 0.02, 0.03, 1e30 is 0.025; bound 0.1 sqrt(n)
    assert clip.reference_rms == pytest.approx(0.025) and clip.reference_from_round
    assert clip.clipped == {3}
    assert clip.norms[3] == pytest.approx(1e30 * math.sqrt(n))
    assert all(b == pytest.approx(0.1 * math.sqrt(n)) for b in clip.bounds.values())
    for k, d in clip.updates[3].delta.items():
        torch.testing.assert_close(d, torch.full_like(d, 0.1), msg=k)
    assert all(clip.updates[d] is ups[d] for d in (0, 1, 2))  # honest ones untouched
    assert clip.record()["clipped"] == [3]


def test_the_absolute_bound_and_the_rounds_without_a_median(adapter):
    n = values_of(adapter)
    two = {0: const(adapter, 0.01), 1: const(adapter, 5.0)}
    alone = clip_updates(two, set(two), multiple=4.0, clip_norm=None)  # no median of 2, nothing carried: unbounded
    assert alone.reference_rms is None and not alone.clipped and alone.bounds == {0: None, 1: None}
    carried = clip_updates(two, set(two), multiple=4.0, clip_norm=None, carried_rms=0.02)  # the last round's m
    assert carried.clipped == {1} and not carried.reference_from_round
    assert delivered(carried.updates[1])[0] == pytest.approx(0.08 * math.sqrt(n), rel=1e-6)
    absolute = clip_updates(two, set(two), multiple=None, clip_norm=1.0)
    assert absolute.clipped == {1} and absolute.reference_rms is None
    assert delivered(absolute.updates[1])[0] == pytest.approx(1.0, rel=1e-6)
    # a stale update (not fresh) is clipped but does not vote on the median
    three = {0: const(adapter, 0.01), 1: const(adapter, 0.01), 2: const(adapter, 0.01), 9: const(adapter, 7.0)}
    clip = clip_updates(three, {0, 1, 2}, multiple=4.0, clip_norm=None)
    assert clip.reference_rms == pytest.approx(0.01) and clip.clipped == {9}


def test_the_norm_counts_what_was_delivered_and_the_module_it_was_planned(adapter):
    small = ModuleSpec(2, 1)
    kept = {Q1: torch.tensor([True, False])}
    u = const(adapter, 0.5, spec=small, kept=kept)
    a, b = adapter.state[Q1 + _A], adapter.state[Q1 + _B]  # component 1 (a row of A, a column of B) not sent
    n_sent = sum(v.numel() for v in adapter.view(small).values()) - a.shape[1] - b.shape[0]
    norm, n = delivered(u)
    assert n == n_sent and norm == pytest.approx(0.5 * math.sqrt(n_sent))
    # per value: a rank-2 depth-1 update of RMS 0.5 is not clipped against full updates of RMS 0.2 at c = 4
    ups = {0: u, 1: const(adapter, 0.2), 2: const(adapter, 0.2), 3: const(adapter, 0.2)}
    assert not clip_updates(ups, set(ups), multiple=4.0, clip_norm=None).clipped


# ---------------------------------------------------------------------------------------------- trimmed mean
def test_weighted_trimmed_sum_by_hand():
    v = torch.tensor([[10.0], [0.0], [2.0], [1.0]])  # order does not matter
    w = torch.tensor([[1.0], [1.0], [1.0], [2.0]])  # total 5
    # trim 0.2: drop weight 1 at each end (all of 0, all of 10); kept 1 x2 + 2 x1 = 4, mean 4 / (0.6 x 5)
    assert float(trimmed_sum(v, w, 0.2)[0]) == pytest.approx(4.0)
    # trim 0.3: cut at 1.5 and 3.5: value 1 spans [1, 3] -> 1.5 kept, value 2 spans [3, 4] -> 0.5 kept
    assert float(trimmed_sum(v, w, 0.3)[0]) == pytest.approx(1.5 * 1 + 0.5 * 2)
    assert float(trimmed_sum(v, w, 0.0)[0]) == pytest.approx(10 + 0 + 2 + 2)  # no trim: the weighted sum
    zero = torch.zeros_like(w)
    assert float(trimmed_sum(v, zero, 0.2)[0]) == 0.0  # nobody delivered: nothing


def test_trimmed_mean_by_hand_with_absence_sparsity_and_lower_rank(adapter):
    g = adapter
    agg = make_aggregator("trimmed_mean", trim_fraction=0.2)
    ups = [const(g, 10.0), const(g, 0.0), const(g, 2.0), const(g, 1.0, weight=2.0)]
    step = agg.aggregate(g, ups, [])
    assert all(torch.allclose(d, torch.full_like(d, 4.0 / 3.0)) for d in step.values())  # 4 / (0.6 x 5)
    # an absent device of weight 5 is eligible everywhere: the mean is scaled by the delivered share 5 / 10,
    # it is not a zero among the votes
    step = agg.aggregate(g, ups, [Absent(5.0)])
    assert all(torch.allclose(d, torch.full_like(d, 2.0 / 3.0)) for d in step.values())
    # the 10 comes from a rank-4 device whose sparsifier kept component 0 of Q1 back: component 6 of every module
    # and component 0 of Q1 are voted by 0, 1 (x2), 2 only: by weight 0 on [0, 1], 1 on [1, 3], 2 on [3, 4]; cut at
    # 0.8 and 3.2 -> 0 x0.2 + 1 x2 + 2 x0.2 = 2.4 over 0.6 x 4 (delivered), scaled by 4 / 5 (eligible: all five
    # weights, the rank-4 device's capability being the whole adapter) = 0.8
    low = const(g, 10.0, spec=ModuleSpec(4, 2), kept={Q1: torch.tensor([False, True, True, True])})
    step = agg.aggregate(g, [low, *ups[1:]], [])
    expected = 2.4 / (0.6 * 4) * 4 / 5
    assert float(step[Q1 + _A][6, 0]) == pytest.approx(expected)
    assert float(step[Q1 + _A][0, 0]) == pytest.approx(expected)
    assert float(step[Q1 + _A][1, 0]) == pytest.approx(4.0 / 3.0)  # component 1: all four voted, as above


def test_trimmed_mean_without_trimming_is_fedavg(adapter):
    g = adapter
    gen = torch.Generator().manual_seed(5)
    ups = []
    for i, spec in enumerate((FULL, ModuleSpec(4, 2), ModuleSpec(8, 1), ModuleSpec(2, 1))):
        delta = {k: torch.randn(v.shape, generator=gen) for k, v in g.view(spec).items()}
        kept = {Q1: torch.rand(spec.rank, generator=gen) > 0.4} if spec.depth == 2 else None
        ups.append(ClientUpdate(spec, delta, float(i + 1), kept, capability=ModuleSpec(8, 2 if i % 2 else 1)))
    absent = [Absent(3.0), Absent(1.0, ModuleSpec(2, 1))]
    ours = TrimmedMeanAggregator(trim_fraction=0.0).aggregate(g, ups, absent)
    theirs = FedAvgAggregator().aggregate(g, ups, absent)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_a_minority_insider_cannot_move_a_coordinate_outside_the_honest_values(adapter):
    g = adapter
    gen = torch.Generator().manual_seed(9)
    honest = [
        ClientUpdate(FULL, {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in g.view(FULL).items()}, 3.0)
        for _ in range(4)
    ]
    insider = const(g, 1e30, weight=2.0)  # 2 / 14 of the weight < trim 0.2
    step = make_aggregator("trimmed_mean", trim_fraction=0.2).aggregate(g, [*honest, insider], [])
    for k, d in step.items():
        stack = torch.stack([u.delta[k] for u in honest])
        assert bool((d <= stack.max(0).values + 1e-7).all() and (d >= stack.min(0).values - 1e-7).all()), k


def test_the_experiment_config_selects_and_bounds_them():
    exp = load_experiment(None, ["round.aggregator=trimmed_mean", "round.trim_fraction=0.3"])
    agg = make_aggregator(exp.round.aggregator, exp.round.aggregation_rule, exp.round.trim_fraction)
    assert isinstance(agg, TrimmedMeanAggregator) and agg.trim_fraction == 0.3
    assert load_experiment(None, []).round.clip_multiple == 4.0  # on by default
    assert load_experiment(None, ["round.clip_multiple=null"]).round.clip_multiple is None
    for bad in ("round.trim_fraction=0.5", "round.clip_multiple=0.5", "round.clip_norm=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_experiment(None, [bad])
    with pytest.raises(ConfigError, match="trimmed_mean follows the eligible rule"):
        load_experiment(None, ["round.aggregator=trimmed_mean", "round.aggregation_rule=sent"])


# ---------------------------------------------------------------------------------------------- the BS's close
def test_the_bs_clips_an_insider_records_it_and_steps_within_the_bound(tmp_path):
    bs = make_station(tmp_path / "run", ["round.rounds=1"])
    t = bs.transport
    for k, value in enumerate((0.01, 0.012, 0.014, 1.0e4)):  # 1e4: within the fp16 uplink
        t.join(k, sends_update(t, k, value))
    bs.runner.wait_for_devices()
    before = {k: v.clone() for k, v in bs.model.adapter.state.items()}
    record = bs.runner.run_round(1)
    assert [d.status for d in record.devices] == ["ok"] * 4
    assert [d.clipped for d in record.devices] == [False, False, False, True]
    agg = record.aggregation
    assert agg["clipped"] == [3] and agg["clip_reference_rms"] == pytest.approx(0.013, rel=1e-3)  # fp16 uplink
    bound = max(agg["clip_bounds"].values())
    moved = math.sqrt(sum(float((v - before[k]).double().pow(2).sum()) for k, v in bs.model.adapter.state.items()))
    assert moved == pytest.approx(agg["step_norm"], rel=1e-4)
    assert moved <= bound * (1 + 1e-5)  # docs/security.md: ||step|| <= max_k b_k (fixed policy, all eligible)
    assert record.devices[3].update_norm > 1e4 and "edge 3's update clipped" in bs.view_text


def test_a_non_finite_aggregate_is_refused_and_recorded(tmp_path, monkeypatch):
    bs = make_station(tmp_path / "run", ["round.rounds=1", "devices.count=2"])
    t = bs.transport
    for k in range(2):
        t.join(k, sends_update(t, k, 0.01))
    bs.runner.wait_for_devices()

    def nan_step(adapter, updates, absent):
        return {k: torch.full_like(v, float("nan")) for k, v in adapter.state.items()}

    monkeypatch.setattr(bs.model.aggregator, "aggregate", nan_step)
    before = {k: v.clone() for k, v in bs.model.adapter.state.items()}
    record = bs.runner.run_round(1)
    assert "is not finite; the adapter did not step" in record.aggregation["refused"]
    assert all(torch.equal(v, before[k]) for k, v in bs.model.adapter.state.items())
    assert all("is not finite" in (d.error or "") for d in record.devices)


# ---------------------------------------------------------------------------------------------- real processes
@pytest.mark.integration
def test_an_insider_scaling_its_updates_moves_the_adapter_no_further_than_the_bound(tmp_path):
    """Real BS and edges (sim PHY, tiny model, 2 rounds): edge 3 sends its update x1e30 in round 1 and x1e3 in
    round 2 (tests/scaled_edge.py). It is clipped both times, the honest edges stay ok (before clipping the 1e30
    update went in whole and in round 2 they could not even encode theirs), every view stays finite, and the adapter
    moves per round by at most max_k b_k (docs/security.md, "An insider's influence": fixed policy, everybody
    eligible for everything), measured against the adapter the BS started from."""
    procs = Procs(tmp_path)
    try:
        run_dir = tmp_path / "run"
        overrides = ["devices.count=4", "round.rounds=2", "training.local_steps=10"]
        bs, ep = procs.bs(run_dir, *[arg for o in overrides for arg in ("--set", o)])
        for k in range(3):
            procs.edge(ep["control"], k)
        out = open(tmp_path / "insider.out", "w")
        key = run_dir / "keys" / "device-3.secret.json"
        insider = [sys.executable, "-m", "tests.scaled_edge", "1e30,1e3", "--bs", ep["control"], "--device-id", "3"]
        procs.procs.append(
            subprocess.Popen([*insider, "--key", str(key)], cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        )
        assert bs.wait(timeout=400) == 0, procs.output("bs")
        rounds = read_rounds(run_dir)
        assert len(rounds) == 2, rounds
        for r in rounds:
            rows = {d["device_id"]: d for d in r["devices"]}
            assert [rows[k]["status"] for k in range(4)] == ["ok"] * 4, (r["round"], [d["error"] for d in r["devices"]])
        for r in rounds:
            rows = {d["device_id"]: d for d in r["devices"]}
            assert [rows[k]["clipped"] for k in range(4)] == [False, False, False, True], r["aggregation"]
            bound = max(r["aggregation"]["clip_bounds"].values())
            assert r["aggregation"]["step_norm"] <= bound * (1 + 1e-5), r["aggregation"]
            assert rows[3]["update_norm"] > 100 * bound  # what it sent, before clipping
        final = torch.load(run_dir / "adapter.pt", weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in final.values())
        exp = load_experiment(None, [*TINY_ARGS[1::2], *overrides])
        start = GlobalAdapter(build_backbone(exp.model, 2, exp.seed, task=exp.task.name), exp.model, exp.seed).state
        moved = math.sqrt(sum(float((final[k].double() - v.double()).pow(2).sum()) for k, v in start.items()))
        assert 0 < moved <= sum(max(r["aggregation"]["clip_bounds"].values()) for r in rounds) * (1 + 1e-5)
        assert "refusing to encode NaN/Inf" not in "".join(procs.output(f"edge{k}") for k in range(3))
    finally:
        procs.cleanup()
